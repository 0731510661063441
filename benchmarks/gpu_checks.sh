#!/usr/bin/env bash
# The GPU checks of issue 15, as one prepared run for a session that is lent a GPU (H100/H200):
#   run: bash benchmarks/gpu_checks.sh   (about 10-11 minutes; results under $OUT, else benchmarks/results)
# then copy the JSON files into benchmarks/results/ and run `python benchmarks/report.py`.
# Carry the benchmark decoder: `carry: ["benchmarks/.cache"]` (the AMG step loads the newest file there;
# without it that step is skipped, since training it there would take ~7 of the 15 device minutes).
# Each step is independent: one that fails is reported and the next one still runs.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
$PY -m pip install -q --no-deps -e . >/dev/null 2>&1 || echo "note: pip install -e . failed; using the tree as is"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
step() { echo "== $*"; "$@" || echo "!! failed ($?): $*"; }
# The fused relative-position attention kernel against the dense-bias attention, in bf16 on the GPU.
step $PY -m pytest -q tests/test_rel_pos_kernel.py
# Encoder throughput: Meta fp32, samkit fp32/bf16 (fused kernel), bf16 with the dense bias, compiled.
step $PY benchmarks/gpu_encoder.py --models vit_b --batches 1,8,32 --meta-batches 8 --iters 10 --budget 3 \
  --compile --dense-bias --note 'fused relative-position attention (Triton)' --out "$OUT/gpu_encoder_vit_b_fused.json"
step $PY benchmarks/gpu_encoder.py --models vit_h --batches 1,8 --meta-batches 1 --iters 10 --budget 3 \
  --compile --compile-batches 8 --dense-bias --note 'fused relative-position attention (Triton)' \
  --out "$OUT/gpu_encoder_vit_h_fused.json"
# Box fine-tuning in the steady state (30 steps per epoch).
step $PY benchmarks/train_step.py --model vit_b --amp bf16 --images 480 --batch-size 16 --objects 16 --epochs 2 \
  --workers 12 --out "$OUT/train_step_vit_b_gpu.json"
# Point-prompt fine-tuning next to the box run (3 rounds per batch).
step $PY benchmarks/train_step.py --model vit_b --amp bf16 --images 160 --batch-size 16 --objects 16 --epochs 2 \
  --workers 12 --prompt-mode point --rounds 3 --out "$OUT/train_step_vit_b_point_gpu.json"
# AMG on the GPU with the trained benchmark decoder (hundreds of records), Meta's generator on the same GPU.
TRAINED=$(ls -t benchmarks/.cache/trained_decoder/*.pt 2>/dev/null | head -1)
if [ -n "$TRAINED" ]; then
  step $PY benchmarks/amg.py --model vit_b --trained --trained-file "$TRAINED" --device cuda --rounds 3 \
    --out "$OUT/amg_vit_b_trained_gpu.json"
else
  echo "!! skipped: AMG on the GPU needs benchmarks/.cache/trained_decoder (carry it)"
fi
