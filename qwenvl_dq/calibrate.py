"""The calibration loop of one rank: samples through its layers with observers on the W8A8 linears' inputs.

Each rank runs a stage: rank 0 the vision tower, the merger and the decoder input (token embeddings with the image
embeddings scattered in, and the 3-D mrope positions), then its slice of decoder layers; rank r > 0 receives each
sample's hidden states and positions from rank r - 1, runs its slice and sends them on (plan.py decides the
slices). One sweep takes every sample through every unit once, through the float model as saved: its
activations propagate unsmoothed, so every statistic is the same whatever the number of ranks.

Without smoothing that sweep observes the activation ranges. With --anti_method m2/m4 it also records, for the
smoothed groups, per-channel statistics and keeps every token of their inputs (Store), from which the token
reservoirs the search scores on are cut; the other groups are observed as they are. Once every sample has passed
a unit, its factors are solved (smooth.py) and the smoothed groups' ranges are observed on their kept inputs as
the smoothed linears read them, (x - z) / s: the same values, to the rounding of the folded weights, that a
second sweep through the smoothed model would show them, without that sweep. The factors are then folded into the
live unit, which is quantized and written. Measured on the bench's medium model (8 layers, 30 images): m2 wall
36.3-37.4 -> 25.2-27.8 s, and the quality on held-out images no worse (logits cosine 0.8724 -> 0.8739, LLM SQNR
9.86 -> 9.92 dB).

A rank runs its stage in one of two orders with the same numbers: resident (its whole slice loaded, samples
streamed through one at a time, so rank r works on sample k while rank r + 1 works on sample k - 1; the slice's
kept inputs wait for the end of the sweep), or layer-major (one layer loaded at a time, every sample's hidden
states kept at one depth, one layer's inputs kept) when its slice does not fit, or when it is the only rank.

Results are name-keyed tensors for the merge: {"<linear>.input_scale": [1], "<linear>.input_offset": [1]} and the
smoothing factors {"<module>.smooth_*": [channels]}.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import nn

from . import allocator, qwen2vl
from .calib_data import Sample
from .checkpoint import Checkpoint
from .dist import Dist
from .journal import Journal
from . import smooth
from .observers import ActObserver, Reservoir

log = logging.getLogger(__name__)


def observe(module: nn.Module, prefix: str, groups, state: dict, histogram: bool | None = True,
            stores: dict | None = None) -> tuple[dict[tuple[str, ...], ActObserver], list]:
    """Attach one observer per group of linears (hooked on the group's first linear) and, for the groups in
    `stores`, keep their input too (state["k"] is the sample being run). histogram=False: the observers keep
    per-channel ranges only; None: no observer, only the stores. Returns (observers, hooks)."""
    observers, hooks = {}, []
    for group in groups:
        key = tuple(prefix + n for n in group)
        obs = None if histogram is None else ActObserver(histogram=histogram)
        kept = (stores or {}).get(key)

        def hook(_m, args, o=obs, st=kept):
            if o is not None:
                o.update(args[0])
            if st is not None:
                st.add(state["k"], args[0])

        hooks.append(module.get_submodule(group[0]).register_forward_pre_hook(hook))
        if obs is not None:
            observers[key] = obs
    return observers, hooks


class Store:
    """Every token of one smoothed group's input, sample by sample, until the group's factors are known: then
    observed as the smoothed linears read it, (x - z) / s (each sample in order, as a forward would)."""

    def __init__(self, n_samples: int):
        self.xs: list[torch.Tensor | None] = [None] * n_samples

    def add(self, k: int, x: torch.Tensor) -> None:
        x = x.detach()
        self.xs[k] = allocator.outside_heap(x.reshape(-1, x.shape[-1]), x.dtype)  # outlives the search

    def reservoir(self) -> Reservoir:
        """The token reservoir the search scores on: a window of every sample (observers.Reservoir)."""
        r = Reservoir(len(self.xs))
        for k, x in enumerate(self.xs):
            r.add(k, x)
        return r

    def observe(self, scale: torch.Tensor, shift: torch.Tensor | None, histogram: bool) -> ActObserver:
        obs = ActObserver(histogram=histogram)
        for k, x in enumerate(self.xs):
            x = x.float()
            obs.update((x if shift is None else x - shift) / scale)
            self.xs[k] = None
        return obs


def solve(observers: dict[tuple[str, ...], ActObserver], act_method: str,
          symmetric: bool = False) -> dict[str, torch.Tensor]:
    """Static per-tensor activation qparams of every linear in every group (symmetric: every offset 0)."""
    out = {}
    for names, obs in observers.items():
        scale, offset = obs.qparams(act_method, symmetric)
        for n in names:
            out[n + ".input_scale"] = scale
            out[n + ".input_offset"] = offset
    return out


def solve_smoothing(kind: str, layer: nn.Module, prefix: str, method: str, arch: qwen2vl.Arch,
                    observers: dict, reservoirs: dict, calls: list,
                    act_symmetric: bool = False) -> dict[str, torch.Tensor]:
    """The anti-outlier factors of one layer, keyed '<module prefix>.<smooth key>' (see smooth.KEYS)."""
    out: dict[str, torch.Tensor] = {}
    for g in qwen2vl.smooth_groups(kind, method, arch):
        key = tuple(prefix + n for n in g.linears)
        obs, windows = observers[key], reservoirs[key].items()
        mods = [layer.get_submodule(n) for n in g.linears]
        row0, rows, tie = qwen2vl.v_layout(kind, arch) if g.v_rows else (0, 0, None)
        xs = [x for *_, x in windows]
        subset = None
        if g.output == "attention":  # attention runs on each window with its own rotary tables
            win_calls = [qwen2vl.window_call(calls[k], start, end) for k, start, end, _ in windows]
            output, attend = qwen2vl.group_output(kind, layer, g, win_calls)

            def subset(keep, win_calls=win_calls, g=g):
                return qwen2vl.group_output(kind, layer, g, [win_calls[i] for i in keep])
        else:  # token-wise outputs: one matrix of every window's tokens
            xs, (output, attend) = [torch.cat(xs)], qwen2vl.group_output(kind, layer, g, [])
        problem = smooth.Problem(
            x=xs, ch_min=obs.ch_min, ch_max=obs.ch_max,
            weights=[m.weight.float() for m in mods],
            biases=[None if m.bias is None else m.bias.float() for m in mods],
            output=output, tie=tie, rowwise=g.output != "attention", windows=subset,
            act_symmetric=act_symmetric, combine=qwen2vl.group_combine(layer, g), attend=attend)
        shift = None
        if method == "m2" and g.has_bias:
            shift = smooth.m2_shift(obs.ch_min, obs.ch_max)
            problem = smooth.shifted(problem, shift)
        s = smooth.m2_search(problem)[0] if method == "m2" else smooth.m4_search(problem)[0]
        for n in g.linears:
            out[f"{prefix}{n}.{smooth.IN_SCALE}"] = s
            if shift is not None:
                out[f"{prefix}{n}.{smooth.IN_SHIFT}"] = shift
        src = prefix + g.source
        if g.v_rows:
            v = s if tie is None else torch.zeros(rows).scatter(0, tie, s)
            r = torch.ones(layer.get_submodule(g.source).weight.shape[0])
            r[row0:row0 + rows] = v
            out[f"{src}.{smooth.OUT_SCALE}"] = r
        else:
            out[f"{src}.{smooth.NORM_SCALE}"] = s
            if shift is not None:
                out[f"{src}.{smooth.NORM_SHIFT}"] = shift
    return out


def compute_dtype(device_type: str, model_dtype: torch.dtype) -> torch.dtype:
    """What calibration computes in. On cpu the saved values are computed on in float32: a CPU without bf16/fp16
    units emulates them (measured on an AVX2 machine: a bf16 matmul at a third of float32's speed), and with them
    (AVX-512 BF16: twice float32's speed) bf16 would give other bytes than on CPUs without them; float32 does not
    depend on the CPU's bf16 units, and gives the same bytes on any rank count. A card computes in the model
    dtype."""
    return torch.float32 if device_type == "cpu" else model_dtype


def apply_smoothing(layer: nn.Module, prefix: str, factors: dict[str, torch.Tensor],
                    saved: torch.dtype | None = None) -> None:
    """Fold the factors into the live layer's parameters, rounded to the saved dtype exactly as the merge saves them
    (the live parameters hold saved values, in the compute dtype)."""
    for name, mod in layer.named_modules():
        f = smooth.module_factors(factors, prefix + name)
        if not f:
            continue
        params = dict(mod.named_parameters(recurse=False))
        folded = smooth.fold({k: v.to(saved or v.dtype) for k, v in params.items()}, f)
        for k, v in folded.items():
            setattr(mod, k, nn.Parameter(v.to(params[k].dtype), requires_grad=False))


def _smoothing_part(results: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in results.items() if k.rpartition(".")[2] in smooth.KEYS}


@dataclasses.dataclass
class Layer:
    """One vision block or decoder layer of a rank's stage, its observers through the sweep and what it keeps.

    With a journal, every result is saved as soon as it is known, and what a stopped run saved is used instead of
    solving again: a layer with its final results runs forward only (its saved factors folded in after); one with
    only its factors keeps its smoothed groups' inputs but skips their statistics and the search."""

    kind: str  # "vision" or "decoder"
    prefix: str  # checkpoint prefix, "visual.blocks.3." or "model.layers.7."
    module: nn.Module
    act_method: str
    anti_method: str
    arch: qwen2vl.Arch
    act_symmetric: bool = False
    dtype: torch.dtype | None = None  # the saved (model) dtype; None: the live parameters' own
    journal: Journal | None = None
    observers: dict = dataclasses.field(default_factory=dict)
    statistics: dict = dataclasses.field(default_factory=dict)  # smoothed groups: per-channel ranges for the search
    stores: dict = dataclasses.field(default_factory=dict)  # smoothed groups: every token of their inputs
    hooks: list = dataclasses.field(default_factory=list)
    results: dict = dataclasses.field(default_factory=dict)
    saved: dict | None = None  # from the journal: every result of this unit
    factors: dict | None = None  # from the journal: its anti-outlier factors only

    def __post_init__(self):
        if self.journal is not None:
            self.saved = self.journal.load(self.prefix, "final")
            if self.saved is None and self.smoothing:
                self.factors = self.journal.load(self.prefix, "smooth")

    @property
    def smoothing(self) -> bool:
        return self.anti_method != "none"

    @property
    def restored(self) -> bool:
        return self.saved is not None

    @property
    def groups(self):
        return qwen2vl.unit_groups(self.kind, self.arch)

    @property
    def run(self) -> Callable:
        return qwen2vl.run_vision_block if self.kind == "vision" else qwen2vl.run_decoder_layer

    def start(self, n_samples: int, state: dict) -> None:
        """Attach the sweep's observers: the smoothed groups keep every token of their input (Store) and, unless
        the journal has their factors, per-channel ranges (with the reservoirs cut from the kept inputs, all the
        search reads); the other groups get their final observers, with a histogram where the activation range
        comes from one."""
        self.observers, self.statistics, self.stores, self.hooks = {}, {}, {}, []
        if self.saved is not None:
            return  # what these observers would feed is in the journal
        smoothed = [g.linears for g in qwen2vl.smooth_groups(self.kind, self.anti_method, self.arch)] \
            if self.smoothing else []
        keys = [tuple(self.prefix + n for n in g) for g in smoothed]
        self.stores = {k: Store(n_samples) for k in keys}
        self.statistics, self.hooks = observe(self.module, self.prefix, smoothed, state,
                                              histogram=False if self.factors is None else None, stores=self.stores)
        rest = [g for g in self.groups if tuple(self.prefix + n for n in g) not in keys]
        self.observers, hooks = observe(self.module, self.prefix, rest, state,
                                        histogram=self.act_method == "histogram")
        self.hooks += hooks

    def finish(self, calls: list) -> dict[str, torch.Tensor]:
        """Detach; solve (or restore) the smoothing factors, observe the smoothed groups' kept inputs as the
        smoothed linears read them, fold the factors into the live unit, and solve the activation qparams.
        calls: every sample's call. Returns the unit's results."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.saved is not None:
            if self.smoothing:
                apply_smoothing(self.module, self.prefix, _smoothing_part(self.saved), self.dtype)
            self.results = dict(self.saved)
            return self.results
        if self.smoothing:
            if self.factors is not None:
                factors = self.factors
            else:
                with allocator.search_heap():
                    factors = solve_smoothing(self.kind, self.module, self.prefix, self.anti_method, self.arch,
                                              self.statistics,
                                              {k: st.reservoir() for k, st in self.stores.items()},
                                              [qwen2vl.unit_call(c, self.prefix) for c in calls],
                                              self.act_symmetric)
                if self.journal is not None:
                    self.journal.save(self.prefix, "smooth", factors)
            self.statistics = {}
            for key, store in self.stores.items():
                self.observers[key] = store.observe(factors[f"{key[0]}.{smooth.IN_SCALE}"],
                                                    factors.get(f"{key[0]}.{smooth.IN_SHIFT}"),
                                                    self.act_method == "histogram")
            self.stores = {}
            apply_smoothing(self.module, self.prefix, factors, self.dtype)
            self.results.update(factors)
        order = [tuple(self.prefix + n for n in g) for g in self.groups]
        self.results.update(solve({k: self.observers[k] for k in order}, self.act_method, self.act_symmetric))
        if self.journal is not None:
            self.journal.save(self.prefix, "final", self.results)
        self.observers = {}
        return self.results


@dataclasses.dataclass
class Stage:
    """What one rank runs, and how."""

    d: Dist
    model: nn.Module
    ckpt: Checkpoint
    arch: qwen2vl.Arch
    layers: tuple[int, int]  # [start, stop) of decoder layers
    resident: bool
    act_method: str
    anti_method: str = "none"
    act_symmetric: bool = False
    on_layer: Callable | None = None  # on_layer(prefix, restored) when a unit's results are known
    on_unit: Callable | None = None  # on_unit(prefix, live module, its results) before a finished module is released
    on_sample: Callable | None = None
    journal: Journal | None = None
    dtype: torch.dtype | None = None  # the saved (model) dtype; None: the live parameters' own
    compute: torch.dtype | None = None  # what the live layers hold and run in (compute_dtype); None: the saved one
    free_pixels: bool = False  # drop each sample's pixel values once the patch embedding has read them

    def read(self, name: str) -> torch.Tensor:
        """A source tensor on the device, floats in the compute dtype; on the cpu in a mapping of its own
        (allocator.outside_heap: it outlives the searches' temporaries)."""
        t = self.ckpt.get(name)
        dtype = self.compute if self.compute and t.is_floating_point() else t.dtype
        return allocator.outside_heap(t, dtype) if self.d.device.type == "cpu" else t.to(self.d.device, dtype)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        t = self.ckpt.rows(name, ids)
        return t.to(self.compute) if self.compute else t

    def up(self, h: torch.Tensor) -> torch.Tensor:
        """Activations into the compute dtype."""
        return h.to(self.compute) if self.compute else h

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """Activations between layers (and on the wire) are kept in the saved dtype, as the model runs. Layer-major,
        each waits for the next layer to have run every sample: on the cpu in a mapping of its own."""
        if not self.resident and h.device.type == "cpu":
            return allocator.outside_heap(h, self.dtype)
        return h.to(self.dtype) if self.dtype else h

    def step(self, u: "Layer", h: torch.Tensor, call) -> torch.Tensor:
        """One unit on one sample's hidden states; call: the sample's call (vision or decoder)."""
        return self.down(u.run(u.module, self.up(h), qwen2vl.unit_call(call, u.prefix)))

    def prefix(self, s: Sample) -> tuple[torch.Tensor, tuple]:
        """Rank 0: a sample's patch embeddings (kept in the saved dtype) and its vision blocks' call."""
        h, call = qwen2vl.vision_prefix(self.model, s.pixel_values.to(self.d.device),
                                        s.image_grid_thw.to(self.d.device))
        return self.down(h), call

    def call(self, h: torch.Tensor, positions: torch.Tensor):
        return qwen2vl.decoder_call(self.model, self.up(h), positions)

    def units(self) -> list[Layer]:
        kw = dict(act_method=self.act_method, anti_method=self.anti_method, arch=self.arch,
                  act_symmetric=self.act_symmetric, dtype=self.dtype, journal=self.journal)
        out = []
        if self.d.is_main:
            out += [Layer("vision", qwen2vl.VISION_BLOCK.format(i=i), m, **kw)
                    for i, m in enumerate(qwen2vl.vision_blocks(self.model))]
        blocks = qwen2vl.decoder_layers(self.model)
        out += [Layer("decoder", qwen2vl.DECODER_LAYER.format(i=i), blocks[i], **kw) for i in range(*self.layers)]
        return out

    def live(self, prefix: str) -> nn.Module:
        return qwen2vl.materialize(qwen2vl.named_module(self.model, prefix), prefix, self.read)

    def done(self, prefix: str, module: nn.Module, results: dict[str, torch.Tensor]) -> None:
        """A module whose results are final, still live (the patch embedding and the merger have none)."""
        if self.on_unit:
            self.on_unit(prefix, module, results)


def _to_decoder(stage: Stage, merger: nn.Module, sample: Sample, vision_out: torch.Tensor,
                vcall: qwen2vl.VisionCall) -> torch.Tensor:
    embeds = qwen2vl.run_merger(merger, stage.up(vision_out), vcall)
    return stage.down(qwen2vl.decoder_input(stage.rows, sample.input_ids, embeds, stage.arch.image_token_id,
                                            stage.d.device))


def run_resident(stage: Stage, units: list[Layer], samples: list[Sample] | None, n: int) -> dict[str, torch.Tensor]:
    """The whole slice loaded; the sweep streams the samples through it one at a time (pipeline)."""
    d, model = stage.d, stage.model
    results: dict[str, torch.Tensor] = {}
    vision = [u for u in units if u.kind == "vision"]
    decoder = [u for u in units if u.kind == "decoder"]
    vcalls, dcalls, positions = [None] * n, [None] * n, [None] * n
    state = {"k": 0}
    patch_embed = qwen2vl.vision_tower(model).patch_embed
    merger = qwen2vl.named_module(model, "visual.merger.")
    try:
        for u in units:
            qwen2vl.materialize(u.module, u.prefix, stage.read)
        if d.is_main:
            stage.live("visual.patch_embed.")
            stage.live("visual.merger.")
        for u in units:
            u.start(n, state)
        for k in range(n):
            state["k"] = k
            if d.is_main:
                s = samples[k]
                h, vcalls[k] = stage.prefix(s)
                if stage.free_pixels:  # read once (the caller's samples lose them)
                    s.pixel_values = None
                for u in vision:
                    h = stage.step(u, h, vcalls[k])
                positions[k] = qwen2vl.rope_index(model, s.input_ids, s.image_grid_thw, stage.arch.image_token_id)
                h = _to_decoder(stage, merger, s, h, vcalls[k])
            else:
                h, positions[k] = d.recv(d.rank - 1, f"sample {k}")
            dcalls[k] = stage.call(h, positions[k])
            for u in decoder:
                h = stage.step(u, h, dcalls[k])
            if not d.is_last:
                d.send([h, positions[k]], d.rank + 1, f"sample {k}")
            if stage.on_sample:
                stage.on_sample(k, n)
        searching = [u for u in units if u.saved is None and u.factors is None]
        if stage.anti_method != "none" and searching:
            log.info("searching the %s factors of this rank's %d layers", stage.anti_method, len(searching))
        for u in units:
            results.update(u.finish(vcalls if u.kind == "vision" else dcalls))
            stage.done(u.prefix, u.module, u.results)
            if stage.on_layer:
                stage.on_layer(u.prefix, u.restored)
        if d.is_main:
            stage.done("visual.patch_embed.", patch_embed, {})
            stage.done("visual.merger.", merger, {})
        d.wait_sends()
    finally:
        for m in [u.module for u in units] + ([patch_embed, merger] if d.is_main else []):
            qwen2vl.release(m)
        allocator.trim()
    return results


def _layer_major(stage: Stage, u: Layer, hiddens: list[torch.Tensor], calls: list) -> dict[str, torch.Tensor]:
    """One layer over every sample: `hiddens` (every sample's hidden states) replaced by its outputs."""
    qwen2vl.materialize(u.module, u.prefix, stage.read)
    results = {}
    state = {"k": 0}
    try:
        u.start(len(hiddens), state)
        for k in range(len(hiddens)):
            state["k"] = k
            hiddens[k] = stage.step(u, hiddens[k], calls[k])
        results.update(u.finish(calls))
        stage.done(u.prefix, u.module, u.results)
    finally:
        qwen2vl.release(u.module)
        allocator.trim()
    if stage.on_layer:
        stage.on_layer(u.prefix, u.restored)
    return results


def run_layer_major(stage: Stage, units: list[Layer], samples: list[Sample] | None,
                    n: int) -> dict[str, torch.Tensor]:
    """One layer loaded at a time, every sample's hidden states kept at one depth."""
    d, model = stage.d, stage.model
    results: dict[str, torch.Tensor] = {}
    if d.is_main:
        patch_embed = stage.live("visual.patch_embed.")
        hiddens, vcalls = [], []
        for s in samples:
            h, call = stage.prefix(s)
            hiddens.append(h)
            vcalls.append(call)
            if stage.free_pixels:  # read once in this order (the caller's samples lose them)
                s.pixel_values = None
        stage.done("visual.patch_embed.", patch_embed, {})
        qwen2vl.release(patch_embed)
        for u in units:
            if u.kind == "vision":
                results.update(_layer_major(stage, u, hiddens, vcalls))
        positions = [qwen2vl.rope_index(model, s.input_ids, s.image_grid_thw, stage.arch.image_token_id)
                     for s in samples]
        merger = stage.live("visual.merger.")
        hiddens = [_to_decoder(stage, merger, s, h, c) for s, h, c in zip(samples, hiddens, vcalls)]
        stage.done("visual.merger.", merger, {})
        qwen2vl.release(merger)
    else:
        got = [d.recv(d.rank - 1, f"sample {k}") for k in range(n)]
        hiddens, positions = [h for h, _ in got], [p for _, p in got]
    calls = [stage.call(h, p) for h, p in zip(hiddens, positions)]
    for u in units:
        if u.kind == "decoder":
            results.update(_layer_major(stage, u, hiddens, calls))
    if not d.is_last:
        for k, h in enumerate(hiddens):
            d.send([h, positions[k]], d.rank + 1, f"sample {k}")
        d.wait_sends()
    return results


@torch.inference_mode()
def calibrate(stage: Stage, samples: list[Sample] | None, n: int) -> dict[str, torch.Tensor]:
    """This rank's results: activation qparams of the W8A8 linears it holds and their anti-outlier factors.
    samples: rank 0's calibration samples (None elsewhere); n: their number."""
    units = stage.units()
    if stage.d.agree(all(u.restored for u in units), "whether every layer is in the journal"):
        log.info("every layer's results are in the journal: calibration skipped")
        results = {}
        for u in units:
            results.update(u.saved)
            if stage.on_layer:
                stage.on_layer(u.prefix, True)
        return results
    run = run_resident if stage.resident else run_layer_major
    return run(stage, units, samples, n)
