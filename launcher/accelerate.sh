#!/usr/bin/env bash
# Start one qwenvl-dq rank per card with `accelerate launch` (accelerate.yaml); other arguments go to
# scripts/quant_qwen2vl.py. Ranks: --nproc N, else one per card in ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES.
#
#   ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 launcher/accelerate.sh --model_path M --save_directory OUT --mindie_format
#   launcher/accelerate.sh --nproc 2 --device_type cpu --model_path M --save_directory OUT
#
# ACCELERATE picks the accelerate executable (default: accelerate on PATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

source "$(dirname "${BASH_SOURCE[0]}")/_ranks.sh"
# --multi_gpu is accelerate's name for "start N ranks through torchrun"; it also works for npu and cpu ranks.
exec "${ACCELERATE:-accelerate}" launch --config_file "$here/accelerate.yaml" --multi_gpu --num_processes "$nproc" \
    --num_machines 1 --mixed_precision no --dynamo_backend no "$here/../scripts/quant_qwen2vl.py" "${args[@]}"
