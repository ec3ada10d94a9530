#!/usr/bin/env python3
"""Quality of none / m2 / m4 on the tiny outlier model, ours and (when available) msModelSlim's, in one table.

    scripts/quality.sh [--out DIR] [--no_reference] [--calib30] [--images30] [--model_args "MAKE_TINY FLAGS"]

1. builds the tiny Qwen2-VL (scripts/make_tiny_qwen2vl.py: random weights with injected outlier channels),
2. quantizes it with qwenvl-dq for --anti_method none, m2 and m4 on calibImages/ (MindIE layout),
3. unless --no_reference, quantizes it with msModelSlim 26.1.0 (m2 and m4, its example's flow) in the side venv
   through scripts/golden/refpython.sh + ref_quantize.py (the venv is created on first use),
4. evaluates every output on the held-out images (tests/data/heldout) with `qwenvl-dq evaluate`, writes
   DIR/report.json and DIR/report.png (SQNR by layer) and prints the table,
5. with --calib30, times calibration with 30 images (crops and flips of calibImages) for m2 and m4.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import make_tiny_qwen2vl  # noqa: E402
from qwenvl_dq import evaluate  # noqa: E402
from qwenvl_dq.cli import main as cli  # noqa: E402

CALIB = os.path.join(ROOT, "calibImages")
HELDOUT = os.path.join(ROOT, "tests", "data", "heldout")


def ours(model: str, out: str, method: str, images: str = CALIB) -> float:
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli(["quantize", "--model_path", model, "--save_directory", out, "--calib_images", images,
                  "--device_type", "cpu", "--anti_method", method, "--mindie_format", "--log_level", "warning"])
    if rc != 0:
        raise SystemExit(f"qwenvl-dq quantize --anti_method {method} failed ({rc})")
    return time.perf_counter() - t


def reference(model: str, work: str, method: str, images: str = CALIB) -> tuple[str, str] | None:
    """msModelSlim's output dir and its timing line, or None (with the reason printed) when it cannot run."""
    scratch = os.path.join(work, f"ref_{method}")
    os.makedirs(scratch, exist_ok=True)
    # the example refuses group/other-writable inputs: private copies, 750
    m, imgs = os.path.join(scratch, "model"), os.path.join(scratch, "images")
    if not os.path.isdir(m):
        shutil.copytree(model, m)
        shutil.copytree(images, imgs)
        for root, dirs, files in os.walk(scratch):
            for n in dirs + files:
                os.chmod(os.path.join(root, n), 0o750)
    out = os.path.join(scratch, "out")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(ROOT, "scripts", "golden", "refpython.sh"),
           os.path.join(ROOT, "scripts", "golden", "ref_quantize.py"), m, imgs, out, "--anti_method", method]
    proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("REF_RESULT")), None)
    if proc.returncode != 0 or line is None:
        print(f"msModelSlim {method} did not run (exit {proc.returncode}); its rows are left out:\n"
              + proc.stderr[-2000:], file=sys.stderr)
        return None
    return out, line


def calib30(src: str, dst: str) -> None:
    """30 real-image variants: each calibration photo cropped to different windows and mirrored."""
    from PIL import Image, ImageOps

    os.makedirs(dst, exist_ok=True)
    photos = sorted(f for f in os.listdir(src) if f.endswith(".jpg"))
    n = 0
    while n < 30:
        for f in photos:
            if n >= 30:
                break
            im = Image.open(os.path.join(src, f)).convert("RGB")
            w, h = im.size
            k = n // len(photos)
            box = (k * w // 16, k * h // 20, w - (7 - k) * w // 40, h - k * h // 24)
            crop = im.crop(box)
            if k % 2:
                crop = ImageOps.mirror(crop)
            crop.save(os.path.join(dst, f"{n:02d}_{f}"), quality=90)
            n += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "out", "quality"))
    p.add_argument("--no_reference", action="store_true", help="leave out msModelSlim's rows")
    p.add_argument("--calib30", action="store_true", help="also time calibration on 30 images")
    p.add_argument("--images30", action="store_true",
                   help="calibrate every run (ours and msModelSlim's) on the 30 variants instead of the 4 photos")
    p.add_argument("--model_args", default="", help="extra make_tiny_qwen2vl.py flags for a larger model, e.g. "
                   "'--hidden_size 512 --intermediate_size 1408 --num_hidden_layers 4'")
    a = p.parse_args()
    out = os.path.abspath(a.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)

    model = make_tiny_qwen2vl.build(os.path.join(out, "tiny-qwen2vl"), a.model_args.split())
    images, count = CALIB, 4
    if a.images30:
        images, count = os.path.join(out, "images30"), 30
        calib30(CALIB, images)
    runs, notes = [], []
    for method in ("none", "m2", "m4"):
        d = os.path.join(out, f"qwenvl-dq_{method}")
        secs = ours(model, d, method, images)
        runs.append((f"ours {method}", d))
        notes.append(f"ours {method}: quantized in {secs:.1f} s ({count} images)")
    if not a.no_reference:
        for method in ("m2", "m4"):
            got = reference(model, out, method, images)
            if got:
                runs.append((f"msModelSlim {method}", got[0]))
                notes.append(f"msModelSlim {method}: {got[1]}")
    report = evaluate.evaluate(model, runs, HELDOUT)
    evaluate.write_report(report, os.path.join(out, "report.json"))
    evaluate.plot(report, os.path.join(out, "report.png"))
    print(f"tiny outlier Qwen2-VL {a.model_args or '(default sizes)'}, calibrated on {count} images, "
          f"evaluated on tests/data/heldout "
          f"({len(report['samples'])} images, {report['tokens']} tokens)")
    print(evaluate.table(report))
    print("\n".join(notes))
    if a.calib30:
        imgs = os.path.join(out, "calib30")
        calib30(CALIB, imgs)
        for method in ("m2", "m4"):
            secs = ours(model, os.path.join(out, f"calib30_{method}"), method, imgs)
            print(f"30 images, --anti_method {method}: {secs:.1f} s end to end (build, calibrate, write)")
    print(f"report: {out}/report.json, plot: {out}/report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
