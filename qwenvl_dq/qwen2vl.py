"""THE model adapter for Qwen2-VL: every fact about the model lives here, and nowhere else.

- the checkpoint key table (on-disk names are the same for transformers 4.46 and 5.x),
- which linears are W8A8 and which linears read the same input (they share one activation observer),
- how to build the model skeleton on the meta device and materialise one block or layer at a time,
- how to run one vision block and one decoder layer for the installed transformers version.

The rest of the package speaks in checkpoint names ("model.layers.3.self_attn.q_proj") and never touches
transformers' module tree.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import torch
import transformers
from torch import nn

from .errors import UserError

TF5 = int(transformers.__version__.split(".")[0]) >= 5

MODEL_TYPES = ("qwen2_vl",)

VISION_BLOCK = "visual.blocks.{i}."
DECODER_LAYER = "model.layers.{i}."

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


@dataclasses.dataclass(frozen=True)
class Arch:
    """The sizes of one Qwen2-VL, read from config.json (flat 4.46 layout or nested 5.x layout)."""

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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, cfg: dict) -> "Arch":
        text = {**cfg, **cfg.get("text_config", {})}
        vis = cfg.get("vision_config", {})
        embed = vis.get("embed_dim", 1280)
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
            vision_mlp_dim=int(embed * vis.get("mlp_ratio", 4)),
            vision_in_chans=vis.get("in_chans", vis.get("in_channels", 3)),
            vision_patch_size=vis.get("patch_size", 14),
            vision_temporal_patch_size=vis.get("temporal_patch_size", 2),
            vision_merge_size=vis.get("spatial_merge_size", 2),
            image_token_id=cfg.get("image_token_id", text.get("image_token_id", 151655)),
        )


def read_config(model_path: str) -> dict:
    """config.json of a model directory, checked to be a Qwen2-VL."""
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
            f"(expected one of {', '.join(MODEL_TYPES)}); this tool quantizes Qwen2-VL checkpoints only"
        )
    return cfg


def checkpoint_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2-VL checkpoint holds, name -> shape, in module registration order (the order of
    transformers 4.46's state_dict, which is the order the reference writes its description json in)."""
    h, e, m = arch.hidden_size, arch.vision_embed_dim, arch.vision_mlp_dim
    kv = arch.num_kv_heads * arch.head_dim
    merged = e * arch.vision_merge_size**2
    p, t = arch.vision_patch_size, arch.vision_temporal_patch_size
    shapes: dict[str, tuple[int, ...]] = {"visual.patch_embed.proj.weight": (e, arch.vision_in_chans, t, p, p)}
    for i in range(arch.vision_depth):
        b = VISION_BLOCK.format(i=i)
        shapes.update({
            b + "norm1.weight": (e,), b + "norm1.bias": (e,),
            b + "norm2.weight": (e,), b + "norm2.bias": (e,),
            b + "attn.qkv.weight": (3 * e, e), b + "attn.qkv.bias": (3 * e,),
            b + "attn.proj.weight": (e, e), b + "attn.proj.bias": (e,),
            b + "mlp.fc1.weight": (m, e), b + "mlp.fc1.bias": (m,),
            b + "mlp.fc2.weight": (e, m), b + "mlp.fc2.bias": (e,),
        })
    shapes.update({
        "visual.merger.ln_q.weight": (e,), "visual.merger.ln_q.bias": (e,),
        "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (h, merged), "visual.merger.mlp.2.bias": (h,),
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


def observer_groups(arch: Arch) -> list[tuple[str, ...]]:
    """Every group of W8A8 linears (checkpoint prefixes without '.weight') that share one input, in run order."""
    groups = []
    for i in range(arch.vision_depth):
        groups += [tuple(VISION_BLOCK.format(i=i) + n for n in g) for g in VISION_GROUPS]
    for i in range(arch.num_layers):
        groups += [tuple(DECODER_LAYER.format(i=i) + n for n in g) for g in DECODER_GROUPS]
    return groups


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
    """Qwen2VLForConditionalGeneration with every parameter on the meta device (no memory); the small buffers
    (rotary inverse frequencies) stay real, on `device`."""
    from accelerate import init_empty_weights

    cls = transformers.Qwen2VLForConditionalGeneration
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


class _Recorder(nn.Module):
    """Stands in for the vision blocks for one pass: records what block 0 is called with, passes hidden through."""

    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        if not self.sink:
            self.sink.append((hidden_states, args, kwargs))
        return hidden_states


def vision_prefix(model: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor, read=None):
    """Patch-embed one sample's pixels and work out the keyword arguments every vision block is called with.

    Runs the vision tower's own forward with recorders in place of the blocks, so the rotary embedding and
    cu_seqlens come from the installed transformers version itself. Returns (hidden [patches, embed], call).
    With `read`, the patch embedding is loaded for this call and released after; without, it must be live.
    """
    visual = vision_tower(model)
    if read is not None:
        materialize(visual.patch_embed, "visual.patch_embed.", read)
    sink: list = []
    blocks, merger = visual.blocks, visual.merger
    visual.blocks = nn.ModuleList([_Recorder(sink)])
    visual.merger = nn.Identity()
    try:
        visual(pixel_values.to(visual.patch_embed.proj.weight.dtype), grid_thw=grid_thw)
    finally:
        visual.blocks, visual.merger = blocks, merger
        if read is not None:
            release(visual.patch_embed)
    hidden, args, kwargs = sink[0]
    return hidden, (args, kwargs)


def run_vision_block(block: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    args, kwargs = call
    return block(hidden, *args, **kwargs)


def rope_index(model: nn.Module, input_ids: torch.Tensor, grid_thw: torch.Tensor, image_token_id: int):
    """3-D mrope position ids [3, 1, L] for one sample (text, then image grid, then text)."""
    if TF5:
        owner = model.model
        params = inspect.signature(owner.get_rope_index).parameters
        if "mm_token_type_ids" in params:
            mm = (input_ids == image_token_id).int()
            return owner.get_rope_index(input_ids, mm, image_grid_thw=grid_thw)[0]
        return owner.get_rope_index(input_ids, image_grid_thw=grid_thw)[0]
    return model.get_rope_index(input_ids, grid_thw, None, torch.ones_like(input_ids))[0]


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


def smooth_groups(kind: str, method: str) -> list[SmoothGroup]:
    """The groups `method` smooths in a decoder layer (kind 'decoder') or a vision block ('vision')."""
    table = DECODER_SMOOTH if kind == "decoder" else VISION_SMOOTH
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


def window_call(call, start: int, end: int):
    """The call of a layer restricted to tokens [start, end) of one sample: rotary tables and position ids cut to
    the window; for vision one sequence (cu_seqlens [0, w]), so attention stays within the window."""
    args, kwargs = call
    out = {}
    for k, v in kwargs.items():
        if k == "cu_seqlens":
            out[k] = torch.tensor([0, end - start], dtype=v.dtype, device=v.device)
        elif k == "max_seqlen":
            out[k] = end - start
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
            if k == "cu_seqlens":
                n = torch.tensor([0] + [lengths[i] for i in b], dtype=v.dtype, device=v.device)
                kwargs[k] = n.cumsum(0).to(v.dtype)
            elif k == "max_seqlen":
                kwargs[k] = max(lengths[i] for i in b)
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


def group_output(kind: str, layer: nn.Module, group: SmoothGroup, calls: list):
    """f(xs, ws, bs) -> float32 outputs: the group output the searches measure, computed by the live layer's own
    modules (rotary, heads, masks and activation of the installed transformers) with the given weights. Token-wise
    outputs: one per x. Attention: calls[i] is window i's call (window_call), xs[i] its tokens, and the windows are
    run in batches (batch_windows), one output per batch."""
    if group.output == "linear":
        return lambda xs, ws, bs: [torch.nn.functional.linear(x, ws[0], bs[0]) for x in xs]
    if group.output == "gated_mlp":
        act = layer.get_submodule("mlp").act_fn
        return lambda xs, ws, bs: [act(torch.nn.functional.linear(x, ws[0], bs[0])) *
                                   torch.nn.functional.linear(x, ws[1], bs[1]) for x in xs]
    if group.output == "mlp":
        act = layer.get_submodule("mlp").act
        return lambda xs, ws, bs: [act(torch.nn.functional.linear(x, ws[0], bs[0])) for x in xs]
    attn_name, out_name = ATTENTION[kind]
    attn = layer.get_submodule(attn_name)
    leaves = [n[len(attn_name) + 1:] for n in group.linears]
    batches = [(idx, (_as_float(a), {k: _as_float(v) for k, v in kw.items()}))
               for idx, (a, kw) in batch_windows(kind, calls)]

    def attention(xs, ws, bs):
        """xs: the windows, in the order of calls; one output per batch of windows."""
        params = {}
        for leaf, w, b in zip(leaves, ws, bs):
            params[leaf + ".weight"] = w
            if b is not None:
                params[leaf + ".bias"] = b
        out_proj = getattr(attn, out_name)
        setattr(attn, out_name, nn.Identity())
        try:
            outs = []
            for idx, (args, kwargs) in batches:
                h = torch.cat([xs[i] for i in idx]) if kind == "vision" else torch.stack([xs[i] for i in idx])
                o = torch.func.functional_call(attn, params, (h, *args), kwargs, strict=False)
                o = o[0] if isinstance(o, tuple) else o
                outs.append(o.reshape(-1, o.shape[-1]).float())
            return outs
        finally:
            setattr(attn, out_name, out_proj)

    return attention
