"""The output's tensors: fold the smoothing factors in, quantize the W8A8 linears, keep the rest as they are.

output_specs() lists every output tensor (name, dtype, shape) before anything is computed, so the writer can lay
out the parts; produce() then yields the tensors of a list of specs in that order, from a source: a calibrated
layer's live module (LiveSource: its parameters already hold the folded values; nothing is read again) or the
checkpoint (CheckpointSource: each tensor read once, the factors folded in from the results).

Per W8A8 linear <p> (in this order, the reference's): <p>.weight int8 [out, in], <p>.bias (float, where the linear
has one), <p>.weight_scale and <p>.weight_offset [out, 1] in the model dtype, <p>.input_scale and <p>.input_offset
[1] in the model dtype, <p>.quant_bias int32 [out], <p>.deq_scale float32 [out] (int64 bits for fp16 models).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import nn

from . import int8, qwen2vl, smooth
from .checkpoint import Checkpoint
from .writer import TensorSpec

QUANT_SUFFIXES = ("weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")


def source_order(ckpt: Checkpoint, arch: qwen2vl.Arch) -> list[str]:
    """Source tensor names in module order (the reference's), then any the table does not know, by name."""
    table = [n for n in qwen2vl.checkpoint_shapes(arch) if n in ckpt]
    known = set(table)
    return table + sorted(n for n in ckpt.names() if n not in known)


def act_param_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """dtype of input_scale / input_offset: the model dtype for bf16, float32 otherwise (msModelSlim casts its
    float32 activation qparams to bf16 only)."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32


def output_specs(ckpt: Checkpoint, arch: qwen2vl.Arch, model_dtype: torch.dtype) -> list[TensorSpec]:
    quantized = set(qwen2vl.quantized_linears(arch))
    deq_dtype = int8.deq_scale_dtype(model_dtype)
    act_dtype = act_param_dtype(model_dtype)
    specs = []
    for name in source_order(ckpt, arch):
        p, _, leaf = name.rpartition(".")
        if p in quantized and leaf == "bias":
            continue  # emitted right after its weight
        if p in quantized and leaf == "weight":
            out, inp = ckpt.shape(name)
            specs.append(TensorSpec(name, torch.int8, (out, inp)))
            if p + ".bias" in ckpt:
                specs.append(TensorSpec(p + ".bias", ckpt.dtype(p + ".bias"), ckpt.shape(p + ".bias")))
            specs += [
                TensorSpec(p + ".weight_scale", model_dtype, (out, 1)),
                TensorSpec(p + ".weight_offset", model_dtype, (out, 1)),
                TensorSpec(p + ".input_scale", act_dtype, (1,)),
                TensorSpec(p + ".input_offset", act_dtype, (1,)),
                TensorSpec(p + ".quant_bias", torch.int32, (out,)),
                TensorSpec(p + ".deq_scale", deq_dtype, (out,)),
            ]
        else:
            specs.append(TensorSpec(name, ckpt.dtype(name), ckpt.shape(name)))
    return specs


def quantize_linear(w: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor,
                    input_offset: torch.Tensor, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The W8A8 tensors of one linear. w: [out, in] float; input_scale/offset: [1] float32.

    Scales are rounded to their saved dtype first; the int8 weight, deq_scale and quant_bias are then computed
    from the saved values, so the integer kernel reproduces exactly what the saved tensors say."""
    act_dtype = act_param_dtype(model_dtype)
    ws = int8.weight_scale(w).to(model_dtype)
    in_s, in_o = input_scale.to(act_dtype), input_offset.to(act_dtype)
    wq = int8.quantize_weight(w, ws.float())
    deq = int8.deq_scale(in_s, ws)
    return {
        "weight": wq,
        "weight_scale": ws,
        "weight_offset": torch.zeros_like(ws),
        "input_scale": in_s,
        "input_offset": in_o,
        "quant_bias": int8.quant_bias(bias, deq, in_o, wq),
        "deq_scale": int8.deq_scale_for_dtype(deq, model_dtype),
    }


def module_params(ckpt: Checkpoint, prefix: str, results: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"weight", ["bias"]} of the module at `prefix`, with its smoothing factors folded in (rounded to the source
    dtype, exactly as calibration ran them)."""
    raw = {leaf: ckpt.get(f"{prefix}.{leaf}") for leaf in ("weight", "bias") if f"{prefix}.{leaf}" in ckpt}
    return smooth.fold(raw, smooth.module_factors(results, prefix))


@dataclasses.dataclass
class CheckpointSource:
    """Tensors read from the checkpoint, the smoothing factors in `results` folded in."""

    ckpt: Checkpoint
    results: dict[str, torch.Tensor]

    def params(self, prefix: str) -> dict[str, torch.Tensor]:
        return module_params(self.ckpt, prefix, self.results)

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.get(name)


@dataclasses.dataclass
class LiveSource:
    """The parameters of a calibrated unit's live module (checkpoint prefix `prefix`, with its dot): they hold the
    saved values in the compute dtype, the smoothing already folded in (calibrate.apply_smoothing), so converting
    back to each tensor's source dtype is exact. They are copied to host memory first: the quantization math runs
    on the host CPU on every device, as it does from the checkpoint, so the bytes do not depend on the card. A
    tensor the module does not hold is read from the checkpoint."""

    module: nn.Module
    prefix: str
    ckpt: Checkpoint

    def params(self, prefix: str) -> dict[str, torch.Tensor]:
        mod, dt = self.module.get_submodule(prefix[len(self.prefix):]), self.ckpt.dtype
        return {k: v.detach().to("cpu", dt(f"{prefix}.{k}")) for k, v in mod.named_parameters(recurse=False)
                if k in ("weight", "bias") and f"{prefix}.{k}" in self.ckpt}

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.module.get_parameter(name[len(self.prefix):]).detach().to("cpu", self.ckpt.dtype(name))
        except AttributeError:
            return self.ckpt.get(name)


def produce(source, specs: list[TensorSpec], results: dict[str, torch.Tensor],
            model_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in the order of `specs`, every tensor of a module the specs name (a linear's bias and
    quant tensors follow its weight). results holds <p>.input_scale / <p>.input_offset per W8A8 linear and the
    smoothing factors (smooth.KEYS) per smoothed module; source: a CheckpointSource or LiveSource."""
    pending: dict[str, torch.Tensor] = {}
    for spec in specs:
        name = spec.name
        if name in pending:
            yield name, pending.pop(name)
            continue
        p, _, leaf = name.rpartition(".")
        if spec.dtype == torch.int8 and leaf == "weight" and (p + ".input_scale") in results:
            params = source.params(p)
            bias = params.get("bias")
            q = quantize_linear(params["weight"], bias, results[p + ".input_scale"], results[p + ".input_offset"],
                                model_dtype)
            if bias is not None:
                pending[p + ".bias"] = bias
            pending.update({f"{p}.{k}": q[k] for k in QUANT_SUFFIXES})
            yield name, q["weight"]
        elif leaf in ("weight", "bias") and smooth.module_factors(results, p):
            params = source.params(p)
            pending.update({f"{p}.{k}": v for k, v in params.items() if k != leaf})
            yield name, params[leaf]
        else:
            yield name, source.get(name)
    if pending:
        raise RuntimeError(f"merge: tensors computed but not in the plan: {sorted(pending)[:3]}")


def description(specs: list[TensorSpec], arch: qwen2vl.Arch) -> dict[str, str]:
    """name -> "W8A8" for a quantized linear's weight and quant tensors, "FLOAT" for everything else (its bias too)."""
    quantized = set(qwen2vl.quantized_linears(arch))
    out = {}
    for s in specs:
        p, _, leaf = s.name.rpartition(".")
        out[s.name] = "W8A8" if p in quantized and leaf != "bias" else "FLOAT"
    return out
