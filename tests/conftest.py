import hashlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)

import make_tiny_qwen2vl  # noqa: E402

CALIB = os.path.join(ROOT, "calibImages")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The default tiny bf16 Qwen2-VL (3 decoder layers, 2 vision blocks, 2 shards)."""
    return make_tiny_qwen2vl.build(str(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory):
    return make_tiny_qwen2vl.build(str(tmp_path_factory.mktemp("models") / "tiny16"), ["--dtype", "float16"])


@pytest.fixture(scope="session")
def five_layers(tmp_path_factory):
    """5 decoder layers: 2 and 3 ranks split them unevenly."""
    return make_tiny_qwen2vl.build(str(tmp_path_factory.mktemp("models") / "tiny5"), ["--num_hidden_layers", "5"])


def many_images(folder, copies):
    """A calibration folder of `copies` x the bundled photos (symlinks), for runs that must last a while."""
    os.makedirs(folder, exist_ok=True)
    for i in range(copies):
        for f in sorted(os.listdir(CALIB)):
            if f.endswith(".jpg"):
                os.symlink(os.path.join(CALIB, f), os.path.join(folder, f"{i:02d}_{f}"))
    return str(folder)


@pytest.fixture(scope="session")
def calib_dir():
    return CALIB


def dir_hashes(path):
    """{relative file name: sha256} of every file under path."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def quantize(model, out, *extra, calib=CALIB):
    """Run `qwenvl-dq quantize` in-process; returns the exit code."""
    from qwenvl_dq.cli import main

    return main(["quantize", "--model_path", model, "--save_directory", str(out), "--calib_images", calib,
                 "--device_type", "cpu", "--anti_method", "none", *extra])


def one_rank(model, ckpt, arch, act_method, anti_method="none", resident=False):
    """A world-size-1 calibration stage over the whole model (resident: every layer loaded at once)."""
    import torch

    from qwenvl_dq import calibrate
    from qwenvl_dq.dist import Dist

    return calibrate.Stage(Dist(0, 1, 0, torch.device("cpu")), model, ckpt, arch, (0, arch.num_layers), resident,
                           act_method, anti_method)


def free_port():
    """A free port below Linux's ephemeral range (32768-60999): ranks that retry connecting to a port in that range
    before rank 0 listens on it can be handed it as their own source port and connect to themselves."""
    import random
    import socket

    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def start_ranks(n, argv, script=None, threads=1):
    """Start n real rank processes as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment), each running `python -m qwenvl_dq quantize argv` (or `python script argv`). Returns the Popens."""
    import subprocess

    port = free_port()
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, script, *argv] if script else [sys.executable, "-m", "qwenvl_dq", "quantize", *argv]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def run_ranks(n, argv, script=None, timeout=300):
    """start_ranks, wait; returns [(returncode, stdout, stderr)] per rank."""
    import threading

    procs = start_ranks(n, argv, script)
    out = [None] * n

    def wait(r):  # every rank's pipes are drained at once, so no rank blocks on a full pipe
        try:
            o, e = procs[r].communicate(timeout=timeout)
            out[r] = (procs[r].returncode, o, e)
        except Exception as exc:
            procs[r].kill()
            out[r] = (None, "", f"rank {r}: {exc}")

    threads = [threading.Thread(target=wait, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
