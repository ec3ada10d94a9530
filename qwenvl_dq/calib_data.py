"""Calibration images -> model inputs, as the reference builds them.

Per image: the chat message [image, text prompt], the chat template with add_generation_prompt, the image read and
resized the way qwen_vl_utils does (its own fetch_image when it imports; qwen_vl_utils imports torchvision at module
top, which has no CPU wheel, so otherwise the same PIL steps here), then the Qwen2-VL processing: the image
processor gives pixel_values [patches, C*T*P*P] and image_grid_thw [1, 3], and each <|image_pad|> in the prompt is
expanded to grid_thw.prod() / merge_size**2 tokens. This is what Qwen2VLProcessor does; it is done here directly
because transformers 5.x cannot build that processor without torchvision (its video processor needs it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch
from PIL import Image

from .config import DEFAULT_PROMPT
from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGE_PAD = "<|image_pad|>"


class BadImage(Exception):
    """A calibration file that does not decode to a usable image (skipped with a warning)."""


@dataclasses.dataclass
class Sample:
    """One calibration sample. input_ids: [1, L]; pixel_values: [patches, C*T*P*P]; image_grid_thw: [1, 3]."""

    name: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    path: str = ""


def list_images(folder: str, limit: int | None = None, role: str = "calib_images") -> list[str]:
    """Image files of a folder, sorted by name (the calibration order), at most `limit`. role: the flag named in
    error messages."""
    if not os.path.isdir(folder):
        raise UserError(f"{role}: {folder} is not a directory; pass --{role} a folder of images")
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise UserError(f"{role}: cannot list {folder} ({e.strerror}); check its permissions") from None
    files = [os.path.join(folder, n) for n in names
             if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, n))]
    if not files:
        raise UserError(f"{role}: {folder} holds no image files (looked for {' '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit else files


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Both sides a multiple of factor, area within [min_pixels, max_pixels], aspect ratio kept (Qwen2-VL's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _fetch_image_pil(path: str, min_pixels: int | None, max_pixels: int | None, factor: int) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        if im.mode == "RGBA":
            rgb = Image.new("RGB", im.size, (255, 255, 255))
            rgb.paste(im, mask=im.split()[3])
        else:
            rgb = im.convert("RGB")
    width, height = rgb.size
    h, w = _smart_resize(height, width, factor, min_pixels or 4 * factor**2, max_pixels or 16384 * factor**2)
    return rgb.resize((w, h))


def fetch_image(path: str, min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """The image as qwen_vl_utils.fetch_image returns it (RGB, resized to multiples of 28)."""
    try:
        from qwen_vl_utils import fetch_image as qwen_fetch  # needs torchvision
    except Exception:  # ImportError, or a broken torchvision's RuntimeError
        qwen_fetch = None
    if qwen_fetch is None:
        return _fetch_image_pil(path, min_pixels, max_pixels, 28)
    ele = {"image": path}
    if min_pixels:
        ele["min_pixels"] = min_pixels
    if max_pixels:
        ele["max_pixels"] = max_pixels
    return qwen_fetch(ele)


class Preprocessor:
    """Tokenizer + image processor of a Qwen2-VL directory, offline, without a video processor."""

    def __init__(self, model_path: str, trust_remote_code: bool = False,
                 min_pixels: int | None = None, max_pixels: int | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                           local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                                      local_files_only=True)
        except Exception as e:
            raise UserError(f"model_path: cannot load the tokenizer/image processor of {model_path} ({e}); "
                            "it needs tokenizer files and preprocessor_config.json") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"model_path: the tokenizer of {model_path} has no chat template "
                            "(chat_template.json or tokenizer_config.json)")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.merge_size = getattr(self.image_processor, "merge_size", 2)

    def pixels(self, path: str) -> dict:
        """The image processor's output for one image file; BadImage if the file is not a usable image."""
        try:
            image = fetch_image(path, self.min_pixels, self.max_pixels)
            return self.image_processor(images=[image], return_tensors="pt")
        except Exception as e:  # a corrupt file can make PIL's decoders raise nearly anything
            raise BadImage(f"{type(e).__name__}: {e}") from None

    def __call__(self, path: str, prompt: str = DEFAULT_PROMPT) -> Sample:
        messages = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": prompt}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        vision = self.pixels(path)
        grid = vision["image_grid_thw"]
        n = int(grid[0].prod()) // self.merge_size**2
        text = text.replace(IMAGE_PAD, "<|placeholder|>" * n, 1).replace("<|placeholder|>", IMAGE_PAD)
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return Sample(os.path.basename(path), ids, vision["pixel_values"], grid, path)


def load_samples(folder: str, model_path: str, *, limit: int | None = None, prompt: str = DEFAULT_PROMPT,
                 min_pixels: int | None = None, max_pixels: int | None = None,
                 trust_remote_code: bool = False, role: str = "calib_images") -> list[Sample]:
    """One Sample per readable image of `folder`; unreadable ones are skipped with a warning naming them.
    role: the flag named in messages."""
    pre = Preprocessor(model_path, trust_remote_code, min_pixels, max_pixels)
    return read_samples(pre, folder, list_images(folder, role=role), limit, prompt, role)


def read_samples(pre: Preprocessor, folder: str, paths: list[str], limit: int | None = None,
                 prompt: str = DEFAULT_PROMPT, role: str = "calib_images") -> list[Sample]:
    """Samples of the image files `paths` of `folder` in order, at most `limit`, skipping (with a warning that
    names them) the files that are not usable images; a UserError when none is left."""
    samples, bad = [], []
    for path in paths:
        if limit and len(samples) == limit:
            break
        try:
            samples.append(pre(path, prompt))
        except BadImage as e:
            log.warning("%s: skipping %s, it is not a readable image (%s)", role, path, e)
            bad.append(path)
    if not samples:
        raise UserError(f"{role}: none of the {len(bad)} image files in {folder} could be read "
                        f"({', '.join(os.path.basename(b) for b in bad[:5])}); add valid images")
    return samples
