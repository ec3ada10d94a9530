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
