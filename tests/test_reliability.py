"""Bad input (SPEC section 4, docs/RELIABILITY.md): one clear error naming the bad value, a non-zero exit, the source
untouched; a full disk; the output directory's states; and security (no remote code, no world-writable files)."""

import dataclasses
import errno
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from typing import Callable

import pytest
import torch

from conftest import CALIB, ROOT, dir_hashes, quantize
from qwenvl_dq import journal, writer
from qwenvl_dq.config import Config

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@dataclasses.dataclass
class World:
    """One case's files: a fresh copy of the tiny model, an image folder, the output path, extra flags."""

    tmp: str
    model: str
    calib: str
    out: str
    flags: list
    env: dict = dataclasses.field(default_factory=dict)

    def edit_config(self, **changes):
        p = os.path.join(self.model, "config.json")
        cfg = json.load(open(p))
        cfg.update(changes)
        json.dump(cfg, open(p, "w"))


def _images(w, files):
    os.makedirs(w.calib, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(w.calib, name), "wb") as f:
            f.write(data)


def _escape(w):
    p = os.path.join(w.model, "model.safetensors.index.json")
    idx = json.load(open(p))
    idx["weight_map"][next(iter(idx["weight_map"]))] = "../evil.safetensors"
    json.dump(idx, open(p, "w"))


def _bin_only(w):
    for f in os.listdir(w.model):
        if "safetensors" in f:
            os.remove(os.path.join(w.model, f))
    open(os.path.join(w.model, "pytorch_model.bin"), "wb").write(b"\0" * 64)


def _truncate(w):
    p = os.path.join(w.model, SHARD1)
    os.truncate(p, os.path.getsize(p) - 100)


def _corrupt_header(w):
    with open(os.path.join(w.model, SHARD1), "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 16)


def _output(w, files):
    os.makedirs(w.out)
    for name in files:
        open(os.path.join(w.out, name), "w").write("{}")


def _unfinished_by_other_flags(w):
    """An unfinished run made with --anti_method m4 (its real fingerprint), resumed with none."""
    os.makedirs(w.out)
    open(os.path.join(w.out, "INCOMPLETE"), "w").write("")
    images = [os.path.join(CALIB, f) for f in sorted(os.listdir(CALIB)) if f.endswith(".jpg")]
    cfg = Config(w.model, w.out, calib_images=CALIB, device_type="cpu", anti_method="m4")
    journal.write_fingerprint(w.out, journal.fingerprint(cfg, [SHARD1, SHARD2], images))
    w.flags += ["--resume"]


def _fake_one_gpu(monkeypatch):
    """The only way to show a card-count error without cards: torch.cuda reports one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@dataclasses.dataclass
class Case:
    id: str
    setup: Callable[[World], None]
    message: str  # a fragment of the one error line, with {tmp} {model} {calib} {out} filled in
    patch: Callable | None = None


CASES = [
    Case("model_path missing", lambda w: setattr(w, "model", os.path.join(w.tmp, "nope")),
         "model_path: {tmp}/nope does not exist"),
    Case("model_path is a Hub id (nothing is downloaded)", lambda w: setattr(w, "model", "Qwen/Qwen2-VL-7B-Instruct"),
         "model_path: Qwen/Qwen2-VL-7B-Instruct does not exist"),
    Case("model_path is a file", lambda w: setattr(w, "model", os.path.join(w.model, "config.json")),
         "model_path: {model}/config.json is not a directory"),
    Case("no config.json", lambda w: os.remove(os.path.join(w.model, "config.json")),
         "model_path: {model} has no config.json"),
    Case("config.json is not JSON", lambda w: open(os.path.join(w.model, "config.json"), "w").write("{"),
         "model_path: cannot read {model}/config.json"),
    Case("model_type not Qwen2-VL", lambda w: w.edit_config(model_type="llama"),
         "model_path: {model} holds model_type 'llama', not a Qwen2-VL"),
    Case("index names a missing shard", lambda w: os.remove(os.path.join(w.model, SHARD2)),
         f"model_path: the index names {SHARD2}, which is missing from {{model}}"),
    Case("index escapes the model directory", _escape,
         "model_path: the index names '../evil.safetensors', which lies outside {model}"),
    Case("truncated shard", _truncate, f"model_path: {{model}}/{SHARD1} is truncated"),
    Case("corrupt shard header", _corrupt_header,
         f"model_path: {{model}}/{SHARD1} is not a readable safetensors file"),
    Case("weights disagree with config.json", lambda w: w.edit_config(intermediate_size=192),
         "has shape [176, 64] but config.json implies [192, 64]"),
    Case(".bin-only checkpoint", _bin_only, "it holds only PyTorch .bin weights: convert them to safetensors"),
    Case("calib_images missing", lambda w: setattr(w, "calib", os.path.join(w.tmp, "nope")),
         "calib_images: {tmp}/nope is not a directory"),
    Case("calib_images empty", lambda w: os.makedirs(w.calib), "calib_images: {calib} holds no image files"),
    Case("calib_images holds no images", lambda w: _images(w, {"notes.txt": b"hello"}),
         "calib_images: {calib} holds no image files (looked for .jpg .jpeg .png .bmp .webp)"),
    Case("calib_images holds only corrupt images", lambda w: _images(w, {"broken.jpg": b"\xff\xd8 not a jpeg"}),
         "calib_images: none of the 1 image files in {calib} could be read (broken.jpg)"),
    Case("w_bit not 8", lambda w: w.flags.extend(["--w_bit", "4"]), "w_bit: 4 is not supported"),
    Case("a_bit not 8", lambda w: w.flags.extend(["--a_bit", "16"]), "a_bit: 16 is not supported"),
    Case("part_file_size 0", lambda w: w.flags.extend(["--part_file_size", "0"]),
         "part_file_size: 0 must be a positive number of GB"),
    Case("part_file_size negative", lambda w: w.flags.extend(["--part_file_size", "-2"]),
         "part_file_size: -2 must be a positive number of GB"),
    Case("npu without torch_npu", lambda w: w.flags.extend(["--device_type", "npu"]),
         "device_type: npu needs torch_npu, which is not installed"),
    Case("cuda without a GPU", lambda w: w.flags.extend(["--device_type", "cuda"]),
         "device_type: cuda, but torch sees no GPU"),
    Case("more ranks than cards", lambda w: (w.flags.extend(["--device_type", "cuda"]), w.env.update(LOCAL_RANK="1")),
         "device_type: local rank 1 needs card 1, but only 1 cuda devices are visible; start at most 1 rank per host",
         patch=_fake_one_gpu),
    Case("more ranks than decoder layers",
         lambda w: w.env.update(WORLD_SIZE="4", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
         "world size: 4 ranks but the model has only 3 decoder layers"),
    Case("save_directory is model_path", lambda w: setattr(w, "out", w.model),
         "save_directory: {model} is inside model_path {model}"),
    Case("save_directory inside model_path", lambda w: setattr(w, "out", os.path.join(w.model, "q")),
         "save_directory: {model}/q is inside model_path {model}"),
    Case("save_directory contains model_path", lambda w: (setattr(w, "out", w.tmp), w.flags.append("--overwrite")),
         "save_directory: {tmp} contains model_path {model}"),
    Case("save_directory holds other files, even with --overwrite",
         lambda w: (_output(w, ["notes.txt"]), w.flags.append("--overwrite")),
         "save_directory: {out} holds files that are not a quantized output (notes.txt); qwenvl-dq never deletes"),
    Case("save_directory holds a complete output", lambda w: _output(w, ["quant_model_description.json"]),
         "save_directory: {out} already holds a complete output (quant_model_description.json); pass --overwrite"),
    Case("save_directory holds an unfinished run", lambda w: _output(w, ["INCOMPLETE"]),
         "save_directory: {out} holds an unfinished qwenvl-dq run (INCOMPLETE); pass --resume"),
    Case("--resume of a complete output",
         lambda w: (_output(w, ["quant_model_description_w8a8.json"]), w.flags.append("--resume")),
         "save_directory: {out} already holds a complete output, so there is nothing to resume"),
    Case("--resume with --overwrite", lambda w: w.flags.extend(["--resume", "--overwrite"]),
         "resume: --resume continues an unfinished run and --overwrite starts over; pass one of them"),
    Case("--resume with other flags", _unfinished_by_other_flags,
         "resume: the unfinished run in {out} was made from something else: --anti_method was 'm4', now 'none'"),
]


def _run(w, capsys):
    """`qwenvl-dq quantize` in-process on World w; (exit code, stderr)."""
    try:
        code = quantize(w.model, w.out, *w.flags, calib=w.calib)
    except SystemExit as e:  # argparse refuses a value
        code = e.code
    return code, capsys.readouterr().err


def _world(tiny_model, tmp_path):
    tmp = str(tmp_path)
    model = os.path.join(tmp, "model")
    shutil.copytree(tiny_model, model)
    return World(tmp, model, os.path.join(tmp, "imgs"), os.path.join(tmp, "out"), [])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_nothing_is_written(case, tiny_model, tmp_path, capsys, monkeypatch):
    w = _world(tiny_model, tmp_path)
    calib_default = w.calib
    case.setup(w)
    if w.calib == calib_default and not os.path.exists(w.calib):
        w.calib = CALIB
    for k, v in w.env.items():
        monkeypatch.setenv(k, v)
    if case.patch:
        case.patch(monkeypatch)
    before = dir_hashes(os.path.join(w.tmp, "model"))
    out_before = dir_hashes(w.out) if os.path.isdir(w.out) else None
    code, err = _run(w, capsys)
    expected = case.message.format(tmp=w.tmp, model=os.path.join(w.tmp, "model"), calib=w.calib, out=w.out)
    assert code == 2, err
    assert expected in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert dir_hashes(os.path.join(w.tmp, "model")) == before
    if out_before is not None and w.out != w.tmp:
        assert dir_hashes(w.out) == out_before, "an output directory that was refused was changed"
    elif w.out != w.tmp:
        assert not os.path.exists(w.out)


def test_the_reliability_doc_lists_every_case():
    doc = open(os.path.join(ROOT, "docs", "RELIABILITY.md"), encoding="utf-8").read()
    for c in CASES:
        assert c.id in doc, c.id
        for chunk in re.split(r"\{\w+\}", c.message):  # the words around the paths
            if len(chunk.strip()) > 8:
                assert chunk.strip() in doc, (c.id, chunk)


def test_unreadable_model_path_is_named(tiny_model, tmp_path):
    """A model folder without read permission. Root reads everything, so as root the run gets no
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (setpriv), as an ordinary user has none."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    os.chmod(model, 0o000)
    cmd = [sys.executable, "-m", "qwenvl_dq", "quantize", "--model_path", str(model), "--save_directory",
           str(tmp_path / "out"), "--device_type", "cpu"]
    if os.getuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: permissions cannot be taken away")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(model, 0o755)
    assert r.returncode == 2, r.stderr
    assert f"model_path: {model} is not readable; check its permissions" in r.stderr
    assert not os.path.exists(tmp_path / "out")


# --- a full disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB tmpfs (needs mount rights: root with CAP_SYS_ADMIN)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected-ENOSPC test covers the write")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _weight_files(out):
    return [f for f in os.listdir(out) if f.startswith("quant_model_weight") and f.endswith(".safetensors")]


def _assert_marked_incomplete(out):
    names = os.listdir(out)
    assert "INCOMPLETE" in names
    assert not [n for n in names if n.startswith("quant_model_description")]
    assert not _weight_files(out), "a weight file under its final name"
    assert not [n for n in names if n.endswith(writer.TMP_SUFFIX)], "temporary files left behind"


def test_a_disk_too_small_is_refused_before_calibration(tiny_model, small_disk, capsys):
    filler = os.path.join(small_disk, "filler")
    with open(filler, "wb") as f:  # leave about 200 KiB: the output needs more
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - (200 << 10)))
    out = os.path.join(small_disk, "out")
    assert quantize(tiny_model, out, "--anti_method", "m2") == 2
    err = capsys.readouterr().err
    assert "save_directory: the output needs" in err and f"is free on the disk of {out}" in err, err
    assert "calibrating" not in err and not os.path.exists(out)


def _fill_after_prepare(monkeypatch, disk, leave):
    """Fill the disk right after the output directory is made ready: the run then hits a real ENOSPC."""
    from qwenvl_dq import outdir

    real = outdir.prepare

    def prepare(*a, **k):
        real(*a, **k)
        with open(os.path.join(disk, "filler"), "wb") as f:
            f.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))

    monkeypatch.setattr(outdir, "prepare", prepare)


def test_a_disk_that_fills_during_the_write_leaves_a_resumable_incomplete_output(tiny_model, small_disk, tmp_path,
                                                                                capsys, monkeypatch):
    clean = tmp_path / "clean"
    assert quantize(tiny_model, clean, "--anti_method", "m2", "--mindie_format") == 0
    out = os.path.join(small_disk, "out")
    _fill_after_prepare(monkeypatch, small_disk, leave=96 << 10)  # the journal fits, the weights do not
    assert quantize(tiny_model, out, "--anti_method", "m2", "--mindie_format") == 2
    err = capsys.readouterr().err
    assert "save_directory: the disk is full (No space left on device) while writing the output" in err, err
    assert "run the same command with --resume" in err and "Traceback" not in err
    _assert_marked_incomplete(out)
    monkeypatch.undo()
    os.remove(os.path.join(small_disk, "filler"))
    assert quantize(tiny_model, out, "--anti_method", "m2", "--mindie_format", "--resume") == 0
    assert dir_hashes(out) == dir_hashes(clean)


def test_an_injected_enospc_during_the_write_is_one_clear_error(tiny_model, tmp_path, capsys, monkeypatch):
    """The same as the tmpfs test wherever mounting is not allowed: the third part fails as a full disk would."""
    writes = []
    real = writer.PartFiles.write

    def write(self, name, tensor):
        writes.append(name)
        if len(writes) == 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, name, tensor)

    monkeypatch.setattr(writer.PartFiles, "write", write)
    out = tmp_path / "o"
    assert quantize(tiny_model, out, "--part_file_size", "0.0001") == 2
    err = capsys.readouterr().err
    assert "save_directory: the disk is full (No space left on device) while writing the output" in err, err
    _assert_marked_incomplete(str(out))


# --- the output directory's states and security ------------------------------------------------------------------


def test_overwrite_replaces_an_earlier_output_and_nothing_else(tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    assert quantize(tiny_model, out, "--calib_num", "1") == 0
    assert quantize(tiny_model, out, "--calib_num", "1") == 2
    assert "already holds a complete output" in capsys.readouterr().err
    (out / "old_part.safetensors").write_bytes(b"x")  # a file the earlier output had: it goes too
    assert quantize(tiny_model, out, "--calib_num", "1", "--overwrite") == 0
    assert not (out / "old_part.safetensors").exists() and (out / "quant_model_description.json").exists()
    assert not (out / "INCOMPLETE").exists() and not (out / ".qwenvl_dq").exists()


def test_model_code_never_runs_and_is_never_copied(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "code_ran"
    (model / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                 "from transformers import Qwen2VLConfig as EvilConfig\n")
    cfg = json.load(open(model / "config.json"))
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    json.dump(cfg, open(model / "config.json", "w"))
    tok = json.load(open(model / "tokenizer_config.json"))
    tok["auto_map"] = {"AutoTokenizer": ["configuration_evil.EvilConfig", None]}
    json.dump(tok, open(model / "tokenizer_config.json", "w"))
    out = tmp_path / "o"
    assert quantize(str(model), out, "--calib_num", "1") == 0
    assert not marker.exists()
    assert not [f for f in os.listdir(out) if f.endswith(".py")]


def test_no_output_file_is_world_writable_even_under_umask_0(tiny_model, tmp_path):
    old = os.umask(0)
    try:
        out = tmp_path / "o"
        assert quantize(tiny_model, out, "--mindie_format", "--part_file_size", "0.0001") == 0
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(os.stat(os.path.join(root, p)).st_mode)
             for root, dirs, files in os.walk(out) for p in dirs + files}
    modes["."] = stat.S_IMODE(os.stat(out).st_mode)
    assert modes["."] == 0o750
    assert all(not m & 0o022 for m in modes.values()), modes
    assert {m for p, m in modes.items() if p.endswith(".safetensors")} == {0o400}


def test_a_symlinked_checkpoint_is_read(tiny_model, tmp_path):
    """A Hugging Face cache snapshot is a folder of links into ../../blobs: links are followed, names confined."""
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in os.listdir(tiny_model):
        shutil.copy(os.path.join(tiny_model, f), blobs / f)
        os.symlink(os.path.relpath(blobs / f, snap), snap / f)
    assert quantize(str(snap), tmp_path / "o", "--calib_num", "1") == 0
    assert struct.unpack("<Q", open(tmp_path / "o" / "quant_model_weight_w8a8.safetensors", "rb").read(8))[0] > 0
