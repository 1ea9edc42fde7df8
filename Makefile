# Quickstart: `make demo` generates text with the embedded default model; `make test` runs the tests.
# Both create .venv on first use. torch is pinned and installed first: the CPU wheel lies on this
# machine's disk, and an unpinned torch would make pip fetch CUDA builds of several GB.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# --no-cache-dir: the wheels lie on this disk already; a cached copy of each (torch's is ~200 MB, unpacked
# ~750 MB) only costs disk, and CI machines have run out of it during this step
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --no-cache-dir $(TORCH)
	$(BIN)/pip install -q --no-cache-dir -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# one worker per core, a test file per worker at a time (a file's server fixture starts once); every test
# process computes on one thread (tests/conftest.py), so the suite stays quick when the machine is shared
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile tests

demo: $(STAMP)
	$(BIN)/gpt2kit generate "Hello, I'm a language model"

bench: $(STAMP)
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/load_and_forward.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
