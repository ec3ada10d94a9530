"""Which rank holds which layers, and what each rank's memory will peak at; the --dry_run report.

Units are the vision blocks (with the patch embedding and merger) and the decoder layers, each with its byte size
from the safetensors headers. Rank 0 holds the vision tower and the embedding rows it reads; decoder layers are
split into contiguous slices. Memory is estimated per rank: one layer's weights at a time (the loop is
layer-major), the float32 working copy of the largest W8A8 weight during the merge, and the hidden states of
the calibration samples at one depth.
"""

from __future__ import annotations

import dataclasses

import torch

from . import qwen2vl
from .checkpoint import Checkpoint

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Unit:
    prefix: str  # "visual.blocks.3." or "model.layers.7."
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Plan:
    vision: tuple[Unit, ...]
    decoder: tuple[Unit, ...]
    slices: tuple[tuple[int, int], ...]  # per rank: [start, stop) of decoder layers
    other_bytes: int  # embeddings, merger, patch embed, final norm, lm_head
    total_bytes: int


def _unit_bytes(sizes: dict[str, int], prefix: str) -> int:
    return sum(n for name, n in sizes.items() if name.startswith(prefix))


def make_plan(ckpt: Checkpoint, arch: qwen2vl.Arch, world_size: int) -> Plan:
    sizes = {n: ckpt.nbytes(n) for n in ckpt.names()}
    vision = tuple(Unit(qwen2vl.VISION_BLOCK.format(i=i), _unit_bytes(sizes, qwen2vl.VISION_BLOCK.format(i=i)))
                   for i in range(arch.vision_depth))
    decoder = tuple(Unit(qwen2vl.DECODER_LAYER.format(i=i), _unit_bytes(sizes, qwen2vl.DECODER_LAYER.format(i=i)))
                    for i in range(arch.num_layers))
    total = sum(sizes.values())
    other = total - sum(u.nbytes for u in vision + decoder)
    per = -(-arch.num_layers // world_size)
    slices = tuple((min(r * per, arch.num_layers), min((r + 1) * per, arch.num_layers)) for r in range(world_size))
    return Plan(vision, decoder, slices, other, total)


def peak_bytes(plan: Plan, arch: qwen2vl.Arch, dtype: torch.dtype, images: int = 30, tokens: int = 1024) -> int:
    """Estimated peak memory of rank 0 at world size 1: largest layer + activations + merge working set."""
    el = torch.empty(0, dtype=dtype).element_size()
    largest = max(u.nbytes for u in plan.vision + plan.decoder)
    hidden = images * tokens * arch.hidden_size * el
    inter = tokens * arch.intermediate_size * 4 * 3  # one sample's MLP intermediates in float32
    merge = max(arch.intermediate_size, arch.vocab_size) * arch.hidden_size * 4  # float32 copy of one weight
    return largest + hidden + inter + merge


def report(plan: Plan, arch: qwen2vl.Arch, dtype: torch.dtype) -> str:
    lines = [
        f"model: {len(plan.vision)} vision blocks, {len(plan.decoder)} decoder layers, "
        f"{plan.total_bytes / GIB:.2f} GiB of weights ({str(dtype).replace('torch.', '')})",
    ]
    for r, (a, b) in enumerate(plan.slices):
        layer_bytes = sum(u.nbytes for u in plan.decoder[a:b])
        extra = " + vision tower + embeddings" if r == 0 else ""
        lines.append(f"rank {r}: decoder layers {a}..{b - 1} ({layer_bytes / GIB:.2f} GiB){extra}")
    lines.append(f"estimated peak memory per rank (30 images x 1024 tokens): "
                 f"{peak_bytes(plan, arch, dtype) / GIB:.2f} GiB")
    return "\n".join(lines)
