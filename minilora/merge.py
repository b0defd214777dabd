"""`python -m minilora.merge`: merge an adapter into its base, optionally export GGUF (export/merge.py)."""
from . import run_command
from .export.merge import main

if __name__ == "__main__":
    run_command(main)
