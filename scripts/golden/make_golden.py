#!/usr/bin/env python3
"""Regenerate tests/data/golden/*.json: the output layout of msModelSlim 26.1.0 on the tiny Qwen2-VL.

Runs in a side venv that has msmodelslim==26.1.0 and transformers==4.46.0 (see make_golden.sh), never in the
project venv. It drives msmodelslim's public API only (Calibrator, QuantConfig); no msModelSlim code lives here.

For each model dtype (bfloat16, float16):
  1. build the tiny model with scripts/make_tiny_qwen2vl.py (same interpreter),
  2. load it as msModelSlim's Qwen2-VL example does (torch_dtype="auto", device_map="cpu") and build the calibration
     data from calibImages/*.jpg (sorted) in the example's positional format,
  3. run the Calibrator alone (no AntiOutlier) with the example's QuantConfig and disable_names,
  4. save three layouts: "mindie" (save_type safe_tensor, i.e. --mindie_format), "default" (ascendV1) and
     "default_parts" (ascendV1, part_file_size=1),
  5. rewrite config.json and copy the tokenizer/json files with the example's own helper
     (example/common/vlm_utils.py) when --ref_example points at an msModelSlim 26.1.0 checkout; otherwise a stand-in
     that follows the documented behaviour is used and the manifest says so ("config_source"),
  6. run the example's AntiOutlier (m2, then m4) before the Calibrator on a fresh load and save the MindIE
     layout as "mindie_m2" / "mindie_m4" (the tensor set must not change with the method),
  7. write tests/data/golden/<dtype>_<layout>.json: tensor dtypes/shapes (in file order), file names and modes,
     the description json, config.json and the part index.

    PYTHONPATH=<torchvision stub> python scripts/golden/make_golden.py [--out tests/data/golden] [--ref_example DIR]

Everything runs with the cwd in a temp dir (the Calibrator drops features.npy into the cwd).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
LAYOUTS = [  # name, save_type, part_file_size, mindie_format
    ("mindie", "safe_tensor", None, True),
    ("default", "ascendV1", None, False),
    ("default_parts", "ascendV1", 1, False),
]
ANTI_METHODS = ("m2", "m4")  # each also gets <dtype>_mindie_<method>.json: AntiOutlier, then the Calibrator
PROMPT = "Please describe this picture in detail."


def log(msg: str) -> None:
    print(f"[make_golden {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def chmod_tree(path: str, mode: int = 0o750) -> None:
    os.chmod(path, mode)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.chmod(os.path.join(root, n), mode)


def read_header(path: str) -> dict:
    """The safetensors JSON header, read directly (no torch): {name: {dtype, shape, data_offsets}, __metadata__}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def disable_names(config) -> list[str]:
    # the example's rollback list: merger MLP, every vision fc2, every LLM down_proj (lm_head is rolled back by
    # the Calibrator itself as the last linear)
    names = ["visual.merger.mlp.0", "visual.merger.mlp.2"]
    names += [f"visual.blocks.{i}.mlp.fc2" for i in range(config.vision_config.depth)]
    names += [f"model.layers.{i}.mlp.down_proj" for i in range(config.num_hidden_layers)]
    return names


def calib_data(processor, image_paths: list[str]) -> list[list]:
    from qwen_vl_utils import process_vision_info

    data = []
    for path in image_paths:
        messages = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": PROMPT}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs, video_inputs = process_vision_info(messages)
        inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True,
                           return_tensors="pt").to("cpu")
        # positional Qwen2VLForConditionalGeneration.forward arguments, as the example builds them
        data.append([inputs["input_ids"], inputs["attention_mask"], None, None, None, None, None, None, None, None,
                     inputs["pixel_values"], None, inputs["image_grid_thw"], None])
    return data


class ExampleHelpers:
    """config.json rewrite + tokenizer copy: msModelSlim's example/common/vlm_utils.py if importable,
    else a stand-in."""

    def __init__(self, ref_example: str | None):
        self.source = "stand-in (documented behaviour of example/common/vlm_utils.py)"
        self.vlm = None
        if ref_example and os.path.isdir(os.path.join(ref_example, "example", "common")):
            sys.path.append(os.path.abspath(ref_example))
            try:
                from example.common import vlm_utils  # noqa: PLC0415
                self.vlm = vlm_utils
                self.source = "example/common/vlm_utils.py (msModelSlim 26.1.0)"
            except Exception as e:  # noqa: BLE001
                log(f"example/common not importable from {ref_example} ({e!r}); using the stand-in")

    def apply(self, model_dir: str, out_dir: str, args: SimpleNamespace) -> None:
        if self.vlm is not None:
            v = self.vlm
            checker = v.VlmSafeGenerator()
            auto_config = checker.get_config_from_pretrained(model_dir, trust_remote_code=False)
            checker.modify_config(v.ModifyConfigParams(
                model_dir=model_dir, dest_dir=out_dir, torch_dtype=auto_config.torch_dtype,
                quantize_type="w8a8", args=args, quantize_config_parts=["vision_config"]))
            checker.copy_tokenizer_files(v.CopyTokenizerParams(model_dir=model_dir, dest_dir=out_dir))
            return
        # stand-in: what /work/notes_reference.md §3 records about vlm_utils.py
        from transformers import AutoConfig

        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
        data["torch_dtype"] = str(AutoConfig.from_pretrained(model_dir).torch_dtype).split(".")[1]
        if args.mindie_format:
            data["quantize"] = "w8a8"
            data["vision_config"]["quantize"] = "w8a8"
            data["quantization_config"] = {
                "group_size": 0, "act_method": 2, "anti_method": args.anti_method, "is_lowbit": False,
                "mm_tensor": False, "w_sym": True, "open_outlier": True, "is_dynamic": False,
                "w_bit": args.w_bit, "a_bit": args.a_bit, "dev_type": args.device_type}
        dest = os.path.join(out_dir, "config.json")
        with open(dest, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=4)
        os.chmod(dest, 0o600)
        for name in os.listdir(model_dir):
            if os.path.splitext(name)[1] in (".json", ".py") and name not in ("config.json",
                                                                              "model.safetensors.index.json"):
                shutil.copyfile(os.path.join(model_dir, name), os.path.join(out_dir, name))
                os.chmod(os.path.join(out_dir, name), 0o600)


def manifest(out_dir: str, dtype: str, layout: str, meta: dict) -> dict:
    names = sorted(os.listdir(out_dir))
    files = [[n, oct(os.stat(os.path.join(out_dir, n)).st_mode & 0o7777)[2:].zfill(4)] for n in names]
    tensors, metadata = {}, {}
    for n in names:  # part files sort in part order
        if not n.endswith(".safetensors"):
            continue
        header = read_header(os.path.join(out_dir, n))
        if "__metadata__" in header:
            metadata[n] = header.pop("__metadata__")
        for t, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # order of the data
            if t in tensors:
                raise SystemExit(f"{t} appears in two files of {out_dir}")
            tensors[t] = [info["dtype"], info["shape"]]
    desc_names = [n for n in names if n.startswith("quant_model_description")]
    if len(desc_names) != 1:
        raise SystemExit(f"expected one description json in {out_dir}, found {desc_names}")
    with open(os.path.join(out_dir, desc_names[0]), encoding="utf-8") as f:
        description = json.load(f)
    out = {"dtype": dtype, "layout": layout, "meta": meta, "files": files,
           "dir_mode": oct(os.stat(out_dir).st_mode & 0o7777)[2:].zfill(4),
           "num_tensors": len(tensors), "dtype_counts": {}, "tensors": tensors,
           "description_file": desc_names[0], "description": description}
    for d, _ in tensors.values():
        out["dtype_counts"][d] = out["dtype_counts"].get(d, 0) + 1
    out["dtype_counts"] = dict(sorted(out["dtype_counts"].items()))
    if metadata:
        out["safetensors_metadata"] = metadata
    if os.path.exists(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            out["config"] = json.load(f)
    index_names = [n for n in names if n.endswith(".safetensors.index.json")]
    for n in index_names:
        with open(os.path.join(out_dir, n), encoding="utf-8") as f:
            out.setdefault("index", {})[n] = json.load(f)
    return out


def tensor_bytes(out_dir: str) -> dict[str, bytes]:
    res = {}
    for n in sorted(os.listdir(out_dir)):
        if n.endswith(".safetensors"):
            path = os.path.join(out_dir, n)
            header = read_header(path)
            header.pop("__metadata__", None)
            with open(path, "rb") as f:
                (hn,) = struct.unpack("<Q", f.read(8))
                f.seek(8 + hn)
                blob = f.read()
            for t, info in header.items():
                a, b = info["data_offsets"]
                res[t] = blob[a:b]
    return res


def write_manifest(out_dir: str, out_root: str, dtype: str, layout: str, meta: dict) -> tuple[dict, str]:
    m = manifest(out_dir, dtype, layout, meta)
    path = os.path.join(out_root, f"{dtype}_{layout}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(m, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return m, path


def example_flow(model, config, data: list, anti_method: str):
    """msModelSlim's Qwen2-VL example after loading: AntiOutlier (unless none), then the Calibrator with the
    example's QuantConfig and disable names, run. Returns the calibrator, ready to save."""
    from msmodelslim.pytorch.llm_ptq.anti_outlier import AntiOutlier, AntiOutlierConfig
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig

    if anti_method != "none":
        anti = AntiOutlierConfig(w_bit=8, a_bit=8, anti_method=anti_method, dev_type="cpu",
                                 dev_id=model.device.index)
        AntiOutlier(model, calib_data=data, cfg=anti).process()
    calibrator = Calibrator(model, QuantConfig(w_bit=8, a_bit=8, disable_names=disable_names(config),
                                               dev_type="cpu", dev_id=model.device.index, act_method=2,
                                               mm_tensor=False), calib_data=data, disable_level="L0")
    calibrator.run()
    return calibrator


def run_dtype(dtype: str, work: str, images: list[str], helpers: ExampleHelpers, out_root: str,
              anti_method_label: str, timings: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig

    t0 = time.time()
    model_dir = os.path.join(work, f"tiny_{dtype}")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_tiny_qwen2vl.py"), model_dir,
                    "--dtype", dtype], check=True, stdout=subprocess.DEVNULL)
    chmod_tree(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, device_map="cpu", trust_remote_code=False, torch_dtype="auto", local_files_only=True).eval()
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    if model.dtype != getattr(torch, dtype):
        raise SystemExit(f"model loaded as {model.dtype}, expected {dtype}")
    data = calib_data(processor, images)
    timings[f"{dtype}_build_load"] = round(time.time() - t0, 1)

    t0 = time.time()
    quant_config = QuantConfig(w_bit=8, a_bit=8, disable_names=disable_names(config), dev_type="cpu",
                               dev_id=model.device.index, act_method=2, mm_tensor=False)
    calibrator = Calibrator(model, quant_config, calib_data=data, disable_level="L0")
    calibrator.run()
    timings[f"{dtype}_calibrate"] = round(time.time() - t0, 1)

    saved = {}
    for layout, save_type, part_file_size, mindie in LAYOUTS:
        t0 = time.time()
        out_dir = os.path.join(work, f"out_{dtype}_{layout}")
        calibrator.save(out_dir, save_type=[save_type], part_file_size=part_file_size)
        args = SimpleNamespace(model_path=model_dir, save_directory=out_dir, part_file_size=part_file_size, w_bit=8,
                               a_bit=8, device_type="cpu", trust_remote_code=False, anti_method=anti_method_label,
                               mindie_format=mindie)
        helpers.apply(model_dir, out_dir, args)
        meta = {"msmodelslim": _version("msmodelslim"), "transformers": _version("transformers"),
                "torch": _version("torch"), "safetensors": _version("safetensors"),
                "save_type": save_type, "part_file_size": part_file_size, "anti_outlier": None,
                "quant_config": {"w_bit": 8, "a_bit": 8, "dev_type": "cpu", "act_method": 2, "mm_tensor": False,
                                 "disable_level": "L0"},
                "calib_images": [os.path.basename(p) for p in images],
                "config_source": helpers.source, "config_anti_method_arg": anti_method_label,
                "umask": oct(_umask())[2:].zfill(4)}
        m, path = write_manifest(out_dir, out_root, dtype, layout, meta)
        saved[layout] = tensor_bytes(out_dir)
        timings[f"{dtype}_save_{layout}"] = round(time.time() - t0, 1)
        log(f"{path}: {m['num_tensors']} tensors {m['dtype_counts']}, {os.path.getsize(path)} bytes")
    # the three saves come from one calibration: their tensors must be byte-identical
    ref = saved["mindie"]
    for layout, got in saved.items():
        if got.keys() != ref.keys() or any(got[k] != ref[k] for k in ref):
            raise SystemExit(f"{dtype}: tensors of layout {layout} differ from mindie")
    log(f"{dtype}: tensor bytes identical across {', '.join(saved)}")
    del calibrator, model

    # the example's full flow with outlier suppression: AntiOutlier (as quant_qwen2vl.py calls it), then the
    # Calibrator, saved in the MindIE layout; the tensor set must not change with the method
    for method in ANTI_METHODS:
        t0 = time.time()
        model = Qwen2VLForConditionalGeneration.from_pretrained(
            model_dir, device_map="cpu", trust_remote_code=False, torch_dtype="auto", local_files_only=True).eval()
        calibrator = example_flow(model, config, data, method)
        layout = f"mindie_{method}"
        out_dir = os.path.join(work, f"out_{dtype}_{layout}")
        calibrator.save(out_dir, save_type=["safe_tensor"], part_file_size=None)
        args = SimpleNamespace(model_path=model_dir, save_directory=out_dir, part_file_size=None, w_bit=8, a_bit=8,
                               device_type="cpu", trust_remote_code=False, anti_method=method, mindie_format=True)
        helpers.apply(model_dir, out_dir, args)
        got = tensor_bytes(out_dir)
        with open(os.path.join(out_dir, "quant_model_description_w8a8.json"), encoding="utf-8") as f:
            kinds = json.load(f)
        changed = sorted(k for k in got if kinds.get(k) == "FLOAT" and got[k] != saved["mindie"][k])
        meta = {"msmodelslim": _version("msmodelslim"), "transformers": _version("transformers"),
                "torch": _version("torch"), "safetensors": _version("safetensors"), "save_type": "safe_tensor",
                "part_file_size": None, "anti_outlier": {"anti_method": method, "w_bit": 8, "a_bit": 8,
                                                         "dev_type": "cpu"},
                "float_tensors_changed_by_anti_outlier": len(changed),
                "calib_images": [os.path.basename(p) for p in images],
                "config_source": helpers.source, "config_anti_method_arg": method,
                "umask": oct(_umask())[2:].zfill(4)}
        m, path = write_manifest(out_dir, out_root, dtype, layout, meta)
        timings[f"{dtype}_{layout}"] = round(time.time() - t0, 1)
        log(f"{path}: {m['num_tensors']} tensors {m['dtype_counts']}, {len(changed)} float tensors smoothed")
        del calibrator, model


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden"))
    p.add_argument("--ref_example", default=os.environ.get("REF_EXAMPLE", "/work/ref_example"),
                   help="an msModelSlim 26.1.0 checkout (root holding example/common); optional")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    p.add_argument("--anti_method_label", default="none",
                   help="value of args.anti_method handed to the config.json helper (quantization_config.anti_method); "
                        "no AntiOutlier runs, so the default is 'none', what qwenvl-dq is run with")
    p.add_argument("--keep", help="work in this directory and keep it (default: a temp dir, removed)")
    a = p.parse_args()

    out_root = os.path.abspath(a.out)
    os.makedirs(out_root, exist_ok=True)
    work = os.path.abspath(a.keep) if a.keep else tempfile.mkdtemp(prefix="qwenvl_golden_")
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o750)
    os.chdir(work)  # features.npy lands here
    timings = {}
    t_all = time.time()
    try:
        img_dir = os.path.join(work, "imgs")
        os.makedirs(img_dir, exist_ok=True)
        srcs = sorted(glob.glob(os.path.join(REPO, "calibImages", "*.jpg")))
        if not srcs:
            raise SystemExit("no calibImages/*.jpg")
        images = []
        for s in srcs:
            images.append(os.path.join(img_dir, os.path.basename(s)))
            shutil.copyfile(s, images[-1])
        chmod_tree(img_dir)
        helpers = ExampleHelpers(a.ref_example)
        log(f"work dir {work}; config.json via {helpers.source}; images {[os.path.basename(i) for i in images]}")
        for dtype in a.dtypes:
            run_dtype(dtype, work, images, helpers, out_root, a.anti_method_label, timings)
        log(f"features.npy in cwd: {os.path.exists(os.path.join(work, 'features.npy'))}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    timings["total"] = round(time.time() - t_all, 1)
    log(f"timings (s): {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
