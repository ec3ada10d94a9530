"""The single seam for ranks and devices: the only module that imports torch.distributed.

Rank, world size and local rank come from the launcher's environment (torchrun / accelerate set RANK, WORLD_SIZE,
LOCAL_RANK); the backend follows the device (cpu -> gloo, cuda -> nccl, npu -> hccl after `import torch_npu`).
At world size 1 every helper is an identity and no process group is created.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .errors import UserError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the npu device with torch)
        except ImportError:
            raise UserError("device_type: npu needs torch_npu, which is not installed; install the torch_npu wheel "
                            "matching your torch and CANN (pip install torch-npu==<your torch version>), "
                            "or pass --device_type cpu") from None
        if not torch.npu.is_available():
            raise UserError("device_type: npu, but torch_npu sees no NPU; "
                            "check ASCEND_RT_VISIBLE_DEVICES and the driver")
        count = torch.npu.device_count()
    elif device_type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device_type: cuda, but torch sees no GPU (torch.cuda.is_available() is False); "
                            "pass --device_type cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
    else:
        return torch.device("cpu")
    if local_rank >= count:
        raise UserError(f"device_type: local rank {local_rank} needs card {local_rank}, but only {count} "
                        f"{device_type} devices are visible; start at most {count} ranks per host")
    return torch.device(device_type, local_rank)


def device_for(device_type: str) -> torch.device:
    """This process's device (card LOCAL_RANK) for a single-process tool such as evaluate."""
    return _device(device_type, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_type: str) -> Dist:
    """Read the launcher's environment and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        raise UserError(f"WORLD_SIZE={world}: multi-rank calibration is not available in this version; "
                        "run one process (unset WORLD_SIZE / start without torchrun)")
    return Dist(rank, world, local, _device(device_type, local))
