"""--output_format compressed-tensors (what vLLM reads) and --act_symmetric: the config validates with
compressed-tensors' own schema, the tensors are the MindIE layout's in compressed-tensors' names, transformers loads
the export and computes what `qwenvl-dq evaluate` simulates, sharding follows Hugging Face's names."""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, quantize

import make_tiny_qwen2vl
from qwenvl_dq import calib_data, evaluate, int8, observers, qwen2vl
from qwenvl_dq.checkpoint import Checkpoint

ct_quant = pytest.importorskip("compressed_tensors.quantization")
transformers = pytest.importorskip("transformers")

HELDOUT = os.path.join(ROOT, "tests", "data", "heldout")
CT = ["--output_format", "compressed-tensors", "--calib_num", "1"]
IGNORE = ["lm_head", r"re:.*mlp\.down_proj$", r"re:.*mlp\.fc2$", r"re:.*merger\..*"]


def tensors(path):
    """{name: (dtype, shape)} over every safetensors file of an output."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ct_asym(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct") / "asym"
    assert quantize(tiny_model, out, *CT) == 0
    return str(out)


@pytest.fixture(scope="module")
def sym_pair(tiny_model, tmp_path_factory):
    """The same symmetric run in both layouts; the compressed-tensors one in several parts."""
    base = tmp_path_factory.mktemp("sym")
    assert quantize(tiny_model, base / "ct", *CT, "--act_symmetric", "--part_file_size", "0.0002") == 0
    assert quantize(tiny_model, base / "mindie", "--calib_num", "1", "--act_symmetric", "--mindie_format") == 0
    return str(base / "ct"), str(base / "mindie")


def value(e):
    """An enum field's value (compressed-tensors keeps some as plain strings)."""
    return getattr(e, "value", e)


def load(path, dtype):
    kw = {"dtype" if qwen2vl.TF5 else "torch_dtype": dtype}
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, **kw).eval()


def inputs(model, s, forward=False):
    """The model inputs of one sample (forward: for a plain forward call rather than generate)."""
    kw = dict(input_ids=s.input_ids, attention_mask=torch.ones_like(s.input_ids),
              pixel_values=s.pixel_values.to(model.dtype), image_grid_thw=s.image_grid_thw)
    if qwen2vl.TF5:  # transformers 5 wants the token types for the 3-D positions
        kw["mm_token_type_ids"] = (s.input_ids == model.config.image_token_id).long()
    elif forward:  # 4.46's forward without position_ids gives image tokens 1-D positions; generate computes them
        kw["position_ids"] = model.get_rope_index(s.input_ids, s.image_grid_thw, None, kw["attention_mask"])[0]
    return kw


def test_config_validates_and_keeps_the_source(tiny_model, ct_asym):
    cfg, src = config(ct_asym), config(tiny_model)
    qc = cfg.pop("quantization_config")
    assert cfg == src
    q = ct_quant.QuantizationConfig.model_validate(qc)
    assert (q.quant_method, q.format, value(q.quantization_status)) == ("compressed-tensors", "int-quantized",
                                                                         "compressed")
    assert q.ignore == IGNORE
    g = q.config_groups["group_0"]
    assert g.targets == ["Linear"]
    w, a = g.weights, g.input_activations
    assert (w.num_bits, value(w.type), w.symmetric, value(w.strategy), w.dynamic) == (8, "int", True, "channel", False)
    assert (a.num_bits, value(a.type), a.symmetric, value(a.strategy), a.dynamic) == (8, "int", False, "tensor", False)
    assert qc["version"] == __import__("compressed_tensors").__version__


def test_tensor_names_dtypes_shapes(tiny_model, ct_asym):
    got, src = tensors(ct_asym), tensors(tiny_model)
    arch = qwen2vl.Arch.from_dict(config(tiny_model))
    quantized = qwen2vl.quantized_linears(arch)
    assert len(quantized) == 24
    want = {k: v for k, v in src.items() if k.rpartition(".")[0] not in quantized}  # float: as the source
    for p in quantized:
        out, inp = src[p + ".weight"][1]
        want[p + ".weight"] = ("I8", (out, inp))
        want[p + ".weight_scale"] = ("BF16", (out, 1))
        want[p + ".input_scale"] = ("BF16", (1,))
        want[p + ".input_zero_point"] = ("I8", (1,))
        if p + ".bias" in src:
            want[p + ".bias"] = src[p + ".bias"]
    assert got == want
    assert sorted(f for f in os.listdir(ct_asym) if "safetensors" in f) == ["model.safetensors"]
    with safe_open(os.path.join(ct_asym, "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    assert {"tokenizer.json", "merges.txt", "vocab.json", "chat_template.json"} <= set(os.listdir(ct_asym))
    assert "INCOMPLETE" not in os.listdir(ct_asym) and ".qwenvl_dq" not in os.listdir(ct_asym)


def test_transformers_computes_what_evaluate_simulates(tiny_model, ct_asym):
    """Each W8A8 linear of the bf16 export, loaded by transformers (compressed-tensors' own forward, here in
    float32), gives int8.zero_point_linear's output on the same input; with the zero point's sign flipped it would
    not. Then generate runs and its first token is the forward's argmax."""
    ck = Checkpoint(ct_asym)
    model = load(ct_asym, torch.float32)
    names = {"model.layers.1.mlp.gate_proj", "model.layers.2.self_attn.o_proj", "visual.blocks.0.attn.qkv"}
    found = {n: mod for n, mod in model.named_modules() if any(n.endswith(x) for x in names)}
    assert len(found) == 3 and all(getattr(m, "quantization_scheme", None) is not None for m in found.values())
    floats = sorted(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if "." in n else n
                    for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is None)
    assert floats == ["lm_head", "merger.mlp.0", "merger.mlp.2"] or len(floats) == 8
    assert len(floats) == 8 and floats.count("mlp.down_proj") == 3 and floats.count("mlp.fc2") == 2, floats
    seen = {}

    def keep(n):
        def hook(_m, args, out):
            seen.setdefault(n, (args[0].detach(), out.detach()))  # the first call: the prompt
        return hook

    for n, mod in found.items():
        mod.register_forward_hook(keep(n))
    s = calib_data.load_samples(HELDOUT, tiny_model, limit=1)[0]
    with torch.no_grad():
        logits = model(**inputs(model, s, forward=True)).logits[0]
        gen = model.generate(**inputs(model, s), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == s.input_ids.shape[1] + 3
    assert int(gen[0, s.input_ids.shape[1]]) == int(logits[-1].argmax())
    for n, (x, y) in seen.items():
        p = next(c for c in names if n.endswith(c))
        zp = ck.get(p + ".input_zero_point").float()
        args = (ck.get(p + ".weight"), ck.get(p + ".weight_scale"), ck.get(p + ".input_scale"))
        bias = ck.get(p + ".bias") if p + ".bias" in ck else None
        err = float((int8.zero_point_linear(x, *args, zp, bias) - y).norm() / y.norm())
        assert err < 1e-5, (p, err)
        if int(zp) != 0:
            flipped = float((int8.zero_point_linear(x, *args, -zp, bias) - y).norm() / y.norm())
            assert flipped > 100 * max(err, 1e-7), (p, flipped, err)
    ck.close()


def test_top1_agreement_with_evaluate(tmp_path):
    """A float32 tiny model: transformers runs the export in the model dtype as evaluate does, so what is left
    between them is float32 against float64 rounding. (On bf16, transformers' compressed-tensors forward divides by
    the activation scale in bf16, 8 bits of mantissa: about 97% agreement, against 98.75% for the float model
    itself run by both.)"""
    model = make_tiny_qwen2vl.build(str(tmp_path / "tiny32"), ["--dtype", "float32"])
    out = tmp_path / "ct32"
    assert quantize(model, out, *CT) == 0
    logits = {}
    report = evaluate.evaluate(model, [("ct", str(out))], HELDOUT, logits=logits)
    assert report["runs"]["ct"]["w8a8_linears"] == 24
    hf = load(str(out), torch.float32)
    agree = total = 0
    with torch.no_grad():
        for s, ref in zip(calib_data.load_samples(HELDOUT, model), logits["ct"]):
            got = hf(**inputs(hf, s, forward=True)).logits[0].float()
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0]
    print(f"top-1 agreement, transformers vs evaluate: {agree}/{total} = {100 * agree / total:.2f}%")
    assert total == report["tokens"] and agree / total >= 0.99


def test_symmetric_sharded_and_same_numbers_as_mindie(tiny_model, sym_pair):
    ct, mindie = sym_pair
    got, ms = tensors(ct), tensors(mindie)
    assert not any(k.endswith(("input_zero_point", "weight_offset", "deq_scale", "quant_bias")) for k in got)
    qc = config(ct)["quantization_config"]
    assert ct_quant.QuantizationConfig.model_validate(qc).config_groups["group_0"].input_activations.symmetric
    parts = sorted(f for f in os.listdir(ct) if f.endswith(".safetensors"))
    n = len(parts)
    assert n >= 2 and parts == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    with open(os.path.join(ct, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(got) and set(index["weight_map"].values()) == set(parts)
    ckc, ckm = Checkpoint(ct), Checkpoint(mindie)
    assert index["metadata"]["total_size"] == sum(ckc.nbytes(k) for k in got)
    for p in qwen2vl.quantized_linears(qwen2vl.Arch.from_dict(config(tiny_model))):
        assert float(ckm.get(p + ".input_offset")) == 0.0
        for leaf in ("weight", "weight_scale", "input_scale"):
            assert torch.equal(ckc.get(f"{p}.{leaf}"), ckm.get(f"{p}.{leaf}")), (p, leaf)
    for k in got:  # every float tensor (smoothed or not) is the MindIE layout's
        if k in ms and ms[k][0] != "I8":
            assert torch.equal(ckc.get(k), ckm.get(k)), k
    hf = load(ct, torch.bfloat16)  # several parts, no zero points: still loads
    assert sum(getattr(m, "quantization_scheme", None) is not None for m in hf.modules()) == 24
    report = evaluate.evaluate(tiny_model, [("ct", ct), ("mindie", mindie)], HELDOUT, limit=1)
    assert report["runs"]["ct"]["w8a8_linears"] == report["runs"]["mindie"]["w8a8_linears"] == 24
    assert report["runs"]["ct"]["logits_cosine"] > 0.99 and report["runs"]["mindie"]["logits_cosine"] > 0.99
    ckc.close()
    ckm.close()


def test_mindie_format_with_compressed_tensors_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert quantize(tiny_model, out, "--mindie_format", "--output_format", "compressed-tensors") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: output_format: --mindie_format writes MindIE's layout and --output_format "
                   "compressed-tensors writes another; pass one of them")
    assert not out.exists()


def _sym_loss(hist, lo, hi, t):
    """symmetric_histogram_range's loss for threshold t, bin by bin (the slow reference)."""
    width = (hi - lo) / len(hist)
    step = 2 * t / 254
    total = 0.0
    for k, h in enumerate(hist.tolist()):
        c = lo + (k + 0.5) * width
        total += h * ((c + t) ** 2 if c < -t else (c - t) ** 2 if c > t else step * step / 12)
    return total


def test_symmetric_ranges():
    """Symmetric qparams: zero point 0, scale = max(|min|, |max|) / 127. The histogram threshold is the argmin of
    its loss (checked bin by bin), and it quantizes the data with less error than the full range when an outlier
    stretches it."""
    s, o = int8.act_qparams(-3.0, 1.5, symmetric=True)
    assert float(o) == 0.0 and float(s) == pytest.approx(3.0 / 127)
    assert int8.quantize_act(torch.tensor([-3.0, 3.0]), s, o).tolist() == [-127.0, 127.0]
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 40.0
    obs = observers.ActObserver()
    obs.update(x)
    steps = 64
    t = observers.symmetric_histogram_range(obs.hist, obs.lo, obs.hi, steps=steps)
    grid = [40.0 * k / steps for k in range(1, steps + 1)]
    losses = [_sym_loss(obs.hist, obs.lo, obs.hi, g) for g in grid]
    assert t == pytest.approx(grid[losses.index(min(losses))])
    assert t < 40.0
    s_hist, o_hist = obs.qparams("histogram", symmetric=True)
    s_mm, o_mm = obs.qparams("minmax", symmetric=True)
    assert float(o_hist) == float(o_mm) == 0.0 and float(s_mm) == pytest.approx(40.0 / 127)
    mse = [float((int8.fake_quant_act(x, sc, o_mm) - x).square().mean()) for sc in (s_hist, s_mm)]
    assert mse[0] < mse[1]


def test_inspect_reads_the_export(tiny_model, ct_asym, sym_pair, capsys):
    from qwenvl_dq import cli, qwen2vl

    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    n = len(qwen2vl.quantized_linears(arch))
    assert cli.main(["inspect", str(ct_asym)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"{ct_asym}: compressed-tensors output, complete"
    assert "  act_symmetric: False" in text and f"W8A8 linears: {n} " in text
    assert re.search(r"  input_zero_point: -?[0-9.]+ / -?[0-9.]+ / -?[0-9.]+", text)
    sym = sym_pair[0]
    assert cli.main(["inspect", str(sym)]) == 0
    text = capsys.readouterr().out
    assert "  act_symmetric: True" in text and "input_zero_point" not in text
