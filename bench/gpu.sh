#!/usr/bin/env bash
# Run a Python script from this checkout on a lent GPU machine (no pip install there, nothing
# can be fetched): exposes this folder as the package `comfyui_quantizer` and runs python3.
#   bash bench/gpu.sh bench/kernels.py [args...]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pkg=$(mktemp -d)
ln -s "$root" "$pkg/comfyui_quantizer"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 "$@"
