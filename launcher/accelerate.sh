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

nproc=""
device="npu"
args=()
while (($#)); do
    case "$1" in
        --nproc) nproc="${2:?--nproc needs a number}"; shift 2 ;;
        --nproc=*) nproc="${1#--nproc=}"; shift ;;
        --device_type) device="${2:-}"; args+=("$1" "${2:-}"); shift 2 || shift ;;
        --device_type=*) device="${1#--device_type=}"; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
count() { local IFS=,; local a=($1); echo "${#a[@]}"; }
if [[ -z "$nproc" ]]; then
    if [[ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]]; then
        nproc="$(count "$ASCEND_RT_VISIBLE_DEVICES")"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        nproc="$(count "$CUDA_VISIBLE_DEVICES")"
    else
        echo "error: how many ranks? set ASCEND_RT_VISIBLE_DEVICES or CUDA_VISIBLE_DEVICES, or pass --nproc N" >&2
        exit 2
    fi
fi
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --nproc $nproc is not a positive number of ranks" >&2
    exit 2
fi
if [[ "$device" == "npu" ]]; then
    export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:False}"
fi
# --multi_gpu is accelerate's name for "start N ranks through torchrun"; it also works for npu and cpu ranks.
exec "${ACCELERATE:-accelerate}" launch --config_file "$here/accelerate.yaml" --multi_gpu --num_processes "$nproc" \
    --num_machines 1 --mixed_precision no --dynamo_backend no "$here/../scripts/quant_qwen2vl.py" "${args[@]}"
