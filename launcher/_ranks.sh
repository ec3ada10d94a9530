# Sourced by torchrun.sh and accelerate.sh: read --nproc out of "$@" (the rest stays in the array `args`), pick the
# rank count (--nproc, else ASCEND_RT_VISIBLE_DEVICES, else CUDA_VISIBLE_DEVICES) into `nproc`, and for npu runs
# (the seed's default --device_type) default PYTORCH_NPU_ALLOC_CONF to expandable_segments:False.
nproc=""
device="npu"
args=()
while (($#)); do
    case "$1" in
        --nproc) nproc="${2:?--nproc needs a number}"; shift 2 ;;
        --nproc=*) nproc="${1#--nproc=}"; shift ;;
        --device_type) device="${2:-}"; args+=("$1"); shift; if (($#)); then args+=("$1"); shift; fi ;;
        --device_type=*) device="${1#--device_type=}"; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
_count() { local IFS=,; local a=($1); echo "${#a[@]}"; }
if [[ -z "$nproc" ]]; then
    if [[ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]]; then
        nproc="$(_count "$ASCEND_RT_VISIBLE_DEVICES")"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        nproc="$(_count "$CUDA_VISIBLE_DEVICES")"
    else
        echo "error: how many ranks? set ASCEND_RT_VISIBLE_DEVICES (npu) or CUDA_VISIBLE_DEVICES (cuda) to the" \
             "cards to use, or pass --nproc N" >&2
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
