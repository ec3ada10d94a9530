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


def _full_model_inputs(tiny_model, arch, samples) -> dict[str, list[torch.Tensor]]:
    """Every W8A8 linear's input, sample by sample, in transformers' whole float model."""
    kw = {"dtype" if qwen2vl.TF5 else "torch_dtype": torch.bfloat16}
    full = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, attn_implementation="sdpa", **kw)
    seen = {}
    for name in qwen2vl.quantized_linears(arch):
        parts = name.split(".")
        stack = qwen2vl.vision_blocks(full) if name.startswith("visual") else qwen2vl.decoder_layers(full)
        mod = stack[int(parts[2])].get_submodule(".".join(parts[3:]))
        mod.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, []).append(args[0].float()))
    with torch.no_grad():
        for s in samples:
            pos = qwen2vl.rope_index(full, s.input_ids, s.image_grid_thw, arch.image_token_id)
            full(input_ids=s.input_ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                 position_ids=pos)
    return seen


def test_one_sweep_observes_the_smoothed_groups_as_the_smoothed_linears_read_the_float_models_inputs(
        tiny_model, calib_dir):
    """m2/m4 calibrate in one sweep through the float model: a smoothed group's range is that of its float input
    shifted and divided by its factors, (x - z) / s, over every token; the other groups' are their float input's."""
    samples = calib_data.load_samples(calib_dir, tiny_model, limit=2)
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    seen = _full_model_inputs(tiny_model, arch, samples)
    for method in ("m2", "m4"):
        skeleton = qwen2vl.build_skeleton(qwen2vl.load_hf_config(tiny_model, False), torch.bfloat16)
        ours = calibrate.calibrate(one_rank(skeleton, Checkpoint(tiny_model), arch, "minmax", method), samples,
                                   len(samples))
        shifted = scaled = 0
        for group in qwen2vl.observer_groups(arch):
            name = group[0]
            z, s = ours.get(f"{name}.smooth_in_shift"), ours.get(f"{name}.smooth_in_scale")
            xs = [x.reshape(-1, x.shape[-1]) for x in seen[name]]
            xs = [x if z is None else x - z for x in xs]
            xs = [x if s is None else x / s for x in xs]
            scale, offset = int8.act_qparams(min(float(x.min()) for x in xs), max(float(x.max()) for x in xs))
            assert torch.equal(ours[name + ".input_scale"], scale), (method, name)
            assert torch.equal(ours[name + ".input_offset"], offset), (method, name)
            shifted += z is not None
            scaled += s is not None and not torch.equal(s, torch.ones_like(s))
        # m2 shifts the vision blocks' LayerNorm groups and scales norm -> q/k/v and gate/up; m4 also v -> o
        assert shifted == (2 * arch.vision_depth if method == "m2" else 0), method
        assert scaled > 0, method
