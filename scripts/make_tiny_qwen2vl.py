#!/usr/bin/env python3
"""Write a small Qwen2-VL (or Qwen2.5-VL) model directory with random weights, for tests, the demo and benchmarks.

The directory looks like a real checkpoint: config.json in the flat layout of Qwen2-VL-7B-Instruct /
Qwen2.5-VL-7B-Instruct (which transformers 4.x and 5.x both read), sharded safetensors with
model.safetensors.index.json and the original key names, an offline byte-level BPE tokenizer (tokenizer.json,
vocab.json, merges.txt), the Qwen2-VL chat template (Qwen2.5-VL's is the same), and an image processor config.
Weights come from a fixed seed.

Activation outliers are injected on purpose, as real checkpoints have them: a few channels of every RMSNorm /
LayerNorm weight are scaled up (and Qwen2-VL's vision LayerNorm biases shifted), so the inputs of q/k/v, gate/up,
qkv and fc1 (Qwen2.5-VL: the vision gate/up) carry channels far larger than the rest, and smoothing measurably
matters.

    python scripts/make_tiny_qwen2vl.py OUT_DIR [--num_hidden_layers 4] [--dtype float16] ...
    python scripts/make_tiny_qwen2vl.py OUT_DIR --model_type qwen2_5_vl   # 4 vision blocks, full attention in 1 and 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from qwenvl_dq.qwen2vl import Arch, checkpoint_shapes  # noqa: E402

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Please describe this picture in detail.",
    "You are a helpful assistant.",
    "The picture shows a cat sitting on a wooden table next to a cup of coffee in the morning light.",
    "A rocket stands on the launch pad while clouds drift across a bright blue sky over the sea.",
    "Two people walk along a city street with tall buildings, cars, trees and a red bus in the distance.",
    "In the image there is a plate of food with rice, vegetables and meat, and a glass of water.",
    "The astronaut floats in space above the earth; the moon and the stars are visible behind the station.",
    "user assistant system image video describe detail colour color light dark left right top bottom",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 , . ! ? ; : ' \" ( ) [ ] { } - + = * / \\ # @ & % $",
]


def build_tokenizer(out_dir: str, vocab_size: int) -> dict[str, int]:
    """Train a byte-level BPE on a small fixed corpus (deterministic); returns special token -> id."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tok.model.save(out_dir)  # vocab.json + merges.txt, as Qwen2-VL ships them
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in ids.items()
    }
    tok_cfg = {
        "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS[1:]],
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        "padding_side": "left",
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_cfg)
    _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
    return ids


def model_config(args, ids: dict[str, int]) -> dict:
    head_dim = args.hidden_size // args.num_attention_heads
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]  # 16/24/24 of 64 in the real model
    q25 = args.model_type == "qwen2_5_vl"
    if q25:  # the layout of Qwen2.5-VL-7B-Instruct's vision_config
        vision = {
            "depth": args.vision_depth,
            "hidden_act": "silu",
            "hidden_size": args.vision_embed_dim,
            "intermediate_size": args.vision_intermediate_size,
            "num_heads": args.vision_num_heads,
            "in_chans": 3,
            "out_hidden_size": args.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": args.window_size,
            "fullatt_block_indexes": args.fullatt_block_indexes,
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        }
    else:
        vision = {
            "depth": args.vision_depth,
            "embed_dim": args.vision_embed_dim,
            "mlp_ratio": 4,
            "num_heads": args.vision_num_heads,
            "in_chans": 3,
            "hidden_size": args.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration" if q25 else "Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": args.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": args.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": args.num_hidden_layers,
        "model_type": args.model_type,
        "num_attention_heads": args.num_attention_heads,
        "num_hidden_layers": args.num_hidden_layers,
        "num_key_value_heads": args.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": args.dtype,
        "transformers_version": "4.49.0" if q25 else "4.46.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": vision,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "vocab_size": args.vocab_size,
    }


def random_weights(arch: Arch, seed: int, dtype: torch.dtype, outlier_scale: float) -> dict[str, torch.Tensor]:
    """Random weights (std 0.02 like the HF init, small random biases) with injected outlier channels."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(arch).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight") or ".norm1.weight" in name \
                or ".norm2.weight" in name or name.endswith("ln_q.weight"):
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
            if "ln_q" not in name and name != "model.norm.weight":
                idx = torch.randperm(shape[0], generator=g)[:max(2, shape[0] // 32)]
                w[idx] *= outlier_scale * (0.5 + torch.rand(len(idx), generator=g))
        elif name.endswith(".bias") and (".norm1." in name or ".norm2." in name):
            w = 0.05 * torch.randn(shape, generator=g)
            idx = torch.randperm(shape[0], generator=g)[:max(2, shape[0] // 32)]
            w[idx] += outlier_scale / 4 * torch.sign(torch.randn(len(idx), generator=g))
        elif name.endswith(".bias"):
            w = 0.02 * torch.randn(shape, generator=g)
        else:
            w = 0.02 * torch.randn(shape, generator=g)
        out[name] = w.to(dtype).contiguous()
    return out


def write_shards(out_dir: str, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    names = list(tensors)
    per = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for k in range(num_shards):
        chunk = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n in chunk:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def build(out_dir: str, argv: list[str] | None = None) -> str:
    """Write the model directory (see parse_args for the sizes); returns out_dir."""
    args = parse_args([out_dir] + list(argv or []))
    os.makedirs(out_dir, exist_ok=True)
    ids = build_tokenizer(out_dir, args.tokenizer_vocab)
    cfg = model_config(args, ids)
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False, "transformers_version": "4.46.0"})
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor" if args.model_type == "qwen2_5_vl" else "Qwen2VLProcessor"})
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    tensors = random_weights(Arch.from_dict(cfg), args.seed, dtype, args.outlier_scale)
    write_shards(out_dir, tensors, args.num_shards)
    return out_dir


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--model_type", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_vl")
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--intermediate_size", type=int, default=176)
    p.add_argument("--num_hidden_layers", type=int, default=3)
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--num_key_value_heads", type=int, default=2)
    p.add_argument("--vocab_size", type=int, default=512, help="embedding rows (>= tokenizer_vocab)")
    p.add_argument("--tokenizer_vocab", type=int, default=400)
    p.add_argument("--vision_depth", type=int, default=None, help="default 2 (qwen2_5_vl: 4)")
    p.add_argument("--vision_embed_dim", type=int, default=32)
    p.add_argument("--vision_num_heads", type=int, default=2)
    p.add_argument("--vision_intermediate_size", type=int, default=64, help="qwen2_5_vl: the vision gated MLP's width")
    p.add_argument("--window_size", type=int, default=112,
                   help="qwen2_5_vl: attention window side in pixels (112 as released: 4 x 4 merged patches, so "
                        "the bundled images at the default max_pixels make 4 windows)")
    p.add_argument("--fullatt_block_indexes", type=int, nargs="*", default=None,
                   help="qwen2_5_vl: the vision blocks that attend over the whole image (default 1 3)")
    p.add_argument("--min_pixels", type=int, default=56 * 56)
    p.add_argument("--max_pixels", type=int, default=28 * 28 * 48,
                   help="image processor limit (real models: 12845056); small keeps tests fast")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--num_shards", type=int, default=2)
    p.add_argument("--outlier_scale", type=float, default=24.0,
                   help="how much larger the injected outlier channels are than the rest")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.vocab_size < args.tokenizer_vocab:
        p.error(f"--vocab_size {args.vocab_size} must be >= --tokenizer_vocab {args.tokenizer_vocab}")
    q25 = args.model_type == "qwen2_5_vl"
    if args.vision_depth is None:
        args.vision_depth = 4 if q25 else 2
    if args.fullatt_block_indexes is None:
        args.fullatt_block_indexes = [1, 3] if q25 else []
    if not q25 and args.fullatt_block_indexes:
        p.error("--fullatt_block_indexes is for --model_type qwen2_5_vl (every Qwen2-VL block attends globally)")
    bad = [i for i in args.fullatt_block_indexes if not 0 <= i < args.vision_depth]
    if bad:
        p.error(f"--fullatt_block_indexes {bad[0]} is not a vision block (0..{args.vision_depth - 1})")
    return args


if __name__ == "__main__":
    a = parse_args(sys.argv[1:])
    build(a.out_dir, sys.argv[2:])
    print(a.out_dir)
