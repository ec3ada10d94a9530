#!/usr/bin/env bash
# Start one qwenvl-dq rank per card with torchrun; every other argument goes to scripts/quant_qwen2vl.py
# (the reference script's flags, see README.md).
#
#   ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 launcher/torchrun.sh --model_path M --save_directory OUT --mindie_format
#   CUDA_VISIBLE_DEVICES=0,1 launcher/torchrun.sh --device_type cuda --model_path M --save_directory OUT
#   launcher/torchrun.sh --nproc 2 --device_type cpu --model_path M --save_directory OUT
#
# Ranks per host: --nproc N, else one per card in ASCEND_RT_VISIBLE_DEVICES, else in CUDA_VISIBLE_DEVICES.
# Several hosts (see slurm.sbatch): NNODES, NODE_RANK and RDZV_ENDPOINT (host:port of node 0), RDZV_ID (job id).
# PYTHON picks the interpreter (default: python3). For npu runs PYTORCH_NPU_ALLOC_CONF defaults to
# expandable_segments:False, as msModelSlim's example sets it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

source "$(dirname "${BASH_SOURCE[0]}")/_ranks.sh"

nnodes="${NNODES:-1}"
if [[ "$nnodes" == 1 ]]; then
    rdzv=(--standalone)
else
    : "${RDZV_ENDPOINT:?with NNODES>1 set RDZV_ENDPOINT=host:port of node 0}"
    rdzv=(--nnodes "$nnodes" --node_rank "${NODE_RANK:?with NNODES>1 set NODE_RANK}" --rdzv_backend c10d
          --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-qwenvl-dq}")
fi
exec "${PYTHON:-python3}" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$nproc" \
    "$root/scripts/quant_qwen2vl.py" "${args[@]}"
