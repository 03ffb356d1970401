# `make test` and `make demo` work from a fresh clone: the virtual environment is created on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: test demo chat clean

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	touch $(INSTALLED)

test: $(INSTALLED)
	$(PYTHON) -m pytest

# The main job on the embedded corpus: prepare it (once), train (resumes if interrupted), score it on the whole
# validation split, print a sample.
demo: $(INSTALLED)
	test -f data/shakespeare-char/meta.json || $(VENV)/bin/gptlab prepare shakespeare-char --out data/shakespeare-char
	$(VENV)/bin/gptlab train --config shakespeare_char
	$(VENV)/bin/gptlab eval out/shakespeare-char --data data/shakespeare-char
	$(VENV)/bin/gptlab sample --model out/shakespeare-char --max_new_tokens 500 --temperature 0.8 --top_k 40

clean:
	rm -rf $(VENV) build src/*.egg-info

# Chat fine-tuning of the demo's model on the embedded chat task set (runs `make demo` first if needed): exact
# match on the held-out questions before and after, then one answer.
chat: $(INSTALLED)
	test -f out/shakespeare-char/metrics.jsonl || $(MAKE) demo
	test -f data/chat-tasks/meta.json || $(VENV)/bin/gptlab prepare chat-tasks --out data/chat-tasks --block_size 128
	$(VENV)/bin/gptlab eval out/shakespeare-char --task chat
	$(VENV)/bin/gptlab train --config chat_tasks
	$(VENV)/bin/gptlab eval out/chat-tasks --task chat
	$(VENV)/bin/gptlab chat out/chat-tasks -p "Reverse castle." --temperature 0
