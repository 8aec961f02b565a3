#!/usr/bin/env bash
# Training and generation benchmarks on one GPU against the transformers baseline, in under
# 8 minutes: bf16 autocast, torch.compile for both models, the 1b preset for MFU, then the
# generation benchmark when it is present. Needs torch (CUDA), transformers, safetensors; no network.
#   bash bench/gpu.sh            (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python}"
status=0

section() { printf '\n==== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.version.cuda)"

section "training: 1b preset, batch 8x2048, bf16, compiled (ours vs transformers)"
timeout 300 "$PY" bench/train_bench.py --device cuda --preset 1b --batch 8 --compile --no-plain --warmup 3 --steps 3 --reps 5 || status=1

section "training: the ~5M CPU shape on the GPU, batch 8x256, bf16, eager"
timeout 60 "$PY" bench/train_bench.py --device cuda --warmup 3 --steps 10 --reps 5 || status=1

if [ -f bench/generate_bench.py ]; then
  section "generation"
  timeout 120 "$PY" bench/generate_bench.py --device cuda || status=1
else
  section "generation: bench/generate_bench.py not present, skipped"
fi
exit $status
