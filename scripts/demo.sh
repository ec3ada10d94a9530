#!/usr/bin/env bash
# Create or reuse .venv, install, build a tiny random Qwen2-VL, quantize it with the bundled images, show the output,
# evaluate it beside the float model on held-out images.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
OUT="${DEMO_DIR:-$PWD/out/demo}"
rm -rf "$OUT"
mkdir -p "$OUT"
python scripts/make_tiny_qwen2vl.py "$OUT/tiny-qwen2vl" >/dev/null
echo "built a tiny random Qwen2-VL in $OUT/tiny-qwen2vl"
# run from scripts/ as the reference is run: the default --calib_images ../calibImages is the bundled folder
(cd scripts && python quant_qwen2vl.py --model_path "$OUT/tiny-qwen2vl" --save_directory "$OUT/quantized" \
    --w_bit 8 --a_bit 8 --device_type cpu --anti_method m2 --mindie_format --part_file_size 0.0002)
echo
echo "contents of $OUT/quantized:"
ls -l "$OUT/quantized"
python - "$OUT/quantized" <<'PY'
import json, sys, os
d = sys.argv[1]
desc = json.load(open(os.path.join(d, "quant_model_description_w8a8.json")))
kinds = {}
for k, v in desc.items():
    kinds[v] = kinds.get(v, 0) + 1
print("description:", kinds)
print("quantization_config:", json.load(open(os.path.join(d, "config.json")))["quantization_config"])
PY
echo
qwenvl-dq evaluate --model_path "$OUT/tiny-qwen2vl" --quantized "$OUT/quantized" --labels m2 \
    --images tests/data/heldout --report "$OUT/quality.json" --log_level warning
