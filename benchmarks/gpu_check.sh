#!/usr/bin/env bash
# The accelerator check, in one call (a few minutes on one H100): MFU of ViT-B/16 bf16 training
# at 224 (batch 256), iGPT-S at 1024 tokens with cuDNN flash attention (batch 64), and KV-cache
# sampling tokens/s, on synthetic data. Needs jax, flax, optax, orbax-checkpoint, numpy only.
#   bash benchmarks/gpu_check.sh          # the real check
#   bash benchmarks/gpu_check.sh --dry    # tiny shapes, any machine
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
