#!/usr/bin/env python3
"""Benchmark (never a test): qwenvl-dq against msModelSlim 26.1.0 and against the floor, 2 ranks against 1, and 32
decoder layers against 8, on CPU, all measured in one invocation.

    .venv/bin/python scripts/bench.py [--reference] [--quick] [--json bench.json] [--work DIR] [--keep] ...

Every run is its own process, timed from outside (wall) with its peak RSS as the OS counts it (the largest process of
the run: for 2 ranks, the larger rank; for ours, the larger of that and the largest per-phase peak a rank reports,
since the kernel's figure forgets what came before qwenvl-dq's per-phase resets), beside the summary qwenvl-dq
prints (seconds and peak RSS per phase and rank, bytes read and written). The runs:

1. models: medium random Qwen2-VLs from scripts/make_tiny_qwen2vl.py (LLM hidden 1024, intermediate 2816, 16 heads
   with 2 kv heads, 4 vision blocks of 256) with 8 and 32 decoder layers and the real image processor's pixel limits,
   and 30 calibration images (crops and mirrors of calibImages/); --work reuses them;
2. the floor, on the 8-layer model, in one fresh process: one plain read of every source tensor (safetensors'
   load_file), one float32 forward of every calibration sample through the whole model (transformers'
   Qwen2VLForConditionalGeneration loaded whole, the same inputs as ours; float32 is the fastest float on a CPU
   without bf16 units, and ours computes in it there too; the bf16 forward is timed beside it), one plain write +
   fsync of as many bytes as our output holds; the floor is their sum. Its start-up (the interpreter, torch's and
   transformers' imports, the processor and the images: what any process pays before that forward) is timed too,
   for a second ratio that counts it on both sides, since ours' wall counts its own;
3. ours, 1 rank with 2 threads (the whole machine): --anti_method none, m2, m4 on 8 layers, none and m2 on 32;
4. --reference: msModelSlim 26.1.0 in its side venv (scripts/golden/refpython.sh sets it up when it is missing),
   m2 and m4 on 8 layers through its example flow (scripts/golden/ref_quantize.py), the same images; with
   --reference_large on 32 layers too (and ours m4 there), since its memory follows the model and ours one layer;
5. 2 ranks x 1 thread against 1 rank x 1 thread (a rank stands for a card, one core each) and 1 rank x 2 threads,
   m2 and none on 8 layers; outputs compared byte for byte with the 1-rank one.

Prints the runs and the ratios against the issue's targets, writes --json. It waits (--idle) for the machine to be
quiet before each run and reports the CPU other processes took during it (`bg cores`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

CALIB = os.path.join(ROOT, "calibImages")
MEDIUM = ["--hidden_size", "1024", "--intermediate_size", "2816", "--num_attention_heads", "16",
          "--num_key_value_heads", "2", "--vision_depth", "4", "--vision_embed_dim", "256", "--vision_num_heads", "4",
          "--max_pixels", "12845056"]
QUICK = ["--hidden_size", "512", "--intermediate_size", "1408", "--num_attention_heads", "8",
         "--num_key_value_heads", "2", "--vision_depth", "2", "--vision_embed_dim", "128", "--vision_num_heads", "4"]
TARGETS = {  # ratio -> (bound, "max" or "min")
    "m2 wall / msModelSlim m2": (0.5, "max"), "m4 wall / msModelSlim m4": (0.5, "max"),
    "m2 peak RSS / msModelSlim m2": (0.5, "max"), "m4 peak RSS / msModelSlim m4": (0.5, "max"),
    "none wall / floor": (1.5, "max"), "m2 wall / floor": (3.0, "max"),
    "calibrate 1 rank / 2 ranks (m2)": (1.6, "min"),
    "peak RSS 32 / 8 layers (none)": (1.1, "max"), "peak RSS 32 / 8 layers (m2)": (1.1, "max"),
}


def make_calib(src: str, dst: str, count: int) -> str:
    """`count` real-image variants: each photo of `src` cropped to a different window, every other round mirrored."""
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


def cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all processes, all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")


def wait_idle(threshold: float, limit: float) -> None:
    """Wait until other processes use less than `threshold` cores (sampled over 3 s), at most `limit` seconds."""
    t0, said = time.monotonic(), False
    while True:
        c, t = cpu_seconds(), time.monotonic()
        time.sleep(3)
        load = (cpu_seconds() - c) / (time.monotonic() - t)
        if load < threshold or time.monotonic() - t0 > limit:
            if said:
                print(f"  ... {'idle' if load < threshold else 'still busy, going on'} after "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
            return
        if not said:
            print(f"  waiting for the machine: other processes use {load:.2f} cores", flush=True)
            said = True
        time.sleep(7)


def measure(cmd: list[str], env: dict, cwd: str, log: str, timeout: float) -> dict:
    """Run cmd; wall seconds, the peak RSS of its largest process (wait4: the child and every descendant it
    waited for), its CPU seconds and the CPU others used meanwhile."""
    busy0 = cpu_seconds()
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    out = {"stdout": "", "stderr": ""}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()))
               for k, s in (("stdout", p.stdout), ("stderr", p.stderr))]
    for r in readers:
        r.start()
    timer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
    timer.start()
    _, status, ru = os.wait4(p.pid, 0)
    timer.cancel()
    for r in readers:
        r.join()
    wall = time.perf_counter() - t
    cpu = ru.ru_utime + ru.ru_stime
    rc = os.waitstatus_to_exitcode(status)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + f"\n(exit {rc}, {wall:.1f} s)\n" + out["stdout"] + "\n--- stderr ---\n"
                + out["stderr"])
    if rc != 0:
        tail = "\n".join((out["stdout"] + out["stderr"]).splitlines()[-25:])
        raise SystemExit(f"run failed (exit {rc}), log {log}:\n{tail}")
    return {"wall": wall, "peak_rss": ru.ru_maxrss * 1024, "cpu_s": cpu,
            "bg_cores": max(cpu_seconds() - busy0 - cpu, 0.0) / wall, "stdout": out["stdout"],
            "stderr": out["stderr"], "command": " ".join(cmd)}


def parse_summary(stdout: str) -> dict:
    """qwenvl-dq's summary lines: time per phase, peak RSS per phase and rank, bytes read and written."""
    seconds, peaks, io = {}, {}, {}
    for line in stdout.splitlines():
        if line.startswith("time: "):
            seconds = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", line[len("time: "):])}
        m = re.match(r"peak memory \(rank (\d+)\): (.*)", line)
        if m:
            peaks[int(m.group(1))] = {k: int(v) for k, v in re.findall(r"(\w+) ([0-9]+) MiB", m.group(2))}
        m = re.match(r"wrote .* in [0-9.]+ s: ([0-9.]+) MiB of weights from ([0-9.]+) MiB", line)
        if m:
            io.update(written_mib=float(m.group(1)), source_mib=float(m.group(2)))
        m = re.match(r"read ([0-9.]+) MiB from the source", line)
        if m:
            io["read_mib"] = float(m.group(1))
    return {"seconds": seconds, "peak_mib": peaks, **io}


def env_for(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def ours(a, model: str, calib: str, out: str, method: str, ranks: int, threads: int, log: str) -> dict:
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())] \
        if ranks > 1 else []  # one rank runs as one card would: plainly
    cmd = [sys.executable, *launch, "-m", "qwenvl_dq", "quantize", "--model_path", model, "--save_directory", out,
           "--calib_images", calib, "--device_type", "cpu", "--anti_method", method, "--mindie_format",
           "--overwrite"]
    r = measure(cmd, env_for(threads), ROOT, log, a.timeout)
    r.update(parse_summary(r.pop("stdout")))
    r.pop("stderr")
    # qwenvl-dq resets the kernel's high-water mark between its phases (for its per-phase figures), and the kernel
    # then forgets the earlier peak (wait4's ru_maxrss counts from the last reset): the run's peak is the larger of
    # the OS's figure and the largest phase peak a rank reports (each a VmHWM read)
    r["peak_rss_os"] = r["peak_rss"]
    r["peak_rss"] = max([r["peak_rss"]] + [v * 2**20 for p in r["peak_mib"].values() for v in p.values()])
    r["hashes"] = tree_hashes(out)
    return r


def reference(a, model: str, calib: str, out: str, method: str, log: str) -> dict:
    """msModelSlim's example flow in its side venv (the script prints REF_RESULT seconds=.. peak_rss_mib=..)."""
    scratch = tempfile.mkdtemp(prefix="ref_cwd_", dir=a.work)  # it drops features.npy in its working directory
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["bash", os.path.join(ROOT, "scripts", "golden", "refpython.sh"),
           os.path.join(ROOT, "scripts", "golden", "ref_quantize.py"), model, calib, out, "--anti_method", method]
    r = measure(cmd, env_for(a.threads), scratch, log, a.timeout)
    m = re.search(r"REF_RESULT seconds=([0-9.]+) peak_rss_mib=([0-9]+)", r.pop("stdout"))
    r.pop("stderr")
    r["inner_seconds"] = float(m.group(1)) if m else None
    shutil.rmtree(scratch, ignore_errors=True)
    return r


# --- the floor ---------------------------------------------------------------------------------------------------


def floor_main(model: str, calib: str, out_bytes: int, scratch: str) -> None:
    """In its own process: read, forward, write; prints FLOOR {json}."""
    import torch
    from safetensors.torch import load_file

    from qwenvl_dq import calib_data, qwen2vl

    shards = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))
    t = time.perf_counter()
    nbytes = 0
    for f in shards:
        for v in load_file(os.path.join(model, f)).values():
            nbytes += v.clone().numel() * v.element_size()  # a copy: load_file's tensors may still be a lazy map
    read_s = time.perf_counter() - t

    import transformers

    samples = calib_data.load_samples(calib, model)
    # what any process doing the floor's work pays before its forward: the interpreter, torch's and transformers'
    # imports, the processor and the images (the time since the parent started this process, less the read)
    startup_s = time.time() - float(os.environ["QWENVL_DQ_BENCH_LAUNCH"]) - read_s
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(model))
    forward = {}
    # float32 is the floor (what ours computes in on cpu); the model's own dtype, as transformers loads it, is timed
    # too: 3x slower than float32 on a CPU without bf16 units, about 2x faster on one with AVX-512 BF16
    for dtype in (torch.float32, torch.bfloat16):
        kw = {"dtype" if qwen2vl.TF5 else "torch_dtype": dtype}
        hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model, **kw).eval()
        tokens = 0
        with torch.inference_mode():
            t = time.perf_counter()
            for s in samples:
                pos = qwen2vl.rope_index(hf, s.input_ids, s.image_grid_thw, arch.image_token_id)
                hf(input_ids=s.input_ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                   position_ids=pos)
                tokens += s.input_ids.shape[1]
            forward[str(dtype).replace("torch.", "")] = time.perf_counter() - t
        del hf
    forward_s = forward["float32"]

    path = os.path.join(scratch, "floor_write.bin")
    block = os.urandom(1 << 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = out_bytes
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t
    os.remove(path)
    print("FLOOR " + json.dumps({"read_s": read_s, "read_bytes": nbytes, "forward_s": forward_s,
                                 "forward_bf16_s": forward["bfloat16"], "startup_s": startup_s,
                                 "samples": len(samples), "tokens": tokens, "write_s": write_s,
                                 "write_bytes": out_bytes}), flush=True)


def floor(a, model: str, calib: str, out_bytes: int, log: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--floor", model, calib, str(out_bytes), a.work]
    env = env_for(a.threads)
    env["QWENVL_DQ_BENCH_LAUNCH"] = repr(time.time())
    r = measure(cmd, env, ROOT, log, a.timeout)
    f = json.loads(r["stdout"].split("FLOOR ", 1)[1].splitlines()[0])
    f["total_s"] = f["read_s"] + f["forward_s"] + f["write_s"]
    f["process_wall"] = r["wall"]
    return f


# --- the report --------------------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def run_table(runs: dict) -> str:
    head = ["run", "wall s", "plan s", "calibrate s", "write s", "peak RSS MiB", "rank 0 peak MiB plan/calib/write",
            "read MiB", "written MiB", "bg cores"]
    rows = []
    for name, r in runs.items():
        s, p = r.get("seconds", {}), r.get("peak_mib", {})
        p0 = p.get(0) or p.get("0", {})  # reused from bench.json: its keys are strings
        rows.append([name, f"{r['wall']:.1f}", f"{s.get('plan', 0):.1f}" if s else "-",
                     f"{s.get('calibrate', 0):.1f}" if s else "-", f"{s.get('write', 0):.1f}" if s else "-",
                     mib(r["peak_rss"]), "/".join(str(p0.get(k, "-")) for k in ("plan", "calibrate", "write"))
                     if p0 else "-", f"{r.get('read_mib', 0):.0f}" if "read_mib" in r else "-",
                     f"{r.get('written_mib', 0):.0f}" if "written_mib" in r else "-", f"{r['bg_cores']:.2f}"])
    return _md([head] + rows)


def ratio_table(ratios: dict) -> str:
    rows = [["ratio", "measured", "target", "met"]]
    for k, v in ratios.items():
        bound, kind = TARGETS.get(k, (None, None))
        if bound is None:
            rows.append([k, f"{v:.2f}x", "-", "-"])
        else:
            ok = v <= bound if kind == "max" else v >= bound
            rows.append([k, f"{v:.2f}x", f"{'<=' if kind == 'max' else '>='} {bound}x", "yes" if ok else "NO"])
    return _md(rows)


def _md(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(r) + " |" for r in rows]
    out.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--floor":
        floor_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", action="store_true", help="also run msModelSlim 26.1.0 (m2, m4) in its side venv")
    p.add_argument("--reference_large", action="store_true",
                   help="with --reference: msModelSlim on the large model too (m2 there takes about 15 minutes)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: hidden 512, 2 and 4 layers, 8 images, no 1 x 1 rows")
    p.add_argument("--layers", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                   help="decoder layers of the two models (default 8 32)")
    p.add_argument("--images", type=int, default=None, help="calibration images (default 30)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each measured run N times and keep the median by wall time (this machine's run-to-run "
                        "spread is up to 20 percent with nothing else running)")
    p.add_argument("--threads", type=int, default=2, help="threads of a 1-rank run and of the floor (default 2)")
    p.add_argument("--json", default="bench.json", help="where the figures go (default bench.json)")
    p.add_argument("--work", default=None,
                   help="working folder, kept and reused across invocations (models, images); default: a temporary one")
    p.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    p.add_argument("--timeout", type=float, default=7200, help="seconds one run may take")
    p.add_argument("--idle", type=float, default=0.3,
                   help="before each run wait until other processes use fewer cores than this (0: do not wait)")
    p.add_argument("--idle_wait", type=float, default=1800, help="longest wait for a quiet machine, seconds")
    p.add_argument("--reuse", action="store_true",
                   help="take the runs (and the floor) already in --json instead of running them again, except "
                        "those named by --rerun; their outputs must still be in --work")
    p.add_argument("--rerun", nargs="*", default=[], metavar="RUN",
                   help="with --reuse: measure these runs again (names as in the table, e.g. 'ours m2 8L', 'floor')")
    a = p.parse_args()
    if a.repeat < 1:
        p.error(f"--repeat {a.repeat}: give 1 or more runs")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the working folder is still removed
    small, large = a.layers or ((2, 4) if a.quick else (8, 32))
    images = a.images or (8 if a.quick else 30)
    sizes = QUICK if a.quick else MEDIUM
    temporary = a.work is None
    a.work = os.path.abspath(a.work or tempfile.mkdtemp(prefix="qwenvl_dq_bench_"))
    os.makedirs(a.work, exist_ok=True)
    logs = os.path.join(a.work, "logs")
    os.makedirs(logs, exist_ok=True)
    try:
        models = {}
        for n in (small, large):
            path = os.path.join(a.work, f"model_{n}")
            if not os.path.exists(os.path.join(path, "config.json")):
                # in a child: a big bench process would lend its own peak RSS to every run it starts (the kernel
                # folds the forked memory's high-water mark into the child's maxrss at exec)
                subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_qwen2vl.py"), path,
                                *sizes, "--num_hidden_layers", str(n)], check=True, stdout=subprocess.DEVNULL)
            os.chmod(path, 0o750)  # msModelSlim refuses folders others can write to
            models[n] = path
        calib = os.path.join(a.work, f"calib{images}")
        if not os.path.isdir(calib):
            make_calib(CALIB, calib, images)
        os.chmod(calib, 0o750)
        print(f"models: {', '.join(models.values())} ({' '.join(sizes)}); {images} images in {calib}", flush=True)

        runs: dict[str, dict] = {}
        before = {}
        if a.reuse and os.path.exists(a.json):
            with open(a.json) as f:
                before = json.load(f)

        def run(name, fn, *args):
            if name in before.get("runs", {}) and name not in a.rerun:
                runs[name] = dict(before["runs"][name])
                if fn is ours:
                    runs[name]["hashes"] = tree_hashes(args[3])
                print(f"  {name}: from {a.json}", flush=True)
                return runs[name]
            print(f"{name} ...", flush=True)
            tries = []
            for _ in range(a.repeat):
                if a.idle > 0:
                    wait_idle(a.idle, a.idle_wait)
                tries.append(fn(*args))
            tries.sort(key=lambda t: t["wall"])
            r = runs[name] = tries[len(tries) // 2]  # the median run, whole (its phases, peaks and bytes)
            spread = ""
            if len(tries) > 1:
                r["walls"] = [t["wall"] for t in tries]
                spread = f" (median of {len(tries)}: {tries[0]['wall']:.1f}-{tries[-1]['wall']:.1f} s)"
            print(f"  {name}: wall {r['wall']:.1f} s{spread}, peak RSS {mib(r['peak_rss'])} MiB", flush=True)
            return r

        out = lambda name: os.path.join(a.work, "out_" + name.replace(" ", "_").replace("/", ""))  # noqa: E731
        for method in ("none", "m2", "m4"):
            name = f"ours {method} {small}L"
            run(name, ours, a, models[small], calib, out(name), method, 1, a.threads,
                os.path.join(logs, name.replace(" ", "_") + ".txt"))
        if a.reference:
            for n in (small, large) if a.reference_large else (small,):
                for method in ("m2", "m4"):
                    name = f"msModelSlim {method} {n}L"
                    run(name, reference, a, models[n], calib, out(name), method,
                        os.path.join(logs, name.replace(" ", "_") + ".txt"))
        out_bytes = int(runs[f"ours none {small}L"]["written_mib"] * 2**20)
        if "floor" in before and "floor" not in a.rerun:
            fl = before["floor"]
        else:
            if a.idle > 0:
                wait_idle(a.idle, a.idle_wait)
            print("floor ...", flush=True)
            fl = floor(a, models[small], calib, out_bytes, os.path.join(logs, "floor.txt"))
        print(f"  floor: read {fl['read_s']:.2f} s + forward {fl['forward_s']:.2f} s ({fl['samples']} samples, "
              f"{fl['tokens']} tokens) + write {fl['write_s']:.2f} s = {fl['total_s']:.2f} s; its start-up "
              f"{fl.get('startup_s', float('nan')):.2f} s", flush=True)
        for method in ("none", "m2"):
            for ranks, threads in ((1, 1), (2, 1)):
                name = f"ours {method} {small}L {ranks}x{threads}"
                run(name, ours, a, models[small], calib, out(name), method, ranks, threads,
                    os.path.join(logs, name.replace(" ", "_") + ".txt"))
        for method in ("none", "m2", "m4") if a.reference_large else ("none", "m2"):
            name = f"ours {method} {large}L"
            run(name, ours, a, models[large], calib, out(name), method, 1, a.threads,
                os.path.join(logs, name.replace(" ", "_") + ".txt"))

        ratios = {}
        for n in (small, large):
            for method in ("m2", "m4"):
                ref, mine = runs.get(f"msModelSlim {method} {n}L"), runs.get(f"ours {method} {n}L")
                if ref and mine:
                    at = "" if n == small else f" ({n}L)"
                    ratios[f"{method} wall / msModelSlim {method}{at}"] = mine["wall"] / ref["wall"]
                    ratios[f"{method} peak RSS / msModelSlim {method}{at}"] = mine["peak_rss"] / ref["peak_rss"]
        bf16_floor = fl["total_s"] - fl["forward_s"] + fl["forward_bf16_s"]
        for method in ("none", "m2", "m4"):
            ratios[f"{method} wall / floor"] = runs[f"ours {method} {small}L"]["wall"] / fl["total_s"]
        if "startup_s" in fl:  # the floor as a whole process: its start-up counted, as ours' wall counts its own
            for method in ("none", "m2"):
                ratios[f"{method} wall / floor with its start-up"] = \
                    runs[f"ours {method} {small}L"]["wall"] / (fl["total_s"] + fl["startup_s"])
        for method in ("none", "m2"):
            ratios[f"{method} wall / floor with a bf16 forward"] = \
                runs[f"ours {method} {small}L"]["wall"] / bf16_floor
        identical = {}
        for method in ("none", "m2"):
            one, two = runs[f"ours {method} {small}L 1x1"], runs[f"ours {method} {small}L 2x1"]
            ratios[f"calibrate 1 rank / 2 ranks ({method})"] = one["seconds"]["calibrate"] / two["seconds"]["calibrate"]
            ratios[f"calibrate 1 rank x 2 threads / 2 ranks ({method})"] = \
                runs[f"ours {method} {small}L"]["seconds"]["calibrate"] / two["seconds"]["calibrate"]
            ratios[f"wall 1 rank / 2 ranks ({method})"] = one["wall"] / two["wall"]
            base = runs[f"ours {method} {small}L"]["hashes"]
            identical[method] = all(runs[n]["hashes"] == base for n in (f"ours {method} {small}L 1x1",
                                                                        f"ours {method} {small}L 2x1"))
            ratios[f"peak RSS {large} / {small} layers ({method})"] = \
                runs[f"ours {method} {large}L"]["peak_rss"] / runs[f"ours {method} {small}L"]["peak_rss"]
        if not a.quick and (small, large) == (8, 32):
            ratios = {k.replace(f"{large} / {small} layers", "32 / 8 layers"): v for k, v in ratios.items()}

        print()
        print(run_table(runs))
        print()
        print(f"floor ({small} layers): read {fl['read_s']:.2f} s ({mib(fl['read_bytes'])} MiB) + float forward "
              f"{fl['forward_s']:.2f} s ({fl['samples']} samples, {fl['tokens']} tokens) + write {fl['write_s']:.2f} s "
              f"({mib(fl['write_bytes'])} MiB) = {fl['total_s']:.2f} s (float32; the forward in bfloat16, the "
              f"model's dtype: {fl['forward_bf16_s']:.2f} s); the floor process's start-up before its forward "
              f"(interpreter, imports, processor, images): {fl.get('startup_s', float('nan')):.2f} s")
        print(f"outputs of 1 x 1, 2 x 1 and 1 x {a.threads} byte-identical: "
              + ", ".join(f"{m} {'yes' if v else 'NO'}" for m, v in identical.items()))
        print()
        print(ratio_table(ratios))
        import torch
        import transformers

        report = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "platform": platform.platform()},
            "models": {n: {"path": m, "args": sizes + ["--num_hidden_layers", str(n)]} for n, m in models.items()},
            "images": images, "floor": fl, "identical": identical, "ratios": ratios,
            "targets": {k: {"bound": b, "kind": kind} for k, (b, kind) in TARGETS.items()},
            "runs": {k: {kk: vv for kk, vv in v.items() if kk != "hashes"} for k, v in runs.items()},
        }
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nfigures: {os.path.abspath(a.json)}; logs: {logs}")
        return 0 if all(identical.values()) else 3
    finally:
        if temporary and not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
        else:
            print(f"working folder kept: {a.work}")


if __name__ == "__main__":
    sys.exit(main())
