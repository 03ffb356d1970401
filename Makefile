# `make test` and `make demo` work from a fresh clone: the virtual environment is created on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: test demo clean

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	touch $(INSTALLED)

test: $(INSTALLED)
	$(PYTHON) -m pytest

demo: $(INSTALLED)
	$(VENV)/bin/gptlab inspect gpt2

clean:
	rm -rf $(VENV) build src/*.egg-info
