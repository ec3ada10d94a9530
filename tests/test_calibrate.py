"""Layer-by-layer calibration sees exactly what the real transformers model computes."""

import torch
import transformers

from qwenvl_dq import calib_data, calibrate, int8, qwen2vl
from qwenvl_dq.checkpoint import Checkpoint
from conftest import one_rank


def test_layer_by_layer_statistics_equal_the_full_model_forward(tiny_model, calib_dir):
    samples = calib_data.load_samples(calib_dir, tiny_model, limit=2)
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    skeleton = qwen2vl.build_skeleton(qwen2vl.load_hf_config(tiny_model, False), torch.bfloat16)
    ours = calibrate.calibrate(one_rank(skeleton, Checkpoint(tiny_model), arch, "minmax"), samples, len(samples))
    assert len(ours) == 2 * len(qwen2vl.quantized_linears(arch)) == 2 * (3 * 2 + 6 * 3)

    kw = {"dtype" if qwen2vl.TF5 else "torch_dtype": torch.bfloat16}
    full = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, attn_implementation="sdpa", **kw)
    seen = {}

    def hook(name):
        def f(_m, args):
            x = args[0].float()
            lo, hi = seen.get(name, (float("inf"), float("-inf")))
            seen[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
        return f

    for name in qwen2vl.quantized_linears(arch):
        parts = name.split(".")
        stack = qwen2vl.vision_blocks(full) if name.startswith("visual") else qwen2vl.decoder_layers(full)
        mod = stack[int(parts[2])].get_submodule(".".join(parts[3:]))
        mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for s in samples:
            pos = qwen2vl.rope_index(full, s.input_ids, s.image_grid_thw, arch.image_token_id)
            full(input_ids=s.input_ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                 position_ids=pos)
    for name, (lo, hi) in seen.items():
        scale, offset = int8.act_qparams(lo, hi)
        assert torch.equal(ours[name + ".input_scale"], scale), name
        assert torch.equal(ours[name + ".input_offset"], offset), name
    # linears that read one tensor share one observer
    assert torch.equal(ours["model.layers.1.self_attn.q_proj.input_scale"],
                       ours["model.layers.1.self_attn.v_proj.input_scale"])


def test_the_statistics_sweep_observes_only_the_smoothed_groups_ranges(tiny_model, calib_dir, monkeypatch):
    samples = calib_data.load_samples(calib_dir, tiny_model, limit=2)
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    skeleton = qwen2vl.build_skeleton(qwen2vl.load_hf_config(tiny_model, False), torch.bfloat16)
    seen = []
    observe = calibrate.observe

    def spy(module, prefix, groups, state, reservoirs=None, histogram=True):
        out = observe(module, prefix, groups, state, reservoirs, histogram)
        seen.append((prefix, [g[0] for g in groups], histogram, out[0]))
        return out

    monkeypatch.setattr(calibrate, "observe", spy)
    for act_method in ("histogram", "minmax"):
        seen.clear()
        calibrate.calibrate(one_rank(skeleton, Checkpoint(tiny_model), arch, act_method, "m2"), samples, 2)
        layer = [(groups, histogram, obs) for prefix, groups, histogram, obs in seen if prefix == "model.layers.1."]
        assert [(g, h) for g, h, _ in layer] == [
            (["self_attn.q_proj", "mlp.gate_proj"], False),
            (["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"], act_method == "histogram")]
        stats, last = layer[0][2], layer[1][2]
        assert all(o.hist is None and o.tokens > 0 for o in stats.values())
        assert all((o.hist is not None) == (act_method == "histogram") for o in last.values())
        # the smoothed groups' ranges are those of the float layer's inputs, a strict subset of the last sweep's
        assert set(stats) < set(last)
