#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: create or reuse a virtualenv and install qwenvl-dq into it.
# VENV (default .venv at the repo root) and TRANSFORMERS (default the pinned latest) may be set by the caller.
# torch goes in first: torch==2.13.0 resolves to the local CPU wheel, anything else first would pull a CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TORCH="${TORCH:-torch==2.13.0}"
TRANSFORMERS="${TRANSFORMERS:-transformers==5.24.0}"
# compressed-tensors (tests of --output_format compressed-tensors): transformers 5.x needs >= 0.15.0, and 0.13 and
# later import transformers.masking_utils, which 4.46 lacks (measured: 0.15.0.1-0.20.1 load under 5.24, <= 0.12.2
# under 4.46)
case "$TRANSFORMERS" in
    transformers==4.*) COMPRESSED_TENSORS="${COMPRESSED_TENSORS:-compressed-tensors==0.12.2}" ;;
    *) COMPRESSED_TENSORS="${COMPRESSED_TENSORS:-compressed-tensors==0.20.1}" ;;
esac
STAMP="$VENV/.qwenvl_dq_installed"
WANT="$TORCH $TRANSFORMERS $COMPRESSED_TENSORS $(cat "$ROOT/setup.cfg" "$ROOT/scripts/_venv.sh" | cksum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH"
    "$VENV/bin/python" -m pip install -q "$TRANSFORMERS" "$COMPRESSED_TENSORS" "accelerate==1.15.0" "safetensors==0.8.0" \
        "qwen-vl-utils==0.0.14" pillow numpy "pytest>=8" "matplotlib"
    "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
    # a CUDA torchvision next to the CPU torch breaks imports (operator torchvision::nms does not exist)
    if "$VENV/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip uninstall -y -q torchvision
    fi
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
