"""THE model adapter for Qwen2-VL and Qwen2.5-VL: every fact about the models lives here, and nowhere else.

- the checkpoint key table (on-disk names are the same for transformers 4.46 and 5.x),
- which linears are W8A8 and which linears read the same input (they share one activation observer),
- how to build the model skeleton on the meta device and materialise one block or layer at a time,
- how to run one vision block and one decoder layer for the installed transformers version.

The rest of the package speaks in checkpoint names ("model.layers.3.self_attn.q_proj") and never touches
transformers' module tree, nor asks which model it has: what differs between the two (the vision block, the merger,
the transformers class) is the Family table below, chosen by config.json's model_type. Their decoders are the same.
Qwen2.5-VL's vision blocks are RMSNorm + windowed attention + a gated MLP: the patches enter the blocks permuted into
window order, most blocks attend within windows (fullatt_block_indexes attend over the whole image), and the merger
output is put back in image order; vision_prefix takes each block's own call and that order from the tower itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Callable

import torch
import transformers
from torch import nn

from .errors import UserError

TF5 = int(transformers.__version__.split(".")[0]) >= 5

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

VISION_BLOCK = "visual.blocks.{i}."
DECODER_LAYER = "model.layers.{i}."
HEAD_PREFIXES = ("model.norm.", "lm_head.")  # what runs after the last decoder layer

# Linears that read the same tensor share one observer, so they carry the same input_scale/input_offset.
# Left in float, as the reference does: every mlp.down_proj and vision mlp.fc2 (their inputs, act(gate)*up and
# quick_gelu(fc1), have outliers that a static per-tensor int8 scale cannot hold), the merger and lm_head.
DECODER_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
)
VISION_GROUPS = (
    ("attn.qkv",),
    ("attn.proj",),
    ("mlp.fc1",),
)


@dataclasses.dataclass(frozen=True)
class SmoothGroup:
    """Where an anti-outlier factor goes: `source` (a norm, or the linear whose rows produce v) feeds `linears`
    (one observer group above), and the search measures `output`:
    "attention" (the attention output before its output projection), "gated_mlp" (act(gate) * up),
    "mlp" (act(fc1)) or "linear" (the linear itself). `v_rows` marks a v -> o group: the factor divides the rows
    of `source` that hold v. `methods` lists the anti_methods that smooth this group."""

    source: str
    linears: tuple[str, ...]
    output: str
    methods: tuple[str, ...]
    has_bias: bool = False  # LayerNorm: m2 also shifts
    v_rows: bool = False


DECODER_SMOOTH = (
    SmoothGroup("input_layernorm", DECODER_GROUPS[0], "attention", ("m2", "m4")),
    SmoothGroup("self_attn.v_proj", DECODER_GROUPS[1], "linear", ("m4",), v_rows=True),
    SmoothGroup("post_attention_layernorm", DECODER_GROUPS[2], "gated_mlp", ("m2", "m4")),
)
VISION_SMOOTH = (
    SmoothGroup("norm1", VISION_GROUPS[0], "attention", ("m2", "m4"), has_bias=True),
    SmoothGroup("attn.qkv", VISION_GROUPS[1], "linear", ("m4",), v_rows=True),
    SmoothGroup("norm2", VISION_GROUPS[2], "mlp", ("m2", "m4"), has_bias=True),
)
ATTENTION = {"decoder": ("self_attn", "o_proj"), "vision": ("attn", "proj")}  # attention module, its output linear

# Qwen2.5-VL's vision block, as msModelSlim treats it: qkv, proj and gate/up (one input, one observer) are W8A8,
# mlp.down_proj stays float like the decoder's. Its norms are RMSNorm (no bias), so m2 scales without a shift.
Q25_VISION_GROUPS = (
    ("attn.qkv",),
    ("attn.proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
)
Q25_VISION_SMOOTH = (
    SmoothGroup("norm1", Q25_VISION_GROUPS[0], "attention", ("m2", "m4")),
    SmoothGroup("attn.qkv", Q25_VISION_GROUPS[1], "linear", ("m4",), v_rows=True),
    SmoothGroup("norm2", Q25_VISION_GROUPS[2], "gated_mlp", ("m2", "m4")),
)


def _qwen2vl_block(e: int, m: int) -> dict[str, tuple[int, ...]]:
    return {
        "norm1.weight": (e,), "norm1.bias": (e,),
        "norm2.weight": (e,), "norm2.bias": (e,),
        "attn.qkv.weight": (3 * e, e), "attn.qkv.bias": (3 * e,),
        "attn.proj.weight": (e, e), "attn.proj.bias": (e,),
        "mlp.fc1.weight": (m, e), "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (e, m), "mlp.fc2.bias": (e,),
    }


def _qwen25vl_block(e: int, m: int) -> dict[str, tuple[int, ...]]:
    return {
        "norm1.weight": (e,), "norm2.weight": (e,),
        "attn.qkv.weight": (3 * e, e), "attn.qkv.bias": (3 * e,),
        "attn.proj.weight": (e, e), "attn.proj.bias": (e,),
        "mlp.gate_proj.weight": (m, e), "mlp.gate_proj.bias": (m,),
        "mlp.up_proj.weight": (m, e), "mlp.up_proj.bias": (m,),
        "mlp.down_proj.weight": (e, m), "mlp.down_proj.bias": (e,),
    }


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model_type's checkpoints and transformers classes look like, where the two models differ."""

    model_class: str  # the transformers class
    since: str  # the first transformers release that has it
    vision_groups: tuple[tuple[str, ...], ...]
    vision_smooth: tuple[SmoothGroup, ...]
    vision_block: Callable[[int, int], dict]  # (width, mlp width) -> {name in the block: shape}, in registration order
    merger_norm_bias: bool  # LayerNorm ln_q (Qwen2-VL) or RMSNorm (Qwen2.5-VL)


FAMILIES = {
    "qwen2_vl": Family("Qwen2VLForConditionalGeneration", "4.45", VISION_GROUPS, VISION_SMOOTH, _qwen2vl_block, True),
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", "4.49", Q25_VISION_GROUPS, Q25_VISION_SMOOTH,
                         _qwen25vl_block, False),
}


@dataclasses.dataclass(frozen=True)
class Arch:
    """The sizes of one Qwen2-VL or Qwen2.5-VL, read from config.json (flat 4.x layout or nested 5.x layout)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool
    vision_depth: int
    vision_embed_dim: int
    vision_mlp_dim: int
    vision_in_chans: int
    vision_patch_size: int
    vision_temporal_patch_size: int
    vision_merge_size: int
    image_token_id: int
    model_type: str = "qwen2_vl"
    vision_out_dim: int = 0  # the merger's output width (the LLM's hidden size); 0: hidden_size
    vision_window_size: int = 0  # Qwen2.5-VL: attention window side in pixels; 0: every block attends globally
    vision_fullatt_blocks: tuple[int, ...] = ()  # Qwen2.5-VL: the blocks that attend over the whole image

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @classmethod
    def from_dict(cls, cfg: dict) -> "Arch":
        text = {**cfg, **cfg.get("text_config", {})}
        vis = cfg.get("vision_config", {})
        model_type = cfg.get("model_type", "qwen2_vl")
        if model_type == "qwen2_5_vl":  # vision hidden_size is the blocks' width, out_hidden_size the merger's
            embed, mlp = vis.get("hidden_size", 1280), vis.get("intermediate_size", 3420)
            out = vis.get("out_hidden_size", text["hidden_size"])
            window, fullatt = vis.get("window_size", 112), tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31)))
        else:  # Qwen2-VL: embed_dim is the blocks' width, hidden_size the merger's
            embed = vis.get("embed_dim", 1280)
            mlp = int(embed * vis.get("mlp_ratio", 4))
            out, window, fullatt = text["hidden_size"], 0, ()
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_depth=vis.get("depth", 32),
            vision_embed_dim=embed,
            vision_mlp_dim=mlp,
            vision_in_chans=vis.get("in_chans", vis.get("in_channels", 3)),
            vision_patch_size=vis.get("patch_size", 14),
            vision_temporal_patch_size=vis.get("temporal_patch_size", 2),
            vision_merge_size=vis.get("spatial_merge_size", 2),
            image_token_id=cfg.get("image_token_id", text.get("image_token_id", 151655)),
            model_type=model_type,
            vision_out_dim=out,
            vision_window_size=window,
            vision_fullatt_blocks=fullatt,
        )


def read_config(model_path: str) -> dict:
    """config.json of a model directory, checked to be a Qwen2-VL or Qwen2.5-VL the installed transformers runs."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"model_path: {model_path} has no config.json; "
                        "point --model_path at a Qwen2-VL model directory")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"model_path: cannot read {path} ({e}); restore the model's config.json") from None
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"model_path: {model_path} holds model_type {model_type!r}, not a Qwen2-VL "
            f"(expected one of {', '.join(MODEL_TYPES)}); this tool quantizes Qwen2-VL and Qwen2.5-VL checkpoints only"
        )
    family = FAMILIES[model_type]
    if not os.path.isdir(os.path.join(os.path.dirname(transformers.__file__), "models", model_type)):  # no import
        raise UserError(
            f"model_path: {model_path} holds model_type {model_type!r}, which needs transformers >= {family.since} "
            f"(installed: {transformers.__version__}); pip install 'transformers>={family.since}'"
        )
    return cfg


def checkpoint_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2-VL / Qwen2.5-VL checkpoint holds, name -> shape, in module registration order (the
    order of transformers' state_dict, which is the order the reference writes its description json in)."""
    h, e, m = arch.hidden_size, arch.vision_embed_dim, arch.vision_mlp_dim
    kv = arch.num_kv_heads * arch.head_dim
    merged = e * arch.vision_merge_size**2
    out = arch.vision_out_dim or h
    p, t = arch.vision_patch_size, arch.vision_temporal_patch_size
    shapes: dict[str, tuple[int, ...]] = {"visual.patch_embed.proj.weight": (e, arch.vision_in_chans, t, p, p)}
    block = arch.family.vision_block(e, m)
    for i in range(arch.vision_depth):
        b = VISION_BLOCK.format(i=i)
        shapes.update({b + n: shape for n, shape in block.items()})
    shapes["visual.merger.ln_q.weight"] = (e,)
    if arch.family.merger_norm_bias:
        shapes["visual.merger.ln_q.bias"] = (e,)
    shapes.update({
        "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (out, merged), "visual.merger.mlp.2.bias": (out,),
        "model.embed_tokens.weight": (arch.vocab_size, h),
    })
    for i in range(arch.num_layers):
        b = DECODER_LAYER.format(i=i)
        shapes.update({
            b + "self_attn.q_proj.weight": (h, h), b + "self_attn.q_proj.bias": (h,),
            b + "self_attn.k_proj.weight": (kv, h), b + "self_attn.k_proj.bias": (kv,),
            b + "self_attn.v_proj.weight": (kv, h), b + "self_attn.v_proj.bias": (kv,),
            b + "self_attn.o_proj.weight": (h, h),
            b + "mlp.gate_proj.weight": (arch.intermediate_size, h),
            b + "mlp.up_proj.weight": (arch.intermediate_size, h),
            b + "mlp.down_proj.weight": (h, arch.intermediate_size),
            b + "input_layernorm.weight": (h,),
            b + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def decoder_index(name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to ('model.layers.7.mlp.up_proj.weight' -> 7), else None."""
    head = DECODER_LAYER.split("{")[0]
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".")[0]
    return int(index) if index.isdigit() else None


def observer_groups(arch: Arch) -> list[tuple[str, ...]]:
    """Every group of W8A8 linears (checkpoint prefixes without '.weight') that share one input, in run order."""
    groups = []
    for i in range(arch.vision_depth):
        groups += [tuple(VISION_BLOCK.format(i=i) + n for n in g) for g in unit_groups("vision", arch)]
    for i in range(arch.num_layers):
        groups += [tuple(DECODER_LAYER.format(i=i) + n for n in g) for g in unit_groups("decoder", arch)]
    return groups


def unit_groups(kind: str, arch: Arch) -> tuple[tuple[str, ...], ...]:
    """The observer groups of one vision block (kind 'vision') or decoder layer ('decoder'), names in the unit."""
    return arch.family.vision_groups if kind == "vision" else DECODER_GROUPS


def quantized_linears(arch: Arch) -> list[str]:
    return [name for group in observer_groups(arch) for name in group]


# The float linears as compressed-tensors' `ignore` patterns. Regexes, not names: re.match anchors at the start and
# the loaders name modules differently (transformers 5: model.language_model.layers.N..., model.visual...; 4.46 and
# the checkpoint: model.layers.N..., visual...; vLLM: language_model.model.layers.N..., visual...), so each
# pattern starts with ".*" and ends at the module name.
FLOAT_LINEAR_PATTERNS = ("lm_head", r"re:.*mlp\.down_proj$", r"re:.*mlp\.fc2$", r"re:.*merger\..*")
VISION_PATTERN = r"re:.*visual\..*"


def float_linear_patterns(arch: Arch) -> list[str]:
    """compressed-tensors' ignore list: every linear left float (the vision tower too where none of its linears
    is W8A8)."""
    out = list(FLOAT_LINEAR_PATTERNS)
    if not any(n.startswith("visual.") for n in quantized_linears(arch)):
        out.append(VISION_PATTERN)
    return out


# --- the live model: skeleton on meta, one block at a time -------------------------------------------------


def load_hf_config(model_path: str, trust_remote_code: bool):
    try:
        return transformers.AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                       local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise UserError(f"model_path: transformers cannot read {model_path}/config.json ({e})") from None


def build_skeleton(hf_config, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The model (Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration) with every parameter on
    the meta device (no memory); the small buffers (rotary inverse frequencies) stay real, on `device`."""
    from accelerate import init_empty_weights

    cls = getattr(transformers, FAMILIES[hf_config.model_type].model_class)
    kwargs = {"attn_implementation": "sdpa", ("dtype" if TF5 else "torch_dtype"): dtype}
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(hf_config, **kwargs)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model.eval()


def vision_tower(model: nn.Module) -> nn.Module:
    return model.model.visual if TF5 else model.visual


def text_model(model: nn.Module) -> nn.Module:
    return model.model.language_model if TF5 else model.model


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    return vision_tower(model).blocks


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return text_model(model).layers


def named_module(model: nn.Module, prefix: str) -> nn.Module:
    """The live module behind a checkpoint prefix such as 'visual.blocks.3.' or 'model.layers.7.'."""
    parts = prefix.rstrip(".").split(".")
    if parts[0] == "visual":
        mod, rest = vision_tower(model), parts[1:]
    elif parts[0] == "model":
        mod, rest = text_model(model), parts[1:]
    else:
        mod, rest = model, parts
    for p in rest:
        mod = mod[int(p)] if p.isdigit() else getattr(mod, p)
    return mod


def materialize(module: nn.Module, prefix: str, read) -> nn.Module:
    """Load the parameters under checkpoint `prefix` into `module` (which sits on meta). read(name) -> tensor."""
    state = {name: read(prefix + name) for name, _ in module.named_parameters()}
    module.load_state_dict(state, strict=False, assign=True)
    return module


def release(module: nn.Module) -> None:
    """Send a materialised module's parameters back to the meta device, freeing their memory."""
    module.to("meta")


@dataclasses.dataclass(frozen=True)
class VisionCall:
    """How one sample runs through the vision tower: blocks[i] = (args, kwargs) of block i (Qwen2.5-VL's windowed
    and full-attention blocks differ in cu_seqlens), and `order`, the rows of the merger output in image order
    (Qwen2.5-VL's blocks run on patches in window order), None when they already are."""

    blocks: tuple
    order: torch.Tensor | None


class _Recorder(nn.Module):
    """Stands in for vision block i for one pass: records its call (and block 0 its input), passes hidden through."""

    def __init__(self, sink: dict, i: int):
        super().__init__()
        self.sink, self.i = sink, i

    def forward(self, hidden_states, *args, **kwargs):
        if self.i == 0:
            self.sink["hidden"] = hidden_states
        self.sink["calls"].append((args, kwargs))
        return hidden_states


class _RowNumbers(nn.Module):
    """Stands in for the merger: returns its output rows' numbers, so whatever reordering the tower applies to the
    merger output comes back as an index vector."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, x):
        return torch.arange(x.shape[0] // self.unit, device=x.device)[:, None]


def vision_prefix(model: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor, read=None):
    """Patch-embed one sample's pixels and work out how every vision block is called and how the merger output is
    ordered.

    Runs the vision tower's own forward with recorders in place of the blocks and the merger, so the rotary
    embedding, each block's cu_seqlens and the window order come from the installed transformers version itself.
    Returns (hidden [patches, embed], VisionCall). With `read`, the patch embedding is loaded for this call and
    released after; without, it must be live.
    """
    visual = vision_tower(model)
    if read is not None:
        materialize(visual.patch_embed, "visual.patch_embed.", read)
    sink: dict = {"calls": []}
    blocks, merger = visual.blocks, visual.merger
    visual.blocks = nn.ModuleList([_Recorder(sink, i) for i in range(len(blocks))])
    visual.merger = _RowNumbers(visual.spatial_merge_size ** 2)
    try:
        out = visual(pixel_values.to(visual.patch_embed.proj.weight.dtype), grid_thw=grid_thw)
    finally:
        visual.blocks, visual.merger = blocks, merger
        if read is not None:
            release(visual.patch_embed)
    rows = out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output", None)
    rows = (out[1] if isinstance(out, tuple) else out) if rows is None else rows
    order = rows[:, 0].clone()
    if torch.equal(order, torch.arange(len(order), device=order.device)):
        order = None
    return sink["hidden"], VisionCall(tuple(sink["calls"]), order)


def unit_call(call, prefix: str):
    """The call of the unit at checkpoint `prefix` out of a sample's call: a vision block's own (args, kwargs) out
    of its VisionCall; a decoder call is every layer's."""
    if isinstance(call, VisionCall):
        return call.blocks[int(prefix.rstrip(".").rpartition(".")[2])]
    return call


def run_vision_block(block: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    """call: the block's own (args, kwargs) (unit_call)."""
    args, kwargs = call
    return block(hidden, *args, **kwargs)


def run_merger(merger: nn.Module, hidden: torch.Tensor, call: VisionCall) -> torch.Tensor:
    """The image embeddings [merged tokens, LLM hidden] in image order, from the last block's output."""
    out = merger(hidden)
    return out if call.order is None else out[call.order]


def rope_index(model: nn.Module, input_ids: torch.Tensor, grid_thw: torch.Tensor, image_token_id: int):
    """3-D mrope position ids [3, 1, L] for one sample (text, then image grid, then text)."""
    if TF5:
        owner = model.model
        params = inspect.signature(owner.get_rope_index).parameters
        if "mm_token_type_ids" in params:
            mm = (input_ids == image_token_id).int()
            return owner.get_rope_index(input_ids, mm, image_grid_thw=grid_thw)[0]
        return owner.get_rope_index(input_ids, image_grid_thw=grid_thw)[0]
    # by keyword: Qwen2.5-VL's 4.x signature has second_per_grid_ts before attention_mask
    return model.get_rope_index(input_ids, image_grid_thw=grid_thw, attention_mask=torch.ones_like(input_ids))[0]


def decoder_input(rows, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int,
                  device: torch.device) -> torch.Tensor:
    """The first decoder layer's input for one sample, [1, L, hidden]: the token embeddings (rows(name, ids) reads
    embedding rows) with the image embeddings scattered in at the image tokens."""
    h = rows("model.embed_tokens.weight", input_ids[0])[None].to(device)
    h[(input_ids == image_token_id).to(device)] = image_embeds.to(h.dtype)
    return h


def decoder_call(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """Keyword arguments for every decoder layer for one sample: causal attention (mask None -> sdpa is_causal,
    exact for one unpadded sequence) and the rotary embedding of the sample's 3-D mrope positions (rope_index),
    computed by the model's own rotary module. Everything a rank needs to run its layers on a sample it was sent."""
    position_ids = position_ids.to(hidden.device)
    cos_sin = text_model(model).rotary_emb(hidden, position_ids)
    kwargs = {"attention_mask": None, "position_embeddings": cos_sin}
    if not TF5:
        kwargs["position_ids"] = position_ids
    return (), kwargs


def run_decoder_layer(layer: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# --- what the anti-outlier searches need to know about the model -------------------------------------------------


def smooth_groups(kind: str, method: str, arch: Arch) -> list[SmoothGroup]:
    """The groups `method` smooths in a decoder layer (kind 'decoder') or a vision block ('vision')."""
    table = DECODER_SMOOTH if kind == "decoder" else arch.family.vision_smooth
    return [g for g in table if method in g.methods]


def v_layout(kind: str, arch: Arch) -> tuple[int, int, torch.Tensor | None]:
    """For a v -> o group: (first row of v in the source linear, its row count, tie) where tie maps each input
    channel of the output projection to its v row (grouped-query heads share one kv head), None if one to one."""
    if kind == "vision":
        e = arch.vision_embed_dim
        return 2 * e, e, None
    hd, rep = arch.head_dim, arch.num_heads // arch.num_kv_heads
    c = torch.arange(arch.num_heads * hd)
    tie = (c // hd // rep) * hd + c % hd
    return 0, arch.num_kv_heads * hd, (None if rep == 1 else tie)


def _slice_seq(v, start: int, end: int):
    """Cut tokens [start, end) out of rotary tables: the sequence axis is the second to last in every version
    (decoder cos/sin [(3,) 1, L, D], vision cos/sin [L, D] or rotary_pos_emb [L, D/2])."""
    if isinstance(v, torch.Tensor) and v.dim() >= 2:
        return v[..., start:end, :]
    if isinstance(v, tuple):
        return tuple(_slice_seq(x, start, end) for x in v)
    return v


def _clip_seqlens(cu: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """cu_seqlens of tokens [start, end): the sequence boundaries inside the window, so attention stays within both
    the window and the sequences (Qwen2.5-VL's attention windows) it cuts."""
    inner = cu[(cu > start) & (cu < end)] - start
    return torch.cat([cu.new_tensor([0]), inner, cu.new_tensor([end - start])])


def window_call(call, start: int, end: int):
    """The call of a layer restricted to tokens [start, end) of one sample: rotary tables and position ids cut to
    the window; for vision cu_seqlens cut to it (one sequence [0, w] when the block attends over the whole image),
    so attention stays within the window."""
    args, kwargs = call
    out = {}
    for k, v in kwargs.items():
        if k == "cu_seqlens":
            out[k] = _clip_seqlens(v, start, end)
        elif k == "max_seqlen":
            cu = _clip_seqlens(kwargs["cu_seqlens"], start, end) if "cu_seqlens" in kwargs else None
            out[k] = end - start if cu is None else int((cu[1:] - cu[:-1]).max())
        elif k == "position_ids" and isinstance(v, torch.Tensor):
            out[k] = v[..., start:end]
        else:
            out[k] = _slice_seq(v, start, end)
    return args, out


def _join(values: list, axis: int):
    """Concatenate per-window values (tensors, or tuples of them such as (cos, sin)) along `axis`."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, dim=axis)
    if isinstance(first, tuple):
        return tuple(_join([v[i] for v in values], axis) for i in range(len(first)))
    return first


BATCH_TOKENS = 512  # tokens per batched attention call (4.46's vision attention masks the whole batch)


def batch_windows(kind: str, calls: list) -> list[tuple[list[int], tuple]]:
    """Group window calls (window_call) into batched calls: [(window indices, call)], so a search scores many
    windows per module call. Decoder windows of one length are stacked along the batch axis (each stays its own
    causal sequence); vision windows are joined into one sequence whose cu_seqlens keeps them apart."""
    lengths = []
    for _, kw in calls:
        cos = kw.get("position_embeddings", kw.get("rotary_pos_emb"))
        lengths.append(int((cos[0] if isinstance(cos, tuple) else cos).shape[-2]))
    batches: list[list[int]] = []
    for i, n in enumerate(lengths):
        same = [b for b in batches if (kind == "vision" or lengths[b[0]] == n)
                and sum(lengths[j] for j in b) + n <= max(BATCH_TOKENS, n)]
        if same:
            same[-1].append(i)
        else:
            batches.append([i])
    out = []
    for b in batches:
        parts = [calls[i][1] for i in b]
        kwargs = {}
        for k, v in parts[0].items():
            if k == "cu_seqlens":  # each window's sequences, one after the other
                ends = [p[k][1:] for p in parts]
                offsets = torch.tensor([0] + [lengths[i] for i in b[:-1]]).cumsum(0).tolist()
                kwargs[k] = torch.cat([v.new_tensor([0])] + [e + o for e, o in zip(ends, offsets)])
            elif k == "max_seqlen":
                kwargs[k] = max(p[k] if isinstance(p[k], int) else lengths[i] for i, p in zip(b, parts))
            elif kind == "vision":
                kwargs[k] = _join([p[k] for p in parts], -2)  # the sequence axis
            elif k == "position_ids" and isinstance(v, torch.Tensor):
                kwargs[k] = _join([p[k] for p in parts], -2)  # [3, B, L]: the batch axis
            else:
                kwargs[k] = _join([p[k] for p in parts], -3)  # cos/sin [(3,) B, L, D]: the batch axis
        out.append((b, (calls[b[0]][0], kwargs)))
    return out


def _as_float(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.float()
    if isinstance(v, tuple):
        return tuple(_as_float(x) for x in v)
    return v


def group_combine(layer: nn.Module, group: SmoothGroup):
    """Token-wise groups: combine(ys) -> the group output from each linear's output ys[i] (the layer's own
    activation); None for attention."""
    if group.output == "linear":
        return lambda ys: ys[0]
    if group.output == "gated_mlp":
        act = layer.get_submodule("mlp").act_fn
        return lambda ys: act(ys[0]) * ys[1]
    if group.output == "mlp":
        act = layer.get_submodule("mlp").act
        return lambda ys: act(ys[0])
    return None


class _Given(nn.Module):
    """Stands in for a linear inside an attention module: its output is fn(input) (the integer kernel's)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _attention(kind: str, layer: nn.Module, group: SmoothGroup, calls: list):
    """(run, leaves) for an attention group: run(xs, swap, params) takes windows xs (in the order of calls) through
    the live attention module batch by batch (batch_windows) with its output projection left out, the children in
    `swap` replaced and `params` (functional_call) in place of its own; one float32 output per batch."""
    attn_name, out_name = ATTENTION[kind]
    attn = layer.get_submodule(attn_name)
    leaves = [n[len(attn_name) + 1:] for n in group.linears]
    batches = [(idx, (_as_float(a), {k: _as_float(v) for k, v in kw.items()}))
               for idx, (a, kw) in batch_windows(kind, calls)]

    def run(xs, swap: dict, params: dict | None = None):
        swap = {out_name: nn.Identity(), **swap}
        kept = {n: getattr(attn, n) for n in swap}
        for n, m in swap.items():
            setattr(attn, n, m)
        try:
            outs = []
            for idx, (args, kwargs) in batches:
                h = torch.cat([xs[i] for i in idx]) if kind == "vision" else torch.stack([xs[i] for i in idx])
                if params is None:
                    o = attn(h, *args, **kwargs)
                else:
                    o = torch.func.functional_call(attn, params, (h, *args), kwargs, strict=False)
                o = o[0] if isinstance(o, tuple) else o
                outs.append(o.reshape(-1, o.shape[-1]).float())
            return outs
        finally:
            for n, m in kept.items():
                setattr(attn, n, m)

    return run, leaves


def group_output(kind: str, layer: nn.Module, group: SmoothGroup, calls: list):
    """(output, attend) of a group. output(xs, ws, bs) -> float32 outputs: the group output the searches measure,
    computed by the live layer's own modules (rotary, heads, masks and activation of the installed transformers)
    with the given weights. Token-wise outputs: one per x; attend is None. Attention: calls[i] is window i's call
    (window_call), xs[i] its tokens, and the windows are run in batches (batch_windows, built once for both), one
    output per batch; attend(codes, linears) gives the same outputs from the windows' int8 activation codes, with
    the group's linears replaced by the functions in `linears` (each maps its input codes to its output: an
    int8.Kernel for the quantized group)."""
    combine = group_combine(layer, group)
    if combine is not None:
        return (lambda xs, ws, bs: [combine([torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)])
                                    for x in xs]), None
    run, leaves = _attention(kind, layer, group, calls)

    def attention(xs, ws, bs):
        params = {}
        for leaf, w, b in zip(leaves, ws, bs):
            params[leaf + ".weight"] = w
            if b is not None:
                params[leaf + ".bias"] = b
        return run(xs, {}, params)

    return attention, lambda codes, linears: run(codes, {leaf: _Given(f) for leaf, f in zip(leaves, linears)})
