"""Which rank holds which layers, and what each rank's memory will peak at; the --dry_run report.

Sizes come from config.json alone (the checkpoint table in the adapter times the dtype's width), so a plan can be
printed for any config, weights or not, and every rank computes the same one. Rank 0 holds the vision tower (blocks,
patch embedding, merger) and reads the embedding rows it needs; the decoder layers are split into contiguous
slices, one per rank, each rank at least one layer, so that the largest calibration work (rank 0's counting the
vision tower) is as small as it can be. A rank's work is counted in floating-point operations (costs): every sample
through each unit once (linears, and attention over the sample's tokens: the vision tower runs
merge_size^2 patches per image token and attends over the whole image, Qwen2.5-VL's windowed blocks over a
window), plus, when smoothing, the search: every candidate on a proxy of the group, the finalists on the whole
reservoir (smooth.py). By bytes the 72B tower is 0.8 of a decoder layer, by work 3.8 (m2): balanced by bytes,
rank 0 got 10 layers of 80 on 8 ranks and was the slowest stage by 25%; by work it gets 3, the others 11. Operations
are not seconds: timed per unit on this project's medium model (1 CPU thread, 30 images of 188 tokens), the vision
blocks' forward took 1.39x a decoder layer's against 1.64x counted, their search 0.71x a layer's against 0.66x,
and a layer's search 0.56x two of its forward sweeps against 1.34x counted (int8 matmuls run faster than
float32; counted when calibration ran two sweeps, before the smoothed groups' inputs were kept instead).

A rank holds its whole slice (resident) when it fits its memory budget and there is another rank to overlap with:
samples then stream through the ranks one at a time (pipeline), and with m2/m4 it keeps every token of its
layers' smoothed groups' inputs until the sweep ends (calibrate.Store: rank 0's vision tower's too, 4 patches per
image token). Otherwise it streams its layers one at a time (layer-major), which needs every sample's hidden states
at one depth instead and keeps one layer's inputs. Both give the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import qwen2vl, smooth
from .errors import UserError
from .observers import RESERVOIR_TOKENS

GIB = 1 << 30
TOKENS = 1024  # tokens per calibration sample assumed by the estimate (a 1024-token image at the default pixels)


@dataclasses.dataclass(frozen=True)
class RankPlan:
    rank: int
    layers: tuple[int, int]  # [start, stop) of decoder layers
    weights: int  # bytes of the layers it holds (rank 0: with the vision tower)
    resident: bool  # holds its whole slice; else streams it layer by layer
    peak: int  # estimated peak bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    ranks: tuple[RankPlan, ...]
    total_bytes: int  # every tensor of the checkpoint
    budget: int | None  # per-rank memory budget the plan was made for
    images: int
    tokens: int  # tokens per image the layers were balanced for (the images' mean)
    peak_tokens: int = TOKENS  # tokens per image the peaks are estimated for: TOKENS, or the longest image's


def sizes(arch: qwen2vl.Arch, dtype: torch.dtype) -> tuple[int, tuple[int, ...], int]:
    """(vision tower bytes, bytes per decoder layer, total bytes) from the adapter's checkpoint table."""
    el = torch.empty(0, dtype=dtype).element_size()
    vision, total = 0, 0
    layers = [0] * arch.num_layers
    for name, shape in qwen2vl.checkpoint_shapes(arch).items():
        n = el
        for d in shape:
            n *= d
        total += n
        if name.startswith("visual."):
            vision += n
        elif name.startswith("model.layers."):
            layers[int(name.split(".")[2])] += n
    return vision, tuple(layers), total


def _linears(shapes: dict[str, tuple[int, ...]], prefix: str) -> list[tuple[int, int]]:
    """(out, in) of every linear weight under prefix."""
    return [s for n, s in shapes.items() if n.startswith(prefix) and n.endswith(".weight") and len(s) == 2]


def _search(linears: list[tuple[int, int]]) -> int:
    """Operations of smoothing one unit: every candidate on the proxy (PROXY_TOKENS tokens, PROXY_ROWS rows of each
    linear), the finalists and the unsmoothed candidate on the whole reservoir (smooth._pick)."""
    return sum(2 * i * (smooth.M2_GRID * smooth.PROXY_TOKENS * min(o, smooth.PROXY_ROWS)
                        + (smooth.FINALISTS + 1) * RESERVOIR_TOKENS * o) for o, i in linears)


def costs(arch: qwen2vl.Arch, images: int, tokens: int = TOKENS,
          smoothing: bool = True) -> tuple[int, tuple[int, ...]]:
    """(vision tower, each decoder layer): operations of calibrating it on `images` images of `tokens` tokens."""
    shapes = qwen2vl.checkpoint_shapes(arch)
    patches = tokens * arch.vision_merge_size ** 2
    window = (arch.vision_window_size // arch.vision_patch_size) ** 2 if arch.vision_window_size else patches
    vision = 2 * patches * sum(math.prod(s) for n, s in shapes.items() if n.startswith("visual.patch_embed."))
    vision += 2 * tokens * sum(o * i for o, i in _linears(shapes, "visual.merger."))
    search = 0
    for b in range(arch.vision_depth):
        lin = _linears(shapes, f"visual.blocks.{b}.")
        span = patches if b in arch.vision_fullatt_blocks or not arch.vision_window_size else min(window, patches)
        vision += 2 * patches * sum(o * i for o, i in lin) + 4 * patches * span * arch.vision_embed_dim
        search += _search(lin) if smoothing else 0
    vision = images * vision + search
    layers = []
    for i in range(arch.num_layers):
        lin = _linears(shapes, f"model.layers.{i}.")
        fwd = 2 * tokens * sum(o * x for o, x in lin) + 4 * tokens * tokens * arch.hidden_size
        layers.append(images * fwd + (_search(lin) if smoothing else 0))
    return vision, tuple(layers)


def partition(first: int, costs: tuple[int, ...], ranks: int) -> tuple[tuple[int, int], ...]:
    """Contiguous slices of `costs` (of the decoder layers), one non-empty slice per rank, minimising the largest
    load, where rank 0's load also counts `first` (the vision tower's). Ties go to the split that gives earlier
    ranks fewer layers (deterministic)."""
    n = len(costs)
    if ranks > n:
        raise UserError(f"world size: {ranks} ranks but the model has only {n} decoder layers; every rank needs at "
                        f"least one, so start at most {n} ranks")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @functools.lru_cache(maxsize=None)
    def best(r: int, start: int) -> tuple[int, tuple[int, ...]]:
        """(max load, cut points) for ranks r.. over layers start..n."""
        base = first if r == 0 else 0
        if r == ranks - 1:
            return base + prefix[n] - prefix[start], ()
        out = None
        for stop in range(start + 1, n - (ranks - 1 - r) + 1):
            load = base + prefix[stop] - prefix[start]
            rest, cuts = best(r + 1, stop)
            cand = (max(load, rest), (stop,) + cuts)
            if out is None or cand[0] < out[0]:
                out = cand
        return out

    cuts = (0,) + best(0, 0)[1] + (n,)
    return tuple((cuts[i], cuts[i + 1]) for i in range(ranks))


def kept_widths(arch: qwen2vl.Arch, anti_method: str) -> tuple[int, int]:
    """(decoder layer, vision block): the channels per token (per patch for the vision block) of the inputs a unit
    keeps for its smoothed groups (calibrate.Store)."""
    if anti_method == "none":
        return 0, 0
    widths = {"input_layernorm": arch.hidden_size, "post_attention_layernorm": arch.hidden_size,
              "self_attn.v_proj": arch.num_heads * arch.head_dim}
    decoder = sum(widths[g.source] for g in qwen2vl.smooth_groups("decoder", anti_method, arch))
    return decoder, arch.vision_embed_dim * len(qwen2vl.smooth_groups("vision", anti_method, arch))


def _peak(arch: qwen2vl.Arch, dtype: torch.dtype, weights: int, largest: int, n_layers: int, resident: bool,
          images: int, smoothing: bool, main: bool, last: bool, src_el: int, tokens: int = TOKENS,
          kept: tuple[int, int] = (0, 0)) -> int:
    """dtype: what the live layers hold and compute in; weights and largest: their bytes in it; src_el: the
    checkpoint dtype's width; kept: kept_widths. A unit's weights are quantized and written as soon as it is
    solved, while the rank still holds its layers (output.py), so that work adds to what is held; the token
    embeddings (rank 0) and the head (the last rank) are written after calibration, from the checkpoint."""
    el = torch.empty(0, dtype=dtype).element_size()
    # the smoothed groups' inputs, every token of every image, in the compute dtype: per decoder layer and per
    # vision block (merge_size^2 patches per token)
    layer_kept = images * tokens * kept[0] * el
    block_kept = images * tokens * arch.vision_merge_size ** 2 * kept[1] * el
    work = tokens * (arch.intermediate_size * 3 + arch.hidden_size * 4) * 4  # one sample's float32 intermediates
    # quantizing the largest linear: its weight in the source dtype and the int8 result (int8.quantize_weight
    # works in blocks of rows, so no full float32 copy)
    quant = arch.intermediate_size * arch.hidden_size * (src_el + 1)
    # token reservoirs (float32) of the smoothed groups: q/k/v and gate/up read `hidden`, o_proj reads heads * dim
    reservoir = RESERVOIR_TOKENS * arch.hidden_size * 3 * 4 if smoothing else 0
    if resident:
        held = weights + reservoir * n_layers + 2 * tokens * arch.hidden_size * el
        held += layer_kept * n_layers + (block_kept * arch.vision_depth if main else 0)
    else:
        held = largest + reservoir + images * tokens * arch.hidden_size * el
        held += max(layer_kept, block_kept if main else 0)
    # (rank 0 writes every tensor from the checkpoint after calibration when save_directory is not shared)
    rest = max(arch.vocab_size * arch.hidden_size * src_el, quant) if main or last else 0
    return max(held + max(work, quant), rest + tokens * arch.hidden_size * 4)


def make_plan(arch: qwen2vl.Arch, dtype: torch.dtype, world_size: int, budget: int | None = None,
              images: int = 30, anti_method: str = "m2", compute: torch.dtype | None = None,
              tokens: int = TOKENS, longest: int = TOKENS) -> Plan:
    """compute: what calibration holds and runs the layers in (calibrate.compute_dtype); default the model dtype.
    tokens: per image, what the layers are balanced for; longest: the longest image's, the peaks are estimated for
    it when it exceeds TOKENS (rank 0 knows both once the images are read)."""
    vision, layers, total = sizes(arch, dtype)
    smoothing = anti_method != "none"
    peak_tokens = max(TOKENS, longest)
    slices = partition(*costs(arch, images, tokens, smoothing), world_size)
    compute = compute or dtype
    widen = torch.empty(0, dtype=compute).element_size() / torch.empty(0, dtype=dtype).element_size()
    largest = int(max(layers) * widen)
    ranks = []
    for r, (a, b) in enumerate(slices):
        weights = sum(layers[a:b]) + (vision if r == 0 else 0)
        held = int(weights * widen)
        kw = dict(n_layers=b - a, images=images, smoothing=smoothing, main=r == 0, last=r == world_size - 1,
                  src_el=torch.empty(0, dtype=dtype).element_size(), tokens=peak_tokens,
                  kept=kept_widths(arch, anti_method))
        resident_peak = _peak(arch, compute, held, largest, resident=True, **kw)
        resident = world_size > 1 and (budget is None or resident_peak <= budget)
        peak = resident_peak if resident else _peak(arch, compute, held, largest, resident=False, **kw)
        ranks.append(RankPlan(r, (a, b), weights, resident, peak))
    return Plan(tuple(ranks), total, budget, images, tokens, peak_tokens)


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def report(plan: Plan, arch: qwen2vl.Arch, dtype: torch.dtype) -> str:
    budget = "no memory budget given" if plan.budget is None else f"{size(plan.budget)} per rank"
    lines = [
        f"model: {arch.vision_depth} vision blocks, {arch.num_layers} decoder layers, "
        f"{size(plan.total_bytes)} of weights ({str(dtype).replace('torch.', '')})",
        f"plan: {len(plan.ranks)} ranks, {budget}, {plan.images} images x {plan.peak_tokens} tokens"
        + ("" if plan.tokens == plan.peak_tokens else f" (peaks; the layers balanced for {plan.tokens} tokens per "
                                                      "image)"),
    ]
    for r in plan.ranks:
        a, b = r.layers
        extra = " + vision tower" if r.rank == 0 else ""
        mode = "holds its slice, pipelined" if r.resident else "streams its layers one at a time"
        count = f"{b - a} layer{'s' if b - a > 1 else ''}{extra}"
        lines.append(f"rank {r.rank}: decoder layers {a}..{b - 1} ({count}): {size(r.weights)} of weights, {mode}, "
                     f"estimated peak {size(r.peak)}")
        if plan.budget is not None and r.peak > plan.budget:
            lines.append(f"  warning: rank {r.rank}'s estimated peak exceeds the budget; start more ranks")
    return "\n".join(lines)
