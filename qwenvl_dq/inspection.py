"""`qwenvl-dq inspect OUTPUT`: what a quantized output holds (its format, which modules are W8A8, statistics of their
scales) and whether it is complete: the run finished, every weight part is whole, every tensor the description json
(or the compressed-tensors config) promises is there with the dtype and shape its format requires.

Works on qwenvl-dq's outputs and on msModelSlim's (the same layout). Reads safetensors headers and the small scale
tensors only, never the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from . import outdir
from .checkpoint import Checkpoint
from .errors import UserError

MINDIE_SUFFIXES = {"weight": torch.int8, "weight_scale": None, "weight_offset": None, "input_scale": None,
                   "input_offset": None, "quant_bias": torch.int32, "deq_scale": None}
CT_SUFFIXES = {"weight": torch.int8, "weight_scale": None, "input_scale": None}


@dataclasses.dataclass
class Report:
    path: str
    format: str = "unknown"  # "mindie", "compressed-tensors"
    state: str = "unknown"  # outdir.inspect's kind
    files: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (name, bytes)
    problems: list[str] = dataclasses.field(default_factory=list)
    quantized: list[str] = dataclasses.field(default_factory=list)  # W8A8 module prefixes
    float_tensors: int = 0
    int8_bytes: int = 0
    float_bytes: int = 0
    stats: dict[str, tuple[float, float, float]] = dataclasses.field(default_factory=dict)  # name -> min/median/max
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.problems


def _read_json(path: str, report: Report):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        report.problems.append(f"{os.path.basename(path)} cannot be read ({type(e).__name__}: {e})")
        return None


def _stats(values: list[torch.Tensor]) -> tuple[float, float, float]:
    v = torch.cat([t.float().reshape(-1) for t in values])
    return float(v.min()), float(v.median()), float(v.max())


def _check_module(ckpt: Checkpoint, prefix: str, suffixes: dict, report: Report) -> bool:
    for leaf, want in suffixes.items():
        name = f"{prefix}.{leaf}"
        if name not in ckpt:
            report.problems.append(f"{name} is missing")
            return False
        if want is not None and ckpt.dtype(name) != want:
            report.problems.append(f"{name} is {ckpt.dtype(name)}, not {want}")
            return False
    return True


def inspect(path: str) -> Report:
    r = Report(path)
    if not os.path.isdir(path):
        raise UserError(f"output: {path} is not a directory; pass a save_directory written by qwenvl-dq or msModelSlim")
    r.state = outdir.inspect(path).kind
    r.files = [(n, os.path.getsize(os.path.join(path, n))) for n in sorted(os.listdir(path))
               if os.path.isfile(os.path.join(path, n))]
    if r.state == "incomplete":
        r.problems.append(f"the run that wrote it did not finish ({outdir.INCOMPLETE} is there): run the same "
                          "quantize command with --resume, or --overwrite to start over")
    if r.state == "empty":
        r.problems.append("it is empty")
        return r
    descriptions = [d for d in outdir.DESCRIPTIONS if os.path.isfile(os.path.join(path, d))]
    config = _read_json(os.path.join(path, "config.json"), r) if os.path.isfile(os.path.join(path, "config.json")) \
        else None
    qc = (config or {}).get("quantization_config") or {}
    if descriptions:
        r.format = "mindie"
        r.settings["description"] = descriptions[0]
        r.settings["mindie_format"] = descriptions[0].endswith("_w8a8.json")
        for k in ("anti_method", "act_method", "dev_type"):
            if k in qc:
                r.settings[k] = qc[k]
    elif qc.get("quant_method") == "compressed-tensors":
        r.format = "compressed-tensors"
        r.settings["format"] = qc.get("format")
        acts = next(iter((qc.get("config_groups") or {}).values()), {}).get("input_activations") or {}
        r.settings["act_symmetric"] = acts.get("symmetric")
        r.settings["ignore"] = qc.get("ignore")
    elif r.state != "incomplete":
        r.problems.append("it holds no quant_model_description*.json and no compressed-tensors config.json: "
                          "it is not a quantized output")
        return r
    try:
        ckpt = Checkpoint(path, role="output")
    except UserError as e:
        r.problems.append(str(e).removeprefix("output: "))
        return r
    try:
        _tensors(ckpt, r, descriptions)
    finally:
        ckpt.close()
    if config is None:
        r.problems.append("config.json is missing")
    return r


def _tensors(ckpt: Checkpoint, r: Report, descriptions: list[str]) -> None:
    names = ckpt.names()
    suffixes = CT_SUFFIXES if r.format == "compressed-tensors" else MINDIE_SUFFIXES
    marker = "weight_scale" if r.format == "compressed-tensors" else "deq_scale"
    prefixes = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith("." + marker)})
    r.quantized = [p for p in prefixes if _check_module(ckpt, p, suffixes, r)]
    if descriptions:
        desc = _read_json(os.path.join(r.path, descriptions[0]), r) or {}
        types = {k: v for k, v in desc.items() if k not in ("version", "model_quant_type")}
        missing = sorted(set(types) - set(names))
        extra = sorted(set(names) - set(types))
        if missing:
            r.problems.append(f"{len(missing)} tensors in {descriptions[0]} are in no weight file, e.g. {missing[0]}")
        if extra:
            r.problems.append(f"{len(extra)} tensors are not in {descriptions[0]}, e.g. {extra[0]}")
        wrong = [p for p in r.quantized if types.get(p + ".weight") != "W8A8"]
        if wrong:
            r.problems.append(f"{len(wrong)} W8A8 linears are not described as W8A8, e.g. {wrong[0]}")
    quant_names = {f"{p}.{leaf}" for p in r.quantized for leaf in suffixes}
    for n in names:
        if ckpt.dtype(n) == torch.int8:
            r.int8_bytes += ckpt.nbytes(n)
        elif n not in quant_names:
            r.float_tensors += 1
            r.float_bytes += ckpt.nbytes(n)
    if not r.quantized:
        r.problems.append("it holds no W8A8 linear")
        return
    leaves = ["weight_scale", "input_scale"] + (["input_zero_point"] if r.format == "compressed-tensors"
                                                 else ["input_offset"])
    for leaf in leaves:
        got = [ckpt.get(f"{p}.{leaf}") for p in r.quantized if f"{p}.{leaf}" in ckpt]
        if got:
            r.stats[leaf] = _stats(got)


def _group(prefixes: list[str]) -> list[tuple[str, int]]:
    """model.layers.3.self_attn.q_proj -> model.layers.*.self_attn.q_proj, counted, in first-seen order."""
    counts: dict[str, int] = {}
    for p in prefixes:
        k = re.sub(r"\.\d+\.", ".*.", p)
        counts[k] = counts.get(k, 0) + 1
    return list(counts.items())


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def text(r: Report) -> str:
    lines = [f"{r.path}: {r.format} output, {'complete' if r.complete else 'NOT complete'}"]
    for k, v in r.settings.items():
        lines.append(f"  {k}: {v}")
    total = sum(s for _, s in r.files)
    lines.append(f"files ({len(r.files)}, {_size(total)}):")
    lines += [f"  {n}  {s:,} bytes" for n, s in r.files]
    if r.quantized:
        lines.append(f"W8A8 linears: {len(r.quantized)} ({_size(r.int8_bytes)} of int8 weights); "
                     f"float tensors: {r.float_tensors} ({_size(r.float_bytes)})")
        lines += [f"  {k}  x{c}" for k, c in _group(r.quantized)]
    if r.stats:
        lines.append("scales over the W8A8 linears (min / median / max):")
        lines += [f"  {k}: {lo:.4g} / {med:.4g} / {hi:.4g}" for k, (lo, med, hi) in r.stats.items()]
    if r.problems:
        lines.append("problems:")
        lines += [f"  {p}" for p in r.problems]
    return "\n".join(lines)
