import json
import os

import pytest
import torch
from PIL import Image

from qwenvl_dq import calib_data
from qwenvl_dq.calib_data import Preprocessor, _smart_resize, list_images


@pytest.mark.parametrize("hw, expect", [
    ((480, 640), (476, 644)),  # a COCO-sized photo: both sides rounded to multiples of 28
    ((10, 10), (56, 56)),  # tiny: scaled up to min_pixels (4 * 28 * 28)
    ((4000, 6000), (2912, 4368)),  # huge: scaled down under 16384 * 28 * 28
])
def test_smart_resize_matches_qwen2vl_rule(hw, expect):
    h, w = _smart_resize(*hw, 28, 4 * 28 * 28, 16384 * 28 * 28)
    assert (h, w) == expect
    assert h % 28 == 0 and w % 28 == 0


def test_images_are_listed_by_name_and_limited(calib_dir):
    files = list_images(calib_dir)
    assert [os.path.basename(f) for f in files] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert len(list_images(calib_dir, limit=2)) == 2


def test_sample_is_the_chat_prompt_with_expanded_image_pads(tiny_model, calib_dir):
    pre = Preprocessor(tiny_model)
    s = pre(os.path.join(calib_dir, "coffee.jpg"))
    grid = s.image_grid_thw[0].tolist()
    assert grid[0] == 1 and s.pixel_values.shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    text = pre.tokenizer.decode(s.input_ids[0])
    n_pad = grid[0] * grid[1] * grid[2] // 4
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    + "<|image_pad|>" * n_pad
                    + "<|vision_end|>Please describe this picture in detail.<|im_end|>\n<|im_start|>assistant\n")
    image_id = json.load(open(os.path.join(tiny_model, "config.json")))["image_token_id"]
    assert int((s.input_ids == image_id).sum()) == n_pad


def test_rgba_is_composited_on_white_like_qwen_vl_utils(tmp_path):
    im = Image.new("RGBA", (56, 56), (255, 0, 0, 0))  # fully transparent red
    im.save(tmp_path / "a.png")
    rgb = calib_data._fetch_image_pil(str(tmp_path / "a.png"), None, None, 28)
    assert rgb.mode == "RGB" and rgb.getpixel((10, 10)) == (255, 255, 255)


def test_tiny_model_has_outlier_channels_at_the_quantized_inputs(tiny_model, calib_dir):
    """The builder injects outliers: a few channels of each norm's output dwarf the rest (so smoothing matters)."""
    import transformers

    from qwenvl_dq import qwen2vl

    kw = {"dtype" if qwen2vl.TF5 else "torch_dtype": torch.bfloat16}
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, **kw)
    s = Preprocessor(tiny_model)(os.path.join(calib_dir, "astronaut.jpg"))
    seen = {}
    layer = qwen2vl.decoder_layers(model)[1]
    block = qwen2vl.vision_blocks(model)[0]
    layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("q", a[0].float()))
    block.mlp.fc1.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc1", a[0].float()))
    with torch.no_grad():
        pos = qwen2vl.rope_index(model, s.input_ids, s.image_grid_thw, model.config.image_token_id)
        model(input_ids=s.input_ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw, position_ids=pos)
    for key in ("q", "fc1"):
        absmax = seen[key].reshape(-1, seen[key].shape[-1]).abs().amax(0)
        assert float(absmax.max() / absmax.median()) > 8, key
