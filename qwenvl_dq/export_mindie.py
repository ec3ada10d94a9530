"""msModelSlim's output layout (MindIE reads it): file names, the description json, config.json, copied files.

With --mindie_format: quant_model_description_w8a8.json, and config.json gains "quantize": "w8a8",
vision_config.quantize = "w8a8" and a quantization_config block. Without it: quant_model_description.json with a
"version" entry first, and config.json keeps the source's content. The tensors are the same either way.
"""

from __future__ import annotations

import os
import shutil

from .writer import write_json

WEIGHT_BASE = "quant_model_weight_w8a8"
DIR_MODE, JSON_MODE, WEIGHT_MODE = 0o750, 0o600, 0o400

# files of a model directory that are not copied: the float weights and their index (replaced by ours),
# config.json (rewritten), and model code (never copied: it would run on the next trust_remote_code load)
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".py", ".pyc", ".msgpack", ".h5", ".gguf")
_SKIP_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_COPY_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken")


def description_name(mindie_format: bool) -> str:
    return "quant_model_description_w8a8.json" if mindie_format else "quant_model_description.json"


def description_json(types: dict[str, str], mindie_format: bool) -> dict:
    head = {"model_quant_type": "W8A8"} if mindie_format else {"version": "1.0.0", "model_quant_type": "W8A8"}
    return {**head, **types}


def quantization_config(act_method: int, anti_method: str, dev_type: str) -> dict:
    return {
        "group_size": 0, "act_method": act_method, "anti_method": anti_method, "is_lowbit": False,
        "mm_tensor": False, "w_sym": True, "open_outlier": True, "is_dynamic": False, "w_bit": 8, "a_bit": 8,
        "dev_type": dev_type,
    }


def config_json(source: dict, mindie_format: bool, act_method: int, anti_method: str, dev_type: str) -> dict:
    if not mindie_format:
        return source
    cfg = dict(source)
    cfg["vision_config"] = {**cfg.get("vision_config", {}), "quantize": "w8a8"}
    cfg["quantize"] = "w8a8"
    cfg["quantization_config"] = quantization_config(act_method, anti_method, dev_type)
    return cfg


def side_files(model_path: str) -> list[str]:
    """Tokenizer / processor / generation files to copy from the source directory."""
    out = []
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if not os.path.isfile(path) or name.startswith(".") or name in _SKIP_NAMES:
            continue
        if name.endswith(_SKIP_SUFFIXES) or not name.endswith(_COPY_SUFFIXES):
            continue
        out.append(name)
    return out


def copy_side_files(model_path: str, out_dir: str) -> list[str]:
    names = side_files(model_path)
    for name in names:
        dst = os.path.join(out_dir, name)
        tmp = dst + ".qwenvl_dq_tmp"
        with open(os.path.join(model_path, name), "rb") as src, \
                os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, JSON_MODE), "wb") as dst_f:
            shutil.copyfileobj(src, dst_f)
        os.chmod(tmp, JSON_MODE)
        os.replace(tmp, dst)
    return names


def write_config(out_dir: str, cfg: dict) -> None:
    write_json(os.path.join(out_dir, "config.json"), cfg, JSON_MODE)
