"""Quality report: quantized outputs next to their float model, on held-out images.

Each quantized output (ours or msModelSlim's in the MindIE layout, or ours in compressed-tensors') is run exactly as
its saved tensors say: every linear that has a deq_scale is replaced by the integer kernel those tensors define,
y = (clamp(round(x / input_scale + input_offset)) @ Wq^T + quant_bias) * deq_scale, and every compressed-tensors
linear (an int8 weight with a weight_scale and an input_scale) by y = ((x_q - zp) @ Wq^T) * input_scale *
weight_scale + bias, x_q = clamp(round(x / input_scale) + zp) (zp = input_zero_point, 0 when absent: symmetric),
both simulated exactly in float64; every other tensor (smoothed norms, float layers, embeddings) is used as saved.
The float model runs from its own checkpoint, in its dtype. Both go layer by layer over every sample (one layer of
each in memory at a time), each fed by its own previous layer, so the per-layer figures include the error carried
from upstream.

Figures: per vision block and per decoder layer, the output SQNR in dB (10 log10 of signal energy over error
energy, over every token of every sample; an exact match reads SQNR_CAP); on the final logits (every prompt
position), the mean per-token cosine similarity and the top-1 agreement (how often the argmax token is the same).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import torch
from torch import nn

from . import calib_data, int8, qwen2vl
from .checkpoint import Checkpoint
from .config import DEFAULT_PROMPT
from .errors import UserError
from .job import model_dtype
from .outdir import INCOMPLETE

log = logging.getLogger(__name__)

SQNR_CAP = 200.0


def is_w8a8(ckpt: Checkpoint, prefix: str) -> bool:
    """Whether the linear at checkpoint `prefix` is saved W8A8 (MindIE's layout or compressed-tensors')."""
    if prefix + ".deq_scale" in ckpt:
        return True
    return (prefix + ".input_scale" in ckpt and prefix + ".weight_scale" in ckpt
            and ckpt.dtype(prefix + ".weight") == torch.int8)


class ZeroPointLinear(nn.Module):
    """One compressed-tensors W8A8 linear, simulated exactly (int8.zero_point_linear)."""

    def __init__(self, ckpt: Checkpoint, prefix: str, device: torch.device):
        super().__init__()
        scale = ckpt.get(prefix + ".input_scale")
        zp = ckpt.get(prefix + ".input_zero_point") if prefix + ".input_zero_point" in ckpt else torch.zeros(1)
        for name, t in (("weight_q", ckpt.get(prefix + ".weight")),
                        ("weight_scale", ckpt.get(prefix + ".weight_scale")),
                        ("input_scale", scale), ("zero_point", zp.float())):
            self.register_buffer(name, t.to(device))
        self.bias = ckpt.get(prefix + ".bias").to(device) if prefix + ".bias" in ckpt else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8.zero_point_linear(x, self.weight_q, self.weight_scale, self.input_scale, self.zero_point, self.bias)
        return y.to(x.dtype)


class W8A8Linear(nn.Module):
    """The integer kernel of one saved W8A8 linear, simulated exactly (int8.w8a8_linear)."""

    def __init__(self, ckpt: Checkpoint, prefix: str, device: torch.device):
        super().__init__()
        deq = ckpt.get(prefix + ".deq_scale")
        if deq.dtype == torch.int64:  # float32 bits, sign-extended (MindIE's layout for fp16 models)
            deq = deq.to(torch.int32).view(torch.float32)
        for name, t in (("weight_q", ckpt.get(prefix + ".weight")), ("quant_bias", ckpt.get(prefix + ".quant_bias")),
                        ("deq_scale", deq), ("input_scale", ckpt.get(prefix + ".input_scale")),
                        ("input_offset", ckpt.get(prefix + ".input_offset"))):
            self.register_buffer(name, t.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8.w8a8_linear(x, self.weight_q, self.quant_bias, self.deq_scale, self.input_scale, self.input_offset)
        return y.to(x.dtype)


@dataclasses.dataclass
class Side:
    """One model being run: the float reference or a quantized output."""

    label: str
    ckpt: Checkpoint
    device: torch.device
    hiddens: list = dataclasses.field(default_factory=list)
    sqnr: dict = dataclasses.field(default_factory=lambda: {"vision": [], "llm": []})
    quantized_linears: int = 0

    def read(self, name: str) -> torch.Tensor:
        return self.ckpt.get(name).to(self.device)

    def load(self, module: nn.Module, prefix: str) -> list:
        """Materialise `module` from this side's checkpoint, saved W8A8 linears as their integer kernels."""
        swaps = []
        for name, child in list(module.named_modules()):
            if isinstance(child, nn.Linear) and is_w8a8(self.ckpt, prefix + name):
                parent_name, _, attr = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                kernel = W8A8Linear if f"{prefix}{name}.deq_scale" in self.ckpt else ZeroPointLinear
                setattr(parent, attr, kernel(self.ckpt, prefix + name, self.device))
                swaps.append((parent, attr, child))
        qwen2vl.materialize(module, prefix, self.read)
        self.quantized_linears += len(swaps)
        return swaps

    def run(self, module: nn.Module, prefix: str, step) -> None:
        """hiddens[k] = step(module, hiddens[k], k) for every sample, with module loaded from this side."""
        swaps = self.load(module, prefix)
        try:
            self.hiddens = [step(module, h, k) for k, h in enumerate(self.hiddens)]
        finally:
            qwen2vl.release(module)
            for parent, attr, child in swaps:
                setattr(parent, attr, child)


def sqnr_db(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    signal = sum(float(r.double().pow(2).sum()) for r in ref)
    noise = sum(float((r.double() - g.double()).pow(2).sum()) for r, g in zip(ref, got))
    if noise == 0:
        return SQNR_CAP
    if signal == 0:
        return -SQNR_CAP
    return min(SQNR_CAP, 10 * math.log10(signal / noise))


def check_output_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"quantized: {path} is not a directory; pass a save_directory written by a quantizer")
    if os.path.exists(os.path.join(path, INCOMPLETE)):
        raise UserError(f"quantized: {path} is an incomplete output (it holds {INCOMPLETE}); quantize it again")


@torch.inference_mode()
def evaluate(model_path: str, quantized: list[tuple[str, str]], images: str, limit: int | None = None,
             prompt: str = DEFAULT_PROMPT, min_pixels: int | None = None, max_pixels: int | None = None,
             device: torch.device = torch.device("cpu"), trust_remote_code: bool = False, logits: dict | None = None,
             role: str = "images") -> dict:
    """Run the float model and every (label, directory) in `quantized` on the images; returns the report.
    logits: a dict to receive every side's final logits ({label or "float": [float32 [tokens, vocab] per
    sample]}); role: the flag that named the images, for messages."""
    src_cfg = qwen2vl.read_config(model_path)
    arch = qwen2vl.Arch.from_dict(src_cfg)
    ref = Side("float", Checkpoint(model_path), device)
    dtype = model_dtype(src_cfg, ref.ckpt)
    sides = []
    for label, path in quantized:
        check_output_dir(path)
        sides.append(Side(label, Checkpoint(path, role="quantized"), device))
    samples = calib_data.load_samples(images, model_path, limit=limit, prompt=prompt, min_pixels=min_pixels,
                                      max_pixels=max_pixels, trust_remote_code=trust_remote_code, role=role)
    model = qwen2vl.build_skeleton(qwen2vl.load_hf_config(model_path, trust_remote_code), dtype, device)
    everyone = [ref, *sides]

    # vision tower
    calls = []
    for side in everyone:
        side.hiddens = []
        for s in samples:
            h, call = qwen2vl.vision_prefix(model, s.pixel_values.to(device), s.image_grid_thw.to(device), side.read)
            side.hiddens.append(h)
            if side is ref:
                calls.append(call)
    run_stack(ref, sides, qwen2vl.vision_blocks(model), qwen2vl.VISION_BLOCK, "vision",
              lambda m, h, k, prefix: qwen2vl.run_vision_block(m, h, qwen2vl.unit_call(calls[k], prefix)))
    merger = qwen2vl.named_module(model, "visual.merger.")
    for side in everyone:
        side.run(merger, "visual.merger.", lambda m, h, k: qwen2vl.run_merger(m, h, calls[k]))

    # decoder
    calls = []
    for side in everyone:
        images_embeds, side.hiddens = side.hiddens, []
        for s, img in zip(samples, images_embeds):
            h = qwen2vl.decoder_input(side.ckpt.rows, s.input_ids, img, arch.image_token_id, device)
            side.hiddens.append(h)
            if side is ref:
                pos = qwen2vl.rope_index(model, s.input_ids, s.image_grid_thw, arch.image_token_id)
                calls.append(qwen2vl.decoder_call(model, h, pos))
    run_stack(ref, sides, qwen2vl.decoder_layers(model), qwen2vl.DECODER_LAYER, "llm",
              lambda m, h, k, prefix: qwen2vl.run_decoder_layer(m, h, calls[k]))

    if logits is None:
        logits = {}
    logits.update({side.label: side_logits(side, model) for side in everyone})
    report = {
        "model_path": os.path.abspath(model_path),
        "images": os.path.abspath(images),
        "samples": [s.name for s in samples],
        "tokens": sum(int(s.input_ids.shape[-1]) for s in samples),
        "runs": {},
    }
    for side, (label, path) in zip(sides, quantized):
        cos, top1 = compare_logits(logits["float"], logits[label])
        report["runs"][label] = {
            "path": os.path.abspath(path),
            "w8a8_linears": side.quantized_linears,
            "logits_cosine": cos,
            "top1_agreement": top1,
            "mean_sqnr_db": {k: (sum(v) / len(v) if v else None) for k, v in side.sqnr.items()},
            "sqnr_db": side.sqnr,
        }
    for side in everyone:
        side.ckpt.close()
    return report


def run_stack(ref: Side, sides: list[Side], layers, prefix_fmt: str, part: str, step) -> None:
    """Every side through every layer of one stack, layer by layer (step(module, hidden, sample, prefix)); each
    quantized side's SQNR against the float side after each layer goes to side.sqnr[part]."""
    for i, layer in enumerate(layers):
        prefix = prefix_fmt.format(i=i)
        for side in (ref, *sides):
            side.run(layer, prefix, lambda m, h, k: step(m, h, k, prefix))
        for side in sides:
            side.sqnr[part].append(sqnr_db(ref.hiddens, side.hiddens))


def side_logits(side: Side, model: nn.Module) -> list[torch.Tensor]:
    """Final norm and lm_head (the embedding when tied) of every sample of a side: float32 [tokens, vocab] each.
    The norm is loaded and the head read once per side."""
    norm = qwen2vl.named_module(model, "model.norm.")
    qwen2vl.materialize(norm, "model.norm.", side.read)
    try:
        hs = [norm(h)[0].float() for h in side.hiddens]
    finally:
        qwen2vl.release(norm)
    head = side.read("lm_head.weight" if "lm_head.weight" in side.ckpt else "model.embed_tokens.weight").float()
    return [h @ head.T for h in hs]


def compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """(mean per-token cosine similarity, top-1 agreement) over every position of every sample."""
    cos, agree, n = 0.0, 0, 0
    for r, g in zip(ref, got):
        cos += float(torch.nn.functional.cosine_similarity(r.double(), g.double(), dim=-1).sum())
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.shape[0]
    return cos / max(1, n), agree / max(1, n)


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(report: dict) -> str:
    """The report as a fixed-width table, one row per quantized output."""
    head = f"{'run':<14} {'logits cos':>10} {'top-1':>7} {'LLM SQNR dB':>12} {'vision SQNR dB':>15}  linears"
    rows = [head, "-" * len(head)]
    for label, r in report["runs"].items():
        m = r["mean_sqnr_db"]
        rows.append(f"{label:<14} {r['logits_cosine']:>10.5f} {100 * r['top1_agreement']:>6.1f}% "
                    f"{_db(m['llm']):>12} {_db(m['vision']):>15}  {r['w8a8_linears']}")
    return "\n".join(rows)


def plot(report: dict, path: str) -> None:
    """PNG of SQNR by layer, one line per quantized output, vision tower and LLM side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    for ax, part, title in ((axes[0], "vision", "vision blocks"), (axes[1], "llm", "decoder layers")):
        for label, r in report["runs"].items():
            ys = [y if y < SQNR_CAP else float("nan") for y in r["sqnr_db"][part]]  # exact runs have no curve
            ax.plot(range(len(ys)), ys, marker="o", label=f"{label} (cos {r['logits_cosine']:.4f})")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"output SQNR by layer: {title}")
        ax.set_xlabel("layer")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
