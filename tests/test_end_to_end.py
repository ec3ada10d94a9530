"""Quantize the tiny model end to end and check the output against SPEC section 3, tensor by tensor."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, dir_hashes, quantize
from qwenvl_dq import qwen2vl
from qwenvl_dq.checkpoint import Checkpoint

PART_GB = 0.0001  # about 107 KB: the tiny model's output spans several parts

SIDE_FILES = {"chat_template.json", "generation_config.json", "merges.txt", "preprocessor_config.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.json"}


def load_output(out):
    tensors = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            part = load_file(os.path.join(out, f))
            assert not set(part) & set(tensors), f"{f} repeats tensors"
            tensors.update(part)
    return tensors


@pytest.fixture(scope="module")
def mindie_out(tiny_model, calib_dir, tmp_path_factory):
    before = dir_hashes(tiny_model)
    out = tmp_path_factory.mktemp("q") / "mindie"
    assert quantize(tiny_model, out, "--mindie_format", "--part_file_size", str(PART_GB)) == 0
    assert dir_hashes(tiny_model) == before, "the source model directory was written to"
    return str(out)


def test_every_tensor_is_described_and_indexed_once(mindie_out, tiny_model):
    desc = json.load(open(os.path.join(mindie_out, "quant_model_description_w8a8.json")))
    index = json.load(open(os.path.join(mindie_out, "quant_model_weight_w8a8.safetensors.index.json")))
    tensors = load_output(mindie_out)
    assert list(desc)[0] == "model_quant_type" and desc["model_quant_type"] == "W8A8"
    assert set(desc) - {"model_quant_type"} == set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    quantized = qwen2vl.quantized_linears(arch)
    assert sum(v == "W8A8" for v in desc.values()) == 1 + 7 * len(quantized)
    for p in quantized:
        assert desc[p + ".weight"] == "W8A8" and desc[p + ".deq_scale"] == "W8A8"
        if p + ".bias" in desc:
            assert desc[p + ".bias"] == "FLOAT"
    for p in ("model.layers.0.mlp.down_proj", "visual.blocks.1.mlp.fc2", "visual.merger.mlp.0", "lm_head"):
        assert desc[p + ".weight"] == "FLOAT" and p + ".weight_scale" not in desc


def test_parts_stay_under_the_limit(mindie_out):
    limit = int(PART_GB * (1 << 30))
    index = json.load(open(os.path.join(mindie_out, "quant_model_weight_w8a8.safetensors.index.json")))
    parts = sorted(set(index["weight_map"].values()))
    assert len(parts) >= 3 and parts[0].endswith(f"-00001-of-{len(parts):05d}.safetensors")
    for p in parts:
        ts = load_file(os.path.join(mindie_out, p))
        size = sum(t.numel() * t.element_size() for t in ts.values())
        assert size < limit or len(ts) == 1, (p, size)


def test_config_and_side_files(mindie_out, tiny_model):
    src = json.load(open(os.path.join(tiny_model, "config.json")))
    cfg = json.load(open(os.path.join(mindie_out, "config.json")))
    assert cfg["quantize"] == "w8a8" and cfg["vision_config"]["quantize"] == "w8a8"
    assert cfg["quantization_config"] == {
        "group_size": 0, "act_method": 2, "anti_method": "none", "is_lowbit": False, "mm_tensor": False,
        "w_sym": True, "open_outlier": True, "is_dynamic": False, "w_bit": 8, "a_bit": 8, "dev_type": "cpu"}
    rest = {k: v for k, v in cfg.items() if k not in ("quantize", "quantization_config", "vision_config")}
    assert rest == {k: v for k, v in src.items() if k != "vision_config"}
    files = set(os.listdir(mindie_out))
    assert SIDE_FILES <= files
    for f in SIDE_FILES:
        assert open(os.path.join(mindie_out, f), "rb").read() == open(os.path.join(tiny_model, f), "rb").read()
    assert not any(f.endswith(".py") or "tmp" in f or f == "INCOMPLETE" for f in files)
    mode = lambda f: stat.S_IMODE(os.stat(os.path.join(mindie_out, f)).st_mode)  # noqa: E731
    assert stat.S_IMODE(os.stat(mindie_out).st_mode) == 0o750
    assert all(mode(f) == 0o400 for f in files if f.endswith(".safetensors"))
    assert all(mode(f) == 0o600 for f in files if f.endswith(".json"))


def test_quantized_tensors_follow_the_formulas(mindie_out, tiny_model):
    out = load_output(mindie_out)
    src = Checkpoint(tiny_model)
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    quantized = set(qwen2vl.quantized_linears(arch))
    for p in quantized:
        w = src.get(p + ".weight").float()
        wq, ws = out[p + ".weight"], out[p + ".weight_scale"]
        assert wq.dtype == torch.int8 and ws.dtype == torch.bfloat16 and ws.shape == (w.shape[0], 1)
        assert int(wq.abs().max()) <= 127
        assert torch.equal(ws, (w.abs().amax(1, keepdim=True) / 127).to(torch.bfloat16))
        err = (wq.float() * ws.float() - w).abs()
        assert bool((err <= ws.float() / 2 * 1.001 + 1e-7).all()), p  # within half a step
        assert torch.equal(out[p + ".weight_offset"], torch.zeros_like(ws))
        in_s, in_o = out[p + ".input_scale"], out[p + ".input_offset"]
        assert in_s.dtype == torch.bfloat16 and in_s.shape == (1,) and float(in_s) > 0
        assert float(in_o) == round(float(in_o)) and -128 <= float(in_o) <= 127
        deq = out[p + ".deq_scale"]
        assert deq.dtype == torch.float32 and torch.equal(deq, (in_s.float() * ws.float()).reshape(-1))
        bias = src.get(p + ".bias").double() if p + ".bias" in src else torch.zeros(w.shape[0], dtype=torch.float64)
        ref = (bias / deq.double() - float(in_o) * wq.long().sum(1).double()).round()
        assert torch.equal(out[p + ".quant_bias"], ref.to(torch.int32)), p
    for name in src.names():
        p = name.rsplit(".", 1)[0]
        if p not in quantized:
            assert torch.equal(out[name], src.get(name)), name  # float tensors pass through unchanged
        elif name.endswith(".bias"):
            assert torch.equal(out[name], src.get(name))
    # q, k, v read one tensor: one activation range
    for i in range(arch.num_layers):
        b = f"model.layers.{i}."
        assert torch.equal(out[b + "self_attn.q_proj.input_scale"], out[b + "self_attn.k_proj.input_scale"])
        assert torch.equal(out[b + "mlp.gate_proj.input_offset"], out[b + "mlp.up_proj.input_offset"])


def test_default_layout_differs_only_in_description_and_config(tiny_model, calib_dir, tmp_path, mindie_out):
    out = tmp_path / "default"
    assert quantize(tiny_model, out, "--calib_num", "4") == 0
    files = set(os.listdir(out))
    assert "quant_model_weight_w8a8.safetensors" in files and "quant_model_description.json" in files
    assert "quant_model_description_w8a8.json" not in files and not any("index" in f for f in files)
    desc = json.load(open(out / "quant_model_description.json"))
    assert list(desc)[:2] == ["version", "model_quant_type"] and desc["version"] == "1.0.0"
    assert json.load(open(out / "config.json")) == json.load(open(os.path.join(tiny_model, "config.json")))
    a, b = load_output(str(out)), load_output(mindie_out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # same tensors, same values


def test_fp16_model_stores_int64_deq_scale_and_float32_input_params(tiny_fp16, calib_dir, tmp_path):
    out = tmp_path / "fp16"
    assert quantize(tiny_fp16, out, "--mindie_format", "--calib_num", "1") == 0
    t = load_output(str(out))
    p = "model.layers.0.self_attn.q_proj"
    assert t[p + ".deq_scale"].dtype == torch.int64
    assert t[p + ".input_scale"].dtype == torch.float32 and t[p + ".weight_scale"].dtype == torch.float16
    deq = (t[p + ".input_scale"] * t[p + ".weight_scale"].float()).reshape(-1)
    assert torch.equal(t[p + ".deq_scale"], deq.view(torch.int32).to(torch.int64))
    assert t["model.embed_tokens.weight"].dtype == torch.float16


def test_seed_script_runs_from_scripts_with_default_images(tiny_model, tmp_path):
    """python quant_qwen2vl.py from scripts/: --calib_images defaults to ../calibImages (the bundled photos)."""
    out = tmp_path / "seed"
    r = subprocess.run([sys.executable, "quant_qwen2vl.py", "--model_path", tiny_model, "--save_directory",
                        str(out), "--w_bit", "8", "--a_bit", "8", "--device_type", "cpu", "--trust_remote_code",
                        "False", "--anti_method", "none", "--mindie_format"],
                       cwd=os.path.join(ROOT, "scripts"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "calibrating on 4 images from ../calibImages" in r.stderr
    assert os.path.isfile(out / "quant_model_description_w8a8.json")
