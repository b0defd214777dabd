"""`python -m minilora.merge`: merge an adapter into its base, optionally export GGUF (export/merge.py)."""
import sys

from .export.merge import main

if __name__ == "__main__":
    sys.exit(main())
