"""Benchmarks: minilora's QLoRA training against transformers+peft and unsloth (see bench/README.md)."""
