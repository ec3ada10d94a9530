#!/usr/bin/env python3
"""Quantize with the reference tool, msModelSlim 26.1.0, the way its Qwen2-VL example does (side venv only).

    scripts/golden/refpython.sh scripts/golden/ref_quantize.py MODEL IMAGES OUT --anti_method m2|m4|none

The example's flow through msmodelslim's public API: load the whole model (torch_dtype="auto", cpu), one
calibration sample per image (sorted by name, where the example takes os.listdir order), AntiOutlier with the
example's config unless none, the Calibrator with its QuantConfig and disable names, a MindIE-layout save, then its
config.json rewrite and tokenizer copy (make_golden.ExampleHelpers). Prints the wall time and peak RSS.
Used by scripts/quality.py for msModelSlim's rows; the cwd gets the Calibrator's features.npy, so run it in a
scratch directory.
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--anti_method", default="m2", choices=["m2", "m4", "none"])
    a = p.parse_args()

    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    t0 = time.time()
    images = sorted(f for f in glob.glob(os.path.join(a.images, "*")) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        a.model, device_map="cpu", trust_remote_code=False, torch_dtype="auto", local_files_only=True).eval()
    config = AutoConfig.from_pretrained(a.model, trust_remote_code=False, local_files_only=True)
    processor = AutoProcessor.from_pretrained(a.model, local_files_only=True)
    data = make_golden.calib_data(processor, images)
    calibrator = make_golden.example_flow(model, config, data, a.anti_method)
    calibrator.save(a.out, save_type=["safe_tensor"], part_file_size=None)
    args = SimpleNamespace(model_path=a.model, save_directory=a.out, part_file_size=None, w_bit=8, a_bit=8,
                           device_type="cpu", trust_remote_code=False, anti_method=a.anti_method, mindie_format=True)
    make_golden.ExampleHelpers(os.environ.get("REF_EXAMPLE")).apply(a.model, a.out, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"REF_RESULT seconds={time.time() - t0:.2f} peak_rss_mib={peak:.0f} images={len(images)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
