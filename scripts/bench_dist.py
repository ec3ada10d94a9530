"""Benchmark: distributed calibration, 1 rank against 2 ranks, on a medium random Qwen2-VL (CPU, gloo).

    .venv/bin/python scripts/bench_dist.py [--quick] [--methods none m2] [--model DIR] [--calib DIR] ...

1. builds a medium Qwen2-VL with scripts/make_tiny_qwen2vl.py (12 decoder layers, hidden 1024, 4 vision blocks;
   --layers/--hidden/--intermediate/--vision_depth change it) or reuses --model DIR, and a folder of --images
   calibration images (default 30: crops and mirrors of calibImages/, as scripts/quality.py --calib30 makes them)
   or reuses --calib DIR;
2. for each --methods, runs `qwenvl-dq quantize` under torchrun (`python -m torch.distributed.run
   --nproc_per_node N --master_port <free port> -m qwenvl_dq quantize ...`) as 1 rank x 1 thread, 2 ranks x
   1 thread each (OMP_NUM_THREADS=1: a rank stands for a card, one core each) and, for honesty, 1 rank x 2 threads
   (the same two cores used by one process);
3. times each whole run from outside (wall), parses rank 0's `time:` and `peak memory (rank 0):` lines, checks
   that every output file is byte-identical (sha256) to the 1 rank x 1 thread output of the same method, prints
   a table and writes the figures to --json (default bench_dist.json).

--quick: 4 decoder layers, hidden 512, 8 images (a smoke run of about three minutes, m2 most of it).
--repeat N runs every configuration N times and reports the fastest (by wall time). Before each run it waits
(--idle, --idle_wait) until other processes leave the cores free, and the table's `bg cores` column is the CPU
other processes used during the run (from /proc/stat, less this run's own CPU): well above 0 on a row that uses
both cores, its timings are not clean. This is a benchmark, not a test: it exits 1 only when a run fails, and 3
when an output is not byte-identical to the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

CALIB = os.path.join(ROOT, "calibImages")
# (ranks, threads per rank, label); the first is the reference every other row is compared with
CONFIGS = [(1, 1, "1 x 1"), (2, 1, "2 x 1"), (1, 2, "1 x 2 (threads)")]


def make_calib(src: str, dst: str, count: int) -> str:
    """`count` real-image variants: each photo of `src` cropped to a different window, every other round mirrored
    (the idea of scripts/quality.py --calib30, extended past 30 by cycling the windows)."""
    from PIL import Image, ImageOps

    os.makedirs(dst, exist_ok=True)
    photos = sorted(f for f in os.listdir(src) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    for n in range(count):
        f = photos[n % len(photos)]
        with Image.open(os.path.join(src, f)) as im:
            im = im.convert("RGB")
            w, h = im.size
            k = (n // len(photos)) % 8
            box = (k * w // 16, k * h // 20, w - (7 - k) * w // 40, h - k * h // 24)
            crop = im.crop(box)
            if (n // len(photos)) % 2:
                crop = ImageOps.mirror(crop)
            crop.save(os.path.join(dst, f"{n:03d}_{os.path.splitext(f)[0]}.jpg"), quality=90)
    return dst


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_hashes(d: str) -> dict[str, str]:
    out = {}
    for base, _, files in os.walk(d):
        for f in files:
            p = os.path.join(base, f)
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[os.path.relpath(p, d)] = h.hexdigest()
    return dict(sorted(out.items()))


def parse(stdout: str) -> dict:
    """Rank 0's summary lines: `time: plan 1.49 s, calibrate 1.10 s, ...` and
    `peak memory (rank 0): plan 351 MiB, ...`."""
    seconds, peak = {}, {}
    for line in stdout.splitlines():
        if line.startswith("time: "):
            seconds = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", line[len("time: "):])}
        elif line.startswith("peak memory (rank 0): "):
            peak = {k: int(v) for k, v in re.findall(r"(\w+) ([0-9]+) MiB", line.split(":", 1)[1])}
    return {"seconds": seconds, "peak_mib": peak}


def cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all processes, all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + sum(v[5:8])  # user nice system irq softirq steal (not idle, iowait)
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_idle(threshold: float, limit: float) -> float:
    """Wait until other processes use less than `threshold` cores (sampled over 3 s), at most `limit` seconds.
    Returns the last load seen."""
    t0 = time.monotonic()
    said = False
    while True:
        c, t = cpu_seconds(), time.monotonic()
        time.sleep(3)
        load = (cpu_seconds() - c) / (time.monotonic() - t)
        if load < threshold or time.monotonic() - t0 > limit:
            if said:
                print(f"  ... machine {'idle' if load < threshold else 'still busy, going on'} "
                      f"after {time.monotonic() - t0:.0f} s", flush=True)
            return load
        if not said:
            print(f"  waiting for the machine: other processes use {load:.2f} cores", flush=True)
            said = True
        time.sleep(7)


def run_one(model: str, calib: str, out: str, method: str, ranks: int, threads: int, log_path: str,
            timeout: float) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()),
           "-m", "qwenvl_dq", "quantize", "--model_path", model, "--save_directory", out,
           "--calib_images", calib, "--device_type", "cpu", "--anti_method", method, "--overwrite"]
    busy0, ours0 = cpu_seconds(), children_cpu()
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t
    ours = children_cpu() - ours0
    other = max(cpu_seconds() - busy0 - ours, 0.0)
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n" + p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-30:])
        raise SystemExit(f"run failed (exit {p.returncode}): {method} {ranks} x {threads}; log {log_path}\n{tail}")
    r = parse(p.stdout)
    if not r["seconds"]:
        raise SystemExit(f"no `time:` line from rank 0 in {log_path}")
    r.update(wall=wall, cpu_s=ours, background_cores=other / wall, command=" ".join(cmd),
             env={"OMP_NUM_THREADS": str(threads)})
    return r


def fmt_table(rows: list[dict]) -> str:
    head = ["method", "ranks x threads", "wall s", "plan s", "calibrate s", "write s",
            "peak MiB plan/calib/write", "calib speedup", "wall speedup", "identical", "bg cores"]
    lines = [head]
    for r in rows:
        s, m = r["seconds"], r["peak_mib"]
        lines.append([r["method"], r["label"], f"{r['wall']:.1f}", f"{s.get('plan', 0):.2f}",
                      f"{s.get('calibrate', 0):.2f}", f"{s.get('write', 0):.2f}",
                      "/".join(str(m.get(k, "?")) for k in ("plan", "calibrate", "write")),
                      f"{r['calib_speedup']:.2f}x", f"{r['wall_speedup']:.2f}x",
                      "ref" if r["reference"] else ("yes" if r["identical"] else "NO"),
                      f"{r['background_cores']:.2f}"])
    out = ["| " + " | ".join(row) + " |" for row in lines]
    out.insert(1, "|" + "|".join("---" for _ in head) + "|")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="reuse this Qwen2-VL directory instead of building one")
    p.add_argument("--calib", help="reuse this folder of calibration images instead of making one")
    p.add_argument("--images", type=int, default=None, help="calibration images to make (default 30; --quick 8)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 12; --quick 4)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024; --quick 512)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2816; --quick 1408)")
    p.add_argument("--vision_depth", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=["none", "m2"], choices=["none", "m2", "m4"])
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest (wall) is reported")
    p.add_argument("--quick", action="store_true", help="4 layers, hidden 512, 8 images: a fast smoke run")
    p.add_argument("--json", default="bench_dist.json", help="where the figures go")
    p.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the working folder (model, images, outputs, logs)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    p.add_argument("--idle", type=float, default=0.3,
                   help="before each run wait until other processes use fewer cores than this (default 0.3; "
                        "0 disables); the table's `bg cores` is what others used during the run")
    p.add_argument("--idle_wait", type=float, default=1800, help="longest wait for an idle machine, seconds")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the working folder is still removed
    layers = a.layers or (4 if a.quick else 12)
    hidden = a.hidden or (512 if a.quick else 1024)
    inter = a.intermediate or (1408 if a.quick else 2816)
    images = a.images or (8 if a.quick else 30)

    work = os.path.abspath(a.work) if a.work else tempfile.mkdtemp(prefix="bench_dist_")
    os.makedirs(work, exist_ok=True)
    model_args = []
    try:
        if a.model:
            model = os.path.abspath(a.model)
        else:
            import make_tiny_qwen2vl

            model_args = ["--hidden_size", str(hidden), "--intermediate_size", str(inter),
                          "--num_hidden_layers", str(layers), "--num_attention_heads", str(max(hidden // 64, 1)),
                          "--num_key_value_heads", "2", "--vision_depth", str(a.vision_depth),
                          "--vision_embed_dim", "256", "--vision_num_heads", "4"]
            t = time.perf_counter()
            model = make_tiny_qwen2vl.build(os.path.join(work, "model"), model_args)
            print(f"built {model} in {time.perf_counter() - t:.1f} s: {' '.join(model_args)}", flush=True)
        if a.calib:
            calib = os.path.abspath(a.calib)
        else:
            calib = make_calib(CALIB, os.path.join(work, "calib"), images)
        n_images = len([f for f in os.listdir(calib) if not f.startswith(".")])
        print(f"calibration images: {n_images} in {calib}", flush=True)

        rows, failed = [], False
        for method in a.methods:
            ref = None
            for ranks, threads, label in CONFIGS:
                best = None
                for i in range(a.repeat):
                    out = os.path.join(work, f"out_{method}_{ranks}x{threads}")
                    log = os.path.join(work, f"log_{method}_{ranks}x{threads}_{i}.txt")
                    if a.idle > 0:
                        wait_idle(a.idle, a.idle_wait)
                    r = run_one(model, calib, out, method, ranks, threads, log, a.timeout)
                    r["hashes"] = tree_hashes(out)
                    print(f"  {method} {label} run {i + 1}: wall {r['wall']:.1f} s, "
                          f"calibrate {r['seconds'].get('calibrate', 0):.2f} s", flush=True)
                    if best is None or r["wall"] < best["wall"]:
                        best = r
                    if ref is not None:
                        shutil.rmtree(out, ignore_errors=True)
                best.update(method=method, ranks=ranks, threads=threads, label=label, reference=ref is None)
                if ref is None:
                    ref = best
                best["identical"] = best["hashes"] == ref["hashes"]
                if not best["identical"]:
                    failed = True
                    diff = [f for f in set(best["hashes"]) | set(ref["hashes"])
                            if best["hashes"].get(f) != ref["hashes"].get(f)]
                    best["differing_files"] = sorted(diff)
                best["calib_speedup"] = ref["seconds"]["calibrate"] / best["seconds"]["calibrate"]
                best["wall_speedup"] = ref["wall"] / best["wall"]
                rows.append(best)

        table = fmt_table(rows)
        print()
        print(table)
        import torch

        report = {
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                        "platform": platform.platform(), "backend": "gloo"},
            "model": model if a.model else {"args": model_args},
            "images": n_images,
            "methods": a.methods,
            "repeat": a.repeat,
            "runs": [{k: v for k, v in r.items() if k != "hashes"} | {"output_sha256": r["hashes"]} for r in rows],
            "table": table,
        }
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nfigures: {os.path.abspath(a.json)}")
        if failed:
            print("an output differs from the 1 rank x 1 thread output", file=sys.stderr)
            return 3
        return 0
    finally:
        if a.keep or a.work:
            print(f"working folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
