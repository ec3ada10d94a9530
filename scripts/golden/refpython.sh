#!/usr/bin/env bash
# Run a Python script in the reference tool's side venv (msModelSlim 26.1.0), creating the venv if needed:
#
#     scripts/golden/refpython.sh SCRIPT.py [args]     (make_golden.sh and quality.sh use it)
#
# REFVENV (default /work/refvenv) is a side venv with the reference tool; it is created if it has no msmodelslim.
# It is never the project venv: the reference needs transformers 4.46.0, qwenvl-dq is pinned to 5.x.
# torch goes in first (torch==2.13.0 resolves to the CPU wheel; anything else first would pull a CUDA build).
# torchvision is never installed: qwen_vl_utils imports it at import time, so a minimal stub is written to a temp
# dir and put on PYTHONPATH (transformers still reports torchvision as unavailable, as the stub has no dist-info,
# and uses its PIL/numpy image processor).
#
# msModelSlim's example script (example/multimodal_vlm/Qwen2-VL/quant_qwen2vl.py) is NOT needed: make_golden.py
# calls the library (Calibrator, QuantConfig) itself. Only the config.json rewrite and the tokenizer-file copy live
# in the example tree (example/common/vlm_utils.py). make_golden.py uses them when REF_EXAMPLE (default
# /work/ref_example) holds an msModelSlim 26.1.0 checkout, e.g.
#     git clone --depth 1 --branch 26.1.0 https://github.com/Ascend/msmodelslim "$REF_EXAMPLE"
# and otherwise falls back to a stand-in of that behaviour; each manifest records which one ran (meta.config_source).
set -euo pipefail
REFVENV="${REFVENV:-/work/refvenv}"
export REF_EXAMPLE="${REF_EXAMPLE:-/work/ref_example}"

if ! "$REFVENV/bin/python" -c "import msmodelslim, transformers; assert transformers.__version__ == '4.46.0'" \
        >/dev/null 2>&1; then
    echo "setting up the reference venv in $REFVENV" >&2
    [ -x "$REFVENV/bin/python" ] || python3 -m venv "$REFVENV"
    "$REFVENV/bin/python" -m pip install -q --upgrade pip
    "$REFVENV/bin/python" -m pip install -q "torch==2.13.0"
    WHEELS="$(mktemp -d)"
    "$REFVENV/bin/python" -m pip download -q --no-deps -d "$WHEELS" "msmodelslim==26.1.0"
    # the wheel's declared deps are light (easydict, einops, pydantic, wcmatch, accelerate, requests, scipy, pygtrie)
    "$REFVENV/bin/python" -m pip install -q "$WHEELS"/msmodelslim-26.1.0-*.whl "transformers==4.46.0" \
        "qwen-vl-utils==0.0.14" "safetensors==0.8.0" "accelerate==1.15.0" pillow numpy
    rm -rf "$WHEELS"
    if "$REFVENV/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
        "$REFVENV/bin/python" -m pip uninstall -y -q torchvision
    fi
fi

STUB="$(mktemp -d)"
trap 'rm -rf "$STUB"' EXIT
mkdir -p "$STUB/torchvision/transforms"
cat > "$STUB/torchvision/__init__.py" <<'EOF'
"""torchvision stub for the golden run: qwen_vl_utils imports it; only its image path (PIL) is used."""
__version__ = "0.28.0+stub"
from . import io, transforms  # noqa: F401
EOF
cat > "$STUB/torchvision/io.py" <<'EOF'
def read_video(*args, **kwargs):
    raise RuntimeError("torchvision stub: no video")
EOF
cat > "$STUB/torchvision/transforms/__init__.py" <<'EOF'
import enum
from . import functional  # noqa: F401


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
EOF
cat > "$STUB/torchvision/transforms/functional.py" <<'EOF'
def resize(*args, **kwargs):
    raise RuntimeError("torchvision stub: no video resize")
EOF

PYTHONPATH="$STUB${PYTHONPATH:+:$PYTHONPATH}" "$REFVENV/bin/python" "$@"
