"""Qwen2.5-VL (model_type qwen2_5_vl): the adapter's vision tower against transformers', quantize none/m2/m4 on one
rank (tensor names, dtypes, description json), the quality report, two ranks byte-identical to one, the plan.

The tiny model: 4 vision blocks (full attention in 1 and 3, windows of 4 x 4 merged patches elsewhere: 4 windows on
each bundled image), 2 decoder layers, built once for the module."""

import json
import math
import os

import pytest
import torch
import transformers
from safetensors import safe_open

import make_tiny_qwen2vl
from conftest import CALIB, ROOT, dir_hashes, quantize, run_ranks
from qwenvl_dq import calib_data, evaluate, qwen2vl
from qwenvl_dq.checkpoint import Checkpoint
from qwenvl_dq.cli import main
from qwenvl_dq.errors import UserError

HAS_Q25 = hasattr(transformers, "Qwen2_5_VLForConditionalGeneration")
needs_q25 = pytest.mark.skipif(not HAS_Q25, reason=f"Qwen2.5-VL is not in transformers {transformers.__version__} "
                                                   "(it arrived in 4.49)")
HELDOUT = os.path.join(ROOT, "tests", "data", "heldout")
CONFIG_7B = os.path.join(ROOT, "tests", "data", "configs", "Qwen2.5-VL-7B-Instruct")
FLAGS = ("--calib_num", "1", "--mindie_format")
QUANT = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")
VISION_W8A8 = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj")
DECODER_W8A8 = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj")


@pytest.fixture(scope="module")
def q25_model(tmp_path_factory):
    return make_tiny_qwen2vl.build(str(tmp_path_factory.mktemp("models") / "tiny_q25"),
                                   ["--model_type", "qwen2_5_vl", "--num_hidden_layers", "2"])


@pytest.fixture(scope="module")
def outputs(q25_model, tmp_path_factory):
    """{method: output directory} of one-rank runs."""
    base = tmp_path_factory.mktemp("q25")
    out = {}
    for method in ("none", "m2", "m4"):
        assert quantize(q25_model, base / method, "--anti_method", method, *FLAGS) == 0
        out[method] = str(base / method)
    return out


def tensors_of(out):
    with safe_open(os.path.join(out, "quant_model_weight_w8a8.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def expected_description():
    """name -> W8A8 / FLOAT of the tiny Qwen2.5-VL's output, written out by hand from msModelSlim's rules."""
    desc = {"visual.patch_embed.proj.weight": "FLOAT"}

    def linear(p, quantized, bias=True):  # in the reference's order: weight, bias, then the quantization tensors
        desc[f"{p}.weight"] = "W8A8" if quantized else "FLOAT"
        if bias:
            desc[f"{p}.bias"] = "FLOAT"
        if quantized:
            desc.update({f"{p}.{leaf}": "W8A8" for leaf in QUANT[1:]})

    for i in range(4):
        b = f"visual.blocks.{i}."
        desc.update({b + "norm1.weight": "FLOAT", b + "norm2.weight": "FLOAT"})
        for n in VISION_W8A8:
            linear(b + n, True)
        linear(b + "mlp.down_proj", False)
    desc["visual.merger.ln_q.weight"] = "FLOAT"
    linear("visual.merger.mlp.0", False)
    linear("visual.merger.mlp.2", False)
    desc["model.embed_tokens.weight"] = "FLOAT"
    for i in range(2):
        b = f"model.layers.{i}."
        for n in DECODER_W8A8:
            linear(b + n, True, bias=n in DECODER_W8A8[:3])
        linear(b + "mlp.down_proj", False, bias=False)
        desc.update({b + "input_layernorm.weight": "FLOAT", b + "post_attention_layernorm.weight": "FLOAT"})
    desc.update({"model.norm.weight": "FLOAT", "lm_head.weight": "FLOAT"})
    return desc


@needs_q25
def test_block_by_block_vision_tower_matches_transformers(q25_model):
    """Each block with its own cu_seqlens, then the merger and the un-permute, equals the tower's own forward."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(q25_model, dtype=torch.float32).eval()
    visual = qwen2vl.vision_tower(model)
    samples = calib_data.load_samples(CALIB, q25_model, limit=2)
    with torch.inference_mode():
        for s in samples:
            ref = visual(s.pixel_values, grid_thw=s.image_grid_thw).pooler_output
            h, call = qwen2vl.vision_prefix(model, s.pixel_values, s.image_grid_thw)
            for i, block in enumerate(visual.blocks):
                h = qwen2vl.run_vision_block(block, h, qwen2vl.unit_call(call, f"visual.blocks.{i}."))
            got = qwen2vl.run_merger(visual.merger, h, call)
            assert (got - ref).abs().max().item() == 0.0
            n = int(s.image_grid_thw.prod())
            seqlens = [c[1]["cu_seqlens"].tolist() for c in call.blocks]
            assert seqlens[1] == seqlens[3] == [0, n]  # fullatt_block_indexes [1, 3]
            assert seqlens[0] == seqlens[2] and len(seqlens[0]) - 1 == 4  # 4 windows
            assert call.order is not None and not torch.equal(call.order, torch.arange(len(call.order)))
            assert sorted(call.order.tolist()) == list(range(n // 4))


@needs_q25
@pytest.mark.parametrize("method", ["none", "m2", "m4"])
def test_output_names_dtypes_and_description(outputs, q25_model, method):
    out = outputs[method]
    tensors = tensors_of(out)
    desc = json.load(open(os.path.join(out, "quant_model_description_w8a8.json")))
    want = expected_description()
    assert list(desc)[0] == "model_quant_type" and desc.pop("model_quant_type") == "W8A8"
    assert desc == want and list(desc) == list(want) and set(tensors) == set(want)
    assert len(tensors) == 249
    dtypes = {}
    for name, t in tensors.items():
        dtypes[str(t.dtype)] = dtypes.get(str(t.dtype), 0) + 1
        leaf = name.rpartition(".")[2]
        expect = {"weight": torch.int8 if desc[name] == "W8A8" else torch.bfloat16, "quant_bias": torch.int32,
                  "deq_scale": torch.float32}.get(leaf, torch.bfloat16)
        assert t.dtype == expect, name
    assert dtypes == {"torch.bfloat16": 165, "torch.int8": 28, "torch.int32": 28, "torch.float32": 28}
    # one observer per input: q/k/v, the decoder's and the vision gate/up carry one activation scale
    for a, b in (("visual.blocks.2.mlp.gate_proj", "visual.blocks.2.mlp.up_proj"),
                 ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"),
                 ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")):
        assert torch.equal(tensors[a + ".input_scale"], tensors[b + ".input_scale"])
        assert torch.equal(tensors[a + ".input_offset"], tensors[b + ".input_offset"])
    src = Checkpoint(q25_model)
    norm = "visual.blocks.0.norm1.weight"
    assert torch.equal(tensors[norm], src.get(norm)) == (method == "none")
    # RMSNorm has no bias: m2 scales only, so no shift reaches the linears' biases; m4's v -> o divides v's rows
    for p in ("visual.blocks.0.attn.qkv.bias", "visual.blocks.3.mlp.gate_proj.bias"):
        assert torch.equal(tensors[p], src.get(p)) == (method != "m4" or "qkv" not in p)
    src.close()


@needs_q25
def test_evaluate_gives_figures_and_m2_is_not_worse_than_none(outputs, q25_model):
    report = evaluate.evaluate(q25_model, [(m, outputs[m]) for m in ("none", "m2", "m4")], HELDOUT, limit=2)
    runs = report["runs"]
    assert {m: r["w8a8_linears"] for m, r in runs.items()} == {"none": 28, "m2": 28, "m4": 28}
    assert [len(r["sqnr_db"]["vision"]) for r in runs.values()] == [4, 4, 4]
    # measured (transformers 5.24, torch 2.13 cpu): logits cosine none 0.99775, m2 0.99904, m4 0.99927; mean SQNR dB
    # LLM 23.05 / 25.63 / 25.75, vision 38.87 / 39.22 / 38.99
    for m, r in runs.items():
        assert r["logits_cosine"] > 0.997, (m, r["logits_cosine"])
        assert r["mean_sqnr_db"]["vision"] > 38, (m, r["mean_sqnr_db"])
    for m in ("m2", "m4"):
        assert runs[m]["logits_cosine"] >= runs["none"]["logits_cosine"]
        assert runs[m]["mean_sqnr_db"]["llm"] >= runs["none"]["mean_sqnr_db"]["llm"] + 1.0
    assert runs["m2"]["mean_sqnr_db"]["vision"] >= runs["none"]["mean_sqnr_db"]["vision"] - 0.5


@needs_q25
def test_two_ranks_are_byte_identical_to_one(outputs, q25_model, tmp_path):
    out = tmp_path / "two"
    argv = ["--model_path", q25_model, "--save_directory", str(out), "--calib_images", CALIB, "--device_type", "cpu",
            "--anti_method", "m2", *FLAGS]
    results = run_ranks(2, argv)
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert dir_hashes(str(out)) == dir_hashes(outputs["m2"])


def test_plan_sizes_of_the_published_7b_config(tmp_path, capsys):
    cfg = json.load(open(os.path.join(CONFIG_7B, "config.json")))
    arch = qwen2vl.Arch.from_dict(cfg)
    assert (arch.vision_embed_dim, arch.vision_mlp_dim, arch.vision_out_dim, arch.vision_window_size,
            arch.vision_fullatt_blocks) == (1280, 3420, 3584, 112, (7, 15, 23, 31))
    # the 5.x layout of the same model (text_config nested) reads the same
    nested = {k: v for k, v in cfg.items() if k in ("architectures", "model_type", "image_token_id", "vision_config",
                                                   "tie_word_embeddings")}
    nested["text_config"] = {k: v for k, v in cfg.items() if k not in nested}
    assert qwen2vl.Arch.from_dict(nested) == arch
    shapes = qwen2vl.checkpoint_shapes(arch)
    assert sum(math.prod(s) for s in shapes.values()) == 8_292_166_656  # Qwen2.5-VL-7B-Instruct's parameters
    assert len(shapes) == 729 and not any(".norm1.bias" in n or ".fc1." in n for n in shapes)
    if HAS_Q25:  # the table is transformers' own model, name for name and shape for shape
        model = qwen2vl.build_skeleton(qwen2vl.load_hf_config(CONFIG_7B, False), torch.bfloat16)
        live = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): tuple(v.shape)
                for k, v in model.state_dict().items()}
        assert live == shapes
    code = main(["quantize", "--model_path", CONFIG_7B, "--save_directory", str(tmp_path / "o"), "--dry_run",
                 "--ranks", "2", "--max_memory", "32"])
    if not HAS_Q25:  # refused before anything is planned (test_old_transformers_refuses_qwen2_5_vl_with_the_fix)
        assert code == 2
        return
    assert code == 0
    assert capsys.readouterr().out.splitlines()[:4] == [
        "model: 32 vision blocks, 28 decoder layers, 15.45 GiB of weights (bfloat16)",
        "plan: 2 ranks, 32.00 GiB per rank, 30 images x 1024 tokens",
        "rank 0: decoder layers 0..8 (9 layers + vision tower): 5.17 GiB of weights, holds its slice, pipelined, "
        "estimated peak 28.63 GiB",  # m2: 18.75 GiB of it the vision blocks' kept inputs (calibrate.Store)
        "rank 1: decoder layers 9..27 (19 layers): 8.25 GiB of weights, holds its slice, pipelined, "
        "estimated peak 17.88 GiB",
    ]


@pytest.mark.skipif(HAS_Q25, reason="the installed transformers has Qwen2.5-VL")
def test_old_transformers_refuses_qwen2_5_vl_with_the_fix():
    with pytest.raises(UserError) as e:
        qwen2vl.read_config(CONFIG_7B)
    assert str(e.value) == (f"model_path: {CONFIG_7B} holds model_type 'qwen2_5_vl', which needs transformers >= 4.49 "
                            f"(installed: {transformers.__version__}); pip install 'transformers>=4.49'")
