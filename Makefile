# Quick start: `make demo` and `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?=
MODEL_TYPE ?= vit_b
DEMO_IMAGE ?= outputs/demo/astronaut.png

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) -m samkit.demo_data $(DEMO_IMAGE)
	$(PY) demo/inference_with_prompts.py --prompt-type all --model-type $(MODEL_TYPE) \
	  $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--download) \
	  --input $(DEMO_IMAGE) --output-dir outputs/demo

test: install
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
