"""The output's weights, written by the ranks that computed them.

Every rank computes the same layout (writer.PartLayout) from the checkpoint's headers, and rank 0 creates the parts
(each header, then room for its tensors) under temporary names before calibration starts. Each tensor has one
owner, the rank that writes it:

- a decoder layer's tensors: the rank that calibrates the layer, as soon as the layer is solved, from the live
  layer (merge.LiveSource), so the source is read once and every rank quantizes its own layers at the same time;
- the vision tower's (blocks, patch embedding, merger): rank 0, from its live modules in the same way; the token
  embeddings (of which calibration reads only rows): rank 0 after calibration;
- what follows the last decoder layer (the final norm, lm_head): the last rank, after calibration.

What a rank could not write live (a layer restored whole from the journal, which skips its forward) it writes from
the checkpoint after calibration. When save_directory is not the same directory on every rank (hosts that do not
share it), rank 0 owns every tensor and reads other ranks' layers again once their results have come.

Rank 0 renames the parts once every rank has reported its tensors written and synced (commit); job.py then writes
the index, config.json and the description json.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Callable

import torch
from torch import nn

from . import merge, qwen2vl
from .checkpoint import Checkpoint
from .journal import state_dir
from .plan import Plan
from .writer import PartFiles, PartLayout, TensorSpec

log = logging.getLogger(__name__)

SHARED_PROBE = "shared"  # in the state directory: rank 0's token; a rank that reads it back shares the directory


def owners(specs: list[TensorSpec], layout: Plan, shared: bool) -> dict[str, int]:
    """name -> the rank that writes it (see the module doc); every name on rank 0 when not shared."""
    world = len(layout.ranks)
    if not shared or world == 1:
        return {s.name: 0 for s in specs}
    by_layer = {i: r.rank for r in layout.ranks for i in range(*r.layers)}
    out = {}
    for s in specs:
        i = qwen2vl.decoder_index(s.name)
        if i is not None:
            out[s.name] = by_layer[i]
        else:
            out[s.name] = world - 1 if s.name.startswith(qwen2vl.HEAD_PREFIXES) else 0
    return out


def share_token(out: str) -> str:
    """Rank 0: leave a fresh token in the state directory; every rank that reads it back sees the same directory."""
    token = secrets.token_hex(16)
    path = os.path.join(state_dir(out), SHARED_PROBE)
    os.makedirs(state_dir(out), mode=0o700, exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(token)
    return token


def sees_token(out: str, token: str) -> bool:
    try:
        with open(os.path.join(state_dir(out), SHARED_PROBE)) as f:
            return f.read() == token
    except OSError:
        return False


class Weights:
    """One rank's share of the output's weight files.

    specs: merge.output_specs (the MindIE layout's tensors, the order they are produced in); convert: maps one of
    them to the written layout's (name, tensor), or None where that layout has no counterpart (export_ct.convert),
    None for the MindIE layout itself."""

    def __init__(self, out: str, layout: PartLayout, specs: list[TensorSpec], owner: dict[str, int], rank: int,
                 ckpt: Checkpoint, dtype: torch.dtype, convert: Callable | None = None):
        self.layout = layout
        self.ckpt = ckpt
        self.dtype = dtype
        self.convert = convert
        self.mine = [s for s in specs if owner[s.name] == rank]
        self.done: set[str] = set()  # source-layout names produced
        self.files = PartFiles(out, layout)

    def _write(self, stream) -> None:
        for name, tensor in stream:
            self.done.add(name)
            got = (name, tensor) if self.convert is None else self.convert(name, tensor)
            if got is not None:
                self.files.write(*got)

    def write_unit(self, prefix: str, module: nn.Module, results: dict[str, torch.Tensor]) -> None:
        """A calibrated unit's tensors (those this rank owns), from its live module; results: the unit's own (on
        the card: copied to the host, where the quantization math runs, merge.LiveSource)."""
        specs = [s for s in self.mine if s.name.startswith(prefix) and s.name not in self.done]
        if specs:
            results = {k: v.cpu() for k, v in results.items()}
            self._write(merge.produce(merge.LiveSource(module, prefix, self.ckpt), specs, results, self.dtype))

    def write_rest(self, results: dict[str, torch.Tensor]) -> None:
        """Every tensor this rank owns and has not written yet, from the checkpoint."""
        specs = [s for s in self.mine if s.name not in self.done]
        if specs:
            log.debug("writing %d tensors from the checkpoint", len(specs))
            self._write(merge.produce(merge.CheckpointSource(self.ckpt, results), specs, results, self.dtype))

    @property
    def rest_bytes(self) -> int:
        return sum(s.nbytes for s in self.mine if s.name not in self.done)

    def close(self) -> None:
        self.files.close()
