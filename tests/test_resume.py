"""A run killed after some layers are solved resumes (--resume) to the bytes of an uninterrupted run, on 1 rank and
on 2; SIGTERM stops cleanly; the journal is checked against the run it belongs to."""

import os
import shutil
import signal
import time

import pytest

import make_tiny_qwen2vl
from conftest import dir_hashes, many_images, run_ranks, start_ranks
from qwenvl_dq import journal

LAYERS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An 8-layer tiny model, 24 images (long enough a run to stop half way), and its clean m2 output."""
    base = tmp_path_factory.mktemp("resume")
    model = make_tiny_qwen2vl.build(str(base / "tiny8"), ["--num_hidden_layers", str(LAYERS)])
    calib = many_images(base / "calib", 6)
    clean = base / "clean"
    (rc, _, err), = run_ranks(1, flags(model, calib, clean))
    assert rc == 0, err
    return model, calib, dir_hashes(clean)


def flags(model, calib, out, *extra):
    return ["--model_path", model, "--save_directory", str(out), "--calib_images", calib, "--device_type", "cpu",
            "--anti_method", "m2", "--mindie_format", "--part_file_size", "0.0002", *extra]


def solved(out, phase):
    d = os.path.join(out, ".qwenvl_dq", "layers")
    return sorted(f for f in os.listdir(d) if f.endswith(f".{phase}.safetensors")) if os.path.isdir(d) else []


def stop_when(procs, out, phase, count, sig, timeout=240):
    """Send sig to every process once `count` units have saved `phase` results; returns what was saved then."""
    t0 = time.monotonic()
    while len(solved(out, phase)) < count:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() - t0 < timeout, "no layer was solved in time"
        time.sleep(0.01)
    for p in procs:
        p.send_signal(sig)
    got = solved(out, phase)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    return got, errs


def assert_stopped(out, saved_phase):
    names = os.listdir(out)
    assert "INCOMPLETE" in names and not [n for n in names if n.startswith("quant_model_description")]
    files = solved(out, saved_phase)
    assert files, "nothing solved was kept"
    for f in files:  # the journal is private to the user
        assert os.stat(os.path.join(out, ".qwenvl_dq", "layers", f)).st_mode & 0o077 == 0


def restored(stderr):
    return stderr.count("restored from the journal:")


def test_a_killed_run_on_one_rank_resumes_to_the_same_bytes(setup, tmp_path):
    model, calib, clean = setup
    out = tmp_path / "o"
    procs = start_ranks(1, flags(model, calib, out))
    # 1 rank runs layer-major: each unit is final before the next starts; kill after the vision blocks and 2 layers
    saved, _ = stop_when(procs, out, "final", 4, signal.SIGKILL)
    assert procs[0].returncode == -signal.SIGKILL
    assert_stopped(out, "final")
    assert len(saved) < 2 + LAYERS, "the run finished before it was killed"
    (rc, _, err), = run_ranks(1, flags(model, calib, out, "--resume"))
    assert rc == 0, err
    assert restored(err) >= len(saved), err
    assert dir_hashes(out) == clean


def test_a_killed_run_on_two_ranks_resumes_on_two_or_one(setup, tmp_path):
    model, calib, clean = setup
    out = tmp_path / "o"
    procs = start_ranks(2, flags(model, calib, out))
    # 2 ranks are pipelined: the m2 searches run after the sweep, each rank on its own layers
    saved, _ = stop_when(procs, out, "smooth", 3, signal.SIGKILL)
    assert_stopped(out, "smooth")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    results = run_ranks(2, flags(model, calib, out, "--resume"))
    for r, (rc, _, err) in enumerate(results):
        assert rc == 0, (r, err)
    assert dir_hashes(out) == clean
    (rc, _, err), = run_ranks(1, flags(model, calib, copy, "--resume"))  # results do not depend on the rank count
    assert rc == 0, err
    assert "resume:" in err and dir_hashes(copy) == clean


def test_sigterm_stops_cleanly_and_the_run_resumes(setup, tmp_path):
    model, calib, clean = setup
    out = tmp_path / "o"
    procs = start_ranks(1, flags(model, calib, out))
    saved, (err,) = stop_when(procs, out, "final", 3, signal.SIGTERM)
    assert procs[0].returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "run the same command with --resume" in err and "Traceback" not in err
    assert_stopped(out, "final")
    assert not [f for r, _, fs in os.walk(out) for f in fs if f.endswith("_tmp")]
    (rc, _, err), = run_ranks(1, flags(model, calib, out, "--resume"))
    assert rc == 0, err
    assert restored(err) >= len(saved)
    assert dir_hashes(out) == clean


def test_a_stale_layer_file_is_not_used(setup, tmp_path):
    """A layer file from another run (another digest) in the journal is ignored: that layer is solved again."""
    model, calib, clean = setup
    out = tmp_path / "o"
    procs = start_ranks(1, flags(model, calib, out))
    stop_when(procs, out, "final", 3, signal.SIGKILL)
    layers = os.path.join(out, ".qwenvl_dq", "layers")
    first = sorted(os.listdir(layers))[0]
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(layers, first))
    save_file({k: v * 2 for k, v in tensors.items()}, os.path.join(layers, first),
              metadata={"fingerprint": "someone else's", "unit": first.split(".final")[0].split(".smooth")[0] + "."})
    (rc, _, err), = run_ranks(1, flags(model, calib, out, "--resume"))
    assert rc == 0, err
    assert dir_hashes(out) == clean


def test_a_journal_of_the_two_sweep_calibration_is_not_resumed():
    """Journals written before calibration became one sweep lack the scheme; resuming one names the change."""
    new = {"versions": {"qwenvl_dq": "0.1.0", "calibration": journal.CALIBRATION}, "flags": {}, "model": {},
           "images": []}
    old = {**new, "versions": {"qwenvl_dq": "0.1.0"}}
    assert journal.differences(old, new) == ["calibration was two sweeps, now one sweep"]
    assert journal.differences(new, new) == []
