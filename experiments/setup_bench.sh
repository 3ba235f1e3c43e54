#!/usr/bin/env bash
# Creates or updates the benchmark virtualenv: maskjax (editable) + CPU PyTorch + timm, for experiments/bench_train.py.
#
#   bash experiments/setup_bench.sh [VENV_DIR]        # default VENV_DIR: <repo>/.venv-bench
#   VENV_DIR/bin/python experiments/bench_train.py
#
# Why not simply `pip install timm`: timm depends on torch and torchvision, and an unpinned resolve pulls the CUDA
# build of torch (several GB of nvidia-* wheels) onto a CPU machine. So the CPU torch wheel goes in first, then
# timm and torchvision with --no-deps and timm's light dependencies by name. PyPI's torchvision is built against
# the CUDA torch, so its compiled ops do not load with the CPU torch; bench_train.py declares the one op schema
# torchvision's import needs (`torchvision::nms`) with torch.library before importing timm. Nothing in the
# benchmark uses torchvision's compiled ops.
#
# torch==2.13.0 resolves to a local CPU wheel (torch-2.13.0+cpu) on this project's machines. Elsewhere, point pip
# at PyTorch's CPU wheels, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-bench}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"  # The torchvision release paired with torch 2.13.
TIMM_VERSION="1.0.29"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)

"${PIP[@]}" --upgrade pip
"${PIP[@]}" ${TORCH_PIP_ARGS:-} "torch==$TORCH_VERSION"
"${PIP[@]}" -e "$REPO"
"${PIP[@]}" --no-deps "torchvision==$TORCHVISION_VERSION" "timm==$TIMM_VERSION"
"${PIP[@]}" "huggingface_hub>=0.20" "safetensors>=0.4" "pyyaml>=6.0"

REPO="$REPO" "$VENV/bin/python" - <<'EOF'
import os
import torch
if torch.version.cuda is not None:
    raise SystemExit(f"setup_bench.sh: got a CUDA build of torch ({torch.__version__}); set TORCH_PIP_ARGS to a "
                     "CPU wheel index and rerun")
import sys
sys.path.insert(0, os.path.join(os.environ["REPO"], "experiments"))
from bench_train import register_missing_torchvision_ops
register_missing_torchvision_ops(torch)
import jax, timm
print(f"bench venv ready: torch {torch.__version__}, timm {timm.__version__}, jax {jax.__version__}")
EOF
echo "Run: $VENV/bin/python $REPO/experiments/bench_train.py"
