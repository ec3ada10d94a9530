"""The calibration loop: every sample through one layer at a time, observers on the W8A8 linears' inputs.

Layer-major: load a vision block (then a decoder layer), run every sample's hidden states through it with forward
pre-hooks recording each observer group's input, solve the group's static activation qparams, free the layer,
go on. Only one layer's weights and every sample's hidden states at one depth are alive at once.

Results are name-keyed tensors, {"<linear>.input_scale": [1], "<linear>.input_offset": [1]}, for the merge.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from . import qwen2vl
from .calib_data import Sample
from .checkpoint import Checkpoint
from .observers import ActObserver

log = logging.getLogger(__name__)


def observe(module: nn.Module, prefix: str, groups) -> tuple[dict[tuple[str, ...], ActObserver], list]:
    """Attach one observer per group of linears (hooked on the group's first linear); returns (observers, hooks)."""
    observers, hooks = {}, []
    for group in groups:
        obs = ActObserver()
        first = module.get_submodule(group[0])
        hooks.append(first.register_forward_pre_hook(lambda _m, args, o=obs: o.update(args[0])))
        observers[tuple(prefix + n for n in group)] = obs
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


def run_layers(read: Callable, layers, prefix_fmt: str, groups, hiddens: list[torch.Tensor],
               calls: list, run: Callable, act_method: str, on_layer=None) -> dict[str, torch.Tensor]:
    """Every sample through every layer of `layers`, observing and solving layer by layer (hiddens updated in place)."""
    results = {}
    for i, layer in enumerate(layers):
        prefix = prefix_fmt.format(i=i)
        qwen2vl.materialize(layer, prefix, read)
        observers, hooks = observe(layer, prefix, groups)
        try:
            for k in range(len(hiddens)):
                hiddens[k] = run(layer, hiddens[k], calls[k])
        finally:
            for h in hooks:
                h.remove()
            qwen2vl.release(layer)
        results.update(solve(observers, act_method))
        if on_layer:
            on_layer(prefix)
    return results


@torch.inference_mode()
def calibrate(model: nn.Module, ckpt: Checkpoint, arch: qwen2vl.Arch, samples: list[Sample], act_method: str,
              device: torch.device = torch.device("cpu"), on_layer=None) -> dict[str, torch.Tensor]:
    """Activation qparams of every W8A8 linear of the model, from the calibration samples."""
    results = {}

    def read(name: str) -> torch.Tensor:
        return ckpt.get(name).to(device)

    # vision tower, block by block
    hiddens, calls = [], []
    for s in samples:
        h, call = qwen2vl.vision_prefix(model, s.pixel_values.to(device), s.image_grid_thw.to(device), read)
        hiddens.append(h)
        calls.append(call)
    results.update(run_layers(read, qwen2vl.vision_blocks(model), qwen2vl.VISION_BLOCK, qwen2vl.VISION_GROUPS,
                              hiddens, calls, qwen2vl.run_vision_block, act_method, on_layer))
    merger = qwen2vl.materialize(qwen2vl.named_module(model, "visual.merger."), "visual.merger.", read)
    image_embeds = [merger(h) for h in hiddens]
    qwen2vl.release(merger)

    # token embeddings with the image embeddings scattered in, mrope positions, then the decoder layers
    hiddens, calls = [], []
    for s, img in zip(samples, image_embeds):
        ids = s.input_ids
        h = ckpt.rows("model.embed_tokens.weight", ids[0])[None].to(device)
        mask = (ids == arch.image_token_id).to(device)
        h[mask] = img.to(h.dtype)
        pos = qwen2vl.rope_index(model, ids, s.image_grid_thw, arch.image_token_id).to(device)
        hiddens.append(h)
        calls.append(qwen2vl.decoder_call(model, h, pos))
    results.update(run_layers(read, qwen2vl.decoder_layers(model), qwen2vl.DECODER_LAYER,
                              qwen2vl.DECODER_GROUPS, hiddens, calls, qwen2vl.run_decoder_layer, act_method, on_layer))
    return results
