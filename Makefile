# Two entry points on a fresh machine: `make demo` (main job on a real model) and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.sawkv-installed
DEMO_OUT ?= demo_out

.PHONY: install data data-all demo test lint clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# CPU torch first (a local wheel), so no dependency pulls a multi-GB CUDA build
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

data: install
	PY=$(VPY) bash scripts/setup_data.sh

data-all: install
	PY=$(VPY) bash scripts/setup_data.sh --all

demo: data
	mkdir -p $(DEMO_OUT)
	$(VENV)/bin/sawkv eval --model smollm2-135m \
		--methods auto,bf16,int8,int4,int4-bdr64,int4-bdr64-kc,int4-bdr64-kv-kc,saw-int4 \
		--text austen --tokens 4096 --window 1024 \
		--json $(DEMO_OUT)/demo_eval.json --plot $(DEMO_OUT)/demo_eval.png
	$(VENV)/bin/sawkv generate --model smollm2-135m --max-tokens 32 \
		--temperature 0 \
		"The capital of France is" "Mr. Darcy walked into the room and"

test: data
	$(VENV)/bin/python -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check sawkv tests benchmarks
	$(VENV)/bin/ruff format --check sawkv tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT)
