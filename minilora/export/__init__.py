"""Export: merge an adapter into its base (merge.py), write GGUF for llama.cpp (gguf.py), upload (hub.py)."""
