"""The calibration loop: every sample through one layer at a time, observers on the W8A8 linears' inputs.

Layer-major: load a vision block (then a decoder layer), run every sample's hidden states through it with forward
pre-hooks recording each observer group's input, solve the group's static activation qparams, free the layer,
go on. Only one layer's weights and every sample's hidden states at one depth are alive at once.

With --anti_method m2/m4 each layer is run twice: the first pass records per-channel statistics and token
reservoirs, the smoothing factors are solved (smooth.py) and folded into the live layer, and the second pass
observes the smoothed layer, whose outputs go on.

Results are name-keyed tensors for the merge: {"<linear>.input_scale": [1], "<linear>.input_offset": [1]} and the
smoothing factors {"<module>.smooth_*": [channels]}.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from . import qwen2vl
from .calib_data import Sample
from .checkpoint import Checkpoint
from . import smooth
from .observers import ActObserver, Reservoir

log = logging.getLogger(__name__)


def observe(module: nn.Module, prefix: str, groups, state: dict,
            reservoirs: dict | None = None) -> tuple[dict[tuple[str, ...], ActObserver], list]:
    """Attach one observer per group of linears (hooked on the group's first linear) and, for the groups in
    `reservoirs`, feed the reservoir too (state["k"] is the sample being run). Returns (observers, hooks)."""
    observers, hooks = {}, []
    for group in groups:
        key = tuple(prefix + n for n in group)
        obs = ActObserver()
        res = (reservoirs or {}).get(key)

        def hook(_m, args, o=obs, r=res):
            o.update(args[0])
            if r is not None:
                r.add(state["k"], args[0])

        hooks.append(module.get_submodule(group[0]).register_forward_pre_hook(hook))
        observers[key] = obs
    return observers, hooks


def solve(observers: dict[tuple[str, ...], ActObserver], act_method: str) -> dict[str, torch.Tensor]:
    """Static per-tensor activation qparams of every linear in every group."""
    out = {}
    for names, obs in observers.items():
        scale, offset = obs.qparams(act_method)
        for n in names:
            out[n + ".input_scale"] = scale
            out[n + ".input_offset"] = offset
    return out


def run_samples(layer: nn.Module, prefix: str, groups, hiddens: list[torch.Tensor], calls: list, run: Callable,
                reservoirs: dict | None = None, propagate: bool = True) -> dict[tuple[str, ...], ActObserver]:
    """Every sample through one layer with observers attached; with `propagate` the outputs replace hiddens."""
    state = {"k": 0}
    observers, hooks = observe(layer, prefix, groups, state, reservoirs)
    try:
        for k in range(len(hiddens)):
            state["k"] = k
            out = run(layer, hiddens[k], calls[k])
            if propagate:
                hiddens[k] = out
    finally:
        for h in hooks:
            h.remove()
    return observers


def solve_smoothing(kind: str, layer: nn.Module, prefix: str, method: str, arch: qwen2vl.Arch,
                    observers: dict, reservoirs: dict, calls: list) -> dict[str, torch.Tensor]:
    """The anti-outlier factors of one layer, keyed '<module prefix>.<smooth key>' (see smooth.KEYS)."""
    out: dict[str, torch.Tensor] = {}
    for g in qwen2vl.smooth_groups(kind, method):
        key = tuple(prefix + n for n in g.linears)
        obs, windows = observers[key], reservoirs[key].items()
        mods = [layer.get_submodule(n) for n in g.linears]
        row0, rows, tie = qwen2vl.v_layout(kind, arch) if g.v_rows else (0, 0, None)
        xs = [x for *_, x in windows]
        if g.output == "attention":  # attention runs window by window, each with its own rotary tables
            win_calls = [qwen2vl.window_call(calls[k], start, end) for k, start, end, _ in windows]
        else:  # token-wise outputs: one matrix of every window's tokens
            xs, win_calls = [torch.cat(xs)], []
        problem = smooth.Problem(
            x=xs, ch_min=obs.ch_min, ch_max=obs.ch_max,
            weights=[m.weight.float() for m in mods],
            biases=[None if m.bias is None else m.bias.float() for m in mods],
            output=qwen2vl.group_output(kind, layer, g, win_calls), tie=tie)
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


def apply_smoothing(layer: nn.Module, prefix: str, factors: dict[str, torch.Tensor]) -> None:
    """Fold the factors into the live layer's parameters, rounded to their dtype exactly as the merge saves them."""
    for name, mod in layer.named_modules():
        f = smooth.module_factors(factors, prefix + name)
        if not f:
            continue
        for k, v in smooth.fold(dict(mod.named_parameters(recurse=False)), f).items():
            setattr(mod, k, nn.Parameter(v, requires_grad=False))


def run_layers(read: Callable, layers, kind: str, groups, hiddens: list[torch.Tensor], calls: list,
               run: Callable, act_method: str, anti_method: str = "none", arch: qwen2vl.Arch | None = None,
               on_layer=None) -> dict[str, torch.Tensor]:
    """Every sample through every layer of `layers` (kind 'vision' or 'decoder'), layer by layer: with smoothing,
    a first pass records statistics and token reservoirs, the factors are solved and folded into the layer, and a
    second pass observes the smoothed layer's inputs; the activation qparams come from the last pass, whose
    outputs go on to the next layer (hiddens is updated in place)."""
    prefix_fmt = qwen2vl.VISION_BLOCK if kind == "vision" else qwen2vl.DECODER_LAYER
    smoothing = qwen2vl.smooth_groups(kind, anti_method) if anti_method != "none" else []
    results = {}
    for i, layer in enumerate(layers):
        prefix = prefix_fmt.format(i=i)
        qwen2vl.materialize(layer, prefix, read)
        try:
            if smoothing:
                reservoirs = {tuple(prefix + n for n in g.linears): Reservoir(len(hiddens)) for g in smoothing}
                observers = run_samples(layer, prefix, groups, hiddens, calls, run, reservoirs, propagate=False)
                factors = solve_smoothing(kind, layer, prefix, anti_method, arch, observers, reservoirs, calls)
                del reservoirs, observers
                apply_smoothing(layer, prefix, factors)
                results.update(factors)
            observers = run_samples(layer, prefix, groups, hiddens, calls, run)
        finally:
            qwen2vl.release(layer)
        results.update(solve(observers, act_method))
        if on_layer:
            on_layer(prefix)
    return results


@torch.inference_mode()
def calibrate(model: nn.Module, ckpt: Checkpoint, arch: qwen2vl.Arch, samples: list[Sample], act_method: str,
              anti_method: str = "none", device: torch.device = torch.device("cpu"),
              on_layer=None) -> dict[str, torch.Tensor]:
    """Activation qparams of every W8A8 linear of the model and the anti-outlier factors, from the samples."""
    results = {}

    def read(name: str) -> torch.Tensor:
        return ckpt.get(name).to(device)

    # vision tower, block by block
    hiddens, calls = [], []
    for s in samples:
        h, call = qwen2vl.vision_prefix(model, s.pixel_values.to(device), s.image_grid_thw.to(device), read)
        hiddens.append(h)
        calls.append(call)
    results.update(run_layers(read, qwen2vl.vision_blocks(model), "vision", qwen2vl.VISION_GROUPS, hiddens, calls,
                              qwen2vl.run_vision_block, act_method, anti_method, arch, on_layer))
    merger = qwen2vl.materialize(qwen2vl.named_module(model, "visual.merger."), "visual.merger.", read)
    image_embeds = [merger(h) for h in hiddens]
    qwen2vl.release(merger)

    # token embeddings with the image embeddings scattered in, mrope positions, then the decoder layers
    hiddens, calls = [], []
    for s, img in zip(samples, image_embeds):
        h = qwen2vl.decoder_input(ckpt.rows, s.input_ids, img, arch.image_token_id, device)
        hiddens.append(h)
        calls.append(qwen2vl.decoder_call(model, h, s.input_ids, s.image_grid_thw, arch.image_token_id))
    results.update(run_layers(read, qwen2vl.decoder_layers(model), "decoder", qwen2vl.DECODER_GROUPS, hiddens, calls,
                              qwen2vl.run_decoder_layer, act_method, anti_method, arch, on_layer))
    return results
