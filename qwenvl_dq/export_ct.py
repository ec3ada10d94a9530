"""compressed-tensors' layout (what vLLM reads; transformers too, with the compressed-tensors package installed): file
names, the quantization_config block of config.json, and which tensors it holds. Pure: the files are written by
writer.py and job.py.

The same quantized model as the MindIE layout, in another vocabulary. Per W8A8 linear <p>:

| tensor | dtype, shape | value |
|---|---|---|
| <p>.weight | int8 [out, in] | the same int8 weight (symmetric per output channel, -127..127) |
| <p>.weight_scale | model dtype [out, 1] | the same weight scale |
| <p>.input_scale | model dtype [1] | the static activation scale |
| <p>.input_zero_point | int8 [1] | = input_offset; asymmetric activations only (--act_symmetric writes none) |
| <p>.bias | model dtype [out] | where the linear has one (it holds the folded m2 shift) |

The zero point has the same sign as msModelSlim's input_offset: compressed-tensors quantizes
x_q = clamp(round(x / input_scale) + input_zero_point, -128, 127) and dequantizes (x_q - input_zero_point) *
input_scale; msModelSlim's kernel is x_q = clamp(round(x / input_scale + input_offset), -128, 127) with an integer
offset, the same number. weight_offset, quant_bias and deq_scale (MindIE's kernel terms) are not written: vLLM
derives its own from the weight, the scales and the zero point. Every other tensor is as in the MindIE layout: the
source's, with the smoothing folded into norms and weights, in the source dtype.

Files: model.safetensors, or model-0000K-of-0000N.safetensors and model.safetensors.index.json when
--part_file_size makes more than one part (Hugging Face's names); config.json = the source config plus
quantization_config, written last: it marks the output complete.
"""

from __future__ import annotations

import torch

from . import qwen2vl
from .writer import TensorSpec

WEIGHT_BASE = "model"
INDEX = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}  # what save_pretrained writes; transformers checks it
DROPPED = ("weight_offset", "quant_bias", "deq_scale")


def scheme(act_symmetric: bool) -> dict:
    """group_0: int8 weights per output channel (symmetric), static per-tensor int8 activations."""
    args = {"num_bits": 8, "type": "int", "group_size": None, "dynamic": False}
    return {
        "targets": ["Linear"],
        "weights": {**args, "symmetric": True, "strategy": "channel"},
        "input_activations": {**args, "symmetric": act_symmetric, "strategy": "tensor"},
        "output_activations": None,
        "format": "int-quantized",
    }


def quantization_config(arch: qwen2vl.Arch, act_symmetric: bool, version: str | None = None) -> dict:
    """config.json's quantization_config, in the keys compressed-tensors' ModelCompressor writes (version: the
    compressed-tensors version that validated it, when installed)."""
    qc = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme(act_symmetric)},
        "ignore": qwen2vl.float_linear_patterns(arch),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    if version is not None:
        qc["version"] = version
    return qc


def config_json(source: dict, arch: qwen2vl.Arch, act_symmetric: bool, version: str | None = None) -> dict:
    return {**source, "quantization_config": quantization_config(arch, act_symmetric, version)}


def validate(qc: dict) -> str | None:
    """Check qc with compressed-tensors' own QuantizationConfig when the package is installed; returns its version
    (None when it is not installed: it is not needed to write the output). A refusal is a bug here, not bad input."""
    try:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return None
    QuantizationConfig.model_validate(qc)
    return compressed_tensors.__version__


def convert(name: str, tensor: torch.Tensor, quantized: set[str], model_dtype: torch.dtype,
            act_symmetric: bool) -> tuple[str, torch.Tensor] | None:
    """One tensor of the MindIE layout (merge.produce's) -> (name, tensor) in this layout, or None where it has no
    counterpart. Works on meta tensors too, so the plan (tensor_specs) and the data follow one rule."""
    p, _, leaf = name.rpartition(".")
    if p not in quantized:
        return name, tensor
    if leaf in DROPPED or (leaf == "input_offset" and act_symmetric):
        return None
    if leaf == "input_offset":
        return f"{p}.input_zero_point", tensor.round().to(torch.int8)
    if leaf == "input_scale":
        return name, tensor.to(model_dtype)
    return name, tensor


def tensor_specs(specs: list[TensorSpec], quantized: set[str], model_dtype: torch.dtype,
                 act_symmetric: bool) -> list[TensorSpec]:
    """merge.output_specs' TensorSpecs -> this layout's, in the same order."""
    out = []
    for s in specs:
        got = convert(s.name, torch.empty(s.shape, dtype=s.dtype, device="meta"), quantized, model_dtype,
                      act_symmetric)
        if got is not None:
            out.append(TensorSpec(got[0], got[1].dtype, tuple(got[1].shape)))
    return out
