# The README's two commands: `make demo` and `make test`. Both set up .venv/ first.
PY ?= python3
VENV := .venv
EXTRAS ?= dev,vllm

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	touch $@

.PHONY: setup demo test soak
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/fusion-passes demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

# A long hypothesis soak (not in CI): 20,000 examples per property.
soak: $(VENV)/.installed
	HYPOTHESIS_PROFILE=soak $(VENV)/bin/python -m pytest -q tests -k "property"
