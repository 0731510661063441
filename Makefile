# Quick start: `make demo` and `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?=
MODEL_TYPE ?= vit_b
DEMO_IMAGE ?= outputs/demo/astronaut.png

.PHONY: install demo test lint bench clean web-runtime

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# onnxruntime-web for samkit serve's in-browser decoding: `npm ci` from package-lock.json into node_modules/
# (git-ignored), its wasm build copied into samkit/serve/static/vendor/ (git-ignored; samkit serve looks
# there, or in --web-runtime DIR). npm comes from apt where it is missing (CI starts bare, as root).
WEB_RUNTIME := samkit/serve/static/vendor/onnxruntime-web
WEB_RUNTIME_FILES := ort.wasm.min.js ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm

web-runtime: $(WEB_RUNTIME)/.installed

$(WEB_RUNTIME)/.installed: package.json package-lock.json
	command -v npm >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm; }
	npm ci --no-audit --no-fund --ignore-scripts
	mkdir -p $(WEB_RUNTIME)
	cp $(addprefix node_modules/onnxruntime-web/dist/,$(WEB_RUNTIME_FILES)) $(WEB_RUNTIME)/
	touch $@

demo: install
	$(PY) -m samkit.commands.demo_data $(DEMO_IMAGE)
	$(PY) demo/inference_with_prompts.py --prompt-type all --model-type $(MODEL_TYPE) \
	  $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--download) \
	  --input $(DEMO_IMAGE) --output-dir outputs/demo
	$(PY) demo/inference_with_amg.py --model-type $(MODEL_TYPE) \
	  $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--download) \
	  --input $(DEMO_IMAGE) --output outputs/demo/amg.png

test: install web-runtime
	$(PY) -m pytest -q tests --durations=30

# CPU benchmarks against Meta's implementation (slow; the benchmark decoder of amg.py --trained is trained
# once and cached in benchmarks/.cache), then BENCHMARKS.md and README.md's speed figures from the results.
# Each runs under glibc's default allocator and under the tuned one (both libraries alike in one process).
# Automatic mask generation runs only on the trained decoder: random weights keep 0 or 1 records.
bench: install
	$(PY) benchmarks/cpu_encoder.py --model vit_b --rounds 5 --out benchmarks/results/cpu_encoder_vit_b.json
	$(PY) benchmarks/cpu_encoder.py --model vit_b --rounds 5 --tuned-allocator --out benchmarks/results/cpu_encoder_vit_b_tuned.json
	$(PY) benchmarks/prompts.py --model vit_b --dtype bfloat16 --rounds 5 --out benchmarks/results/prompts_vit_b_bf16.json
	$(PY) benchmarks/prompts.py --model vit_b --dtype bfloat16 --rounds 5 --tuned-allocator --out benchmarks/results/prompts_vit_b_bf16_tuned.json
	$(PY) benchmarks/amg.py --model vit_b --trained --rounds 3 --out benchmarks/results/amg_vit_b_trained.json
	$(PY) benchmarks/amg.py --model vit_b --trained --rounds 2 --tuned-allocator --out benchmarks/results/amg_vit_b_trained_tuned.json
	$(PY) benchmarks/encoder_memory.py --model vit_b --out benchmarks/results/encoder_memory_vit_b.json
	$(PY) benchmarks/amg_memory.py --trained --code $$(git rev-parse --short HEAD)
	$(PY) benchmarks/onnx_cpu.py --model vit_b --rounds 3 --prompt-calls 10 --out benchmarks/results/onnx_cpu_vit_b.json
	$(PY) benchmarks/loader_epochs.py --rev 4cd648d --out benchmarks/results/loader_epochs.json
	$(PY) benchmarks/page_latency.py --model vit_tiny --hovers 40 --out benchmarks/results/page_latency_vit_tiny.json
	$(PY) benchmarks/page_latency.py --model vit_b --hovers 40 --out benchmarks/results/page_latency_vit_b.json
	$(PY) benchmarks/report.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache node_modules $(WEB_RUNTIME)

# The web page on the demo photo (opened at once, being the only image of --images): http://127.0.0.1:8000/
.PHONY: serve
serve: install
	$(PY) -m samkit.commands.demo_data $(DEMO_IMAGE)
	$(PY) -m samkit serve --model-type $(MODEL_TYPE) \
	  $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--download) --images $(dir $(DEMO_IMAGE))

# requirements.txt is generated from pyproject.toml (tests/test_packaging.py checks that they agree).
.PHONY: requirements
requirements:
	$(PYTHON) scripts/write_requirements.py
