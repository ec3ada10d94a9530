"""200 random corruptions of a shard header and 200 of image files: every one is a clear user error (or, for an image,
a clean skip), never a traceback or a hang; a corruption that is not reported must not have changed what the
header means."""

import contextlib
import os
import random
import shutil
import signal
import struct


from conftest import CALIB
from qwenvl_dq import calib_data, cli
from qwenvl_dq.checkpoint import Checkpoint
from qwenvl_dq.errors import UserError

CASES = 200
SHARD = "model-00001-of-00002.safetensors"


@contextlib.contextmanager
def deadline(seconds):
    def hang(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mutate(data: bytes, rng: random.Random, region: int) -> bytes:
    """One random corruption within the first `region` bytes (or of the length)."""
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # a few random bytes
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(region)] = rng.randrange(256)
    elif kind == 1:  # one bit
        i = rng.randrange(region)
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 2:  # truncated
        del b[rng.randrange(min(len(b), region + 4096)):]
    elif kind == 3:  # a slice removed
        i = rng.randrange(region)
        del b[i:i + rng.randint(1, 16)]
    elif kind == 4:  # bytes inserted
        i = rng.randrange(region)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # the 8-byte header length
        n = struct.unpack("<Q", data[:8])[0]
        b[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, n * 2, rng.randrange(1 << 64)]) % (1 << 64))
    return bytes(b)


def test_corrupt_shard_headers_are_always_a_clear_error(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in os.listdir(tiny_model):
        if f != SHARD:
            os.symlink(os.path.join(tiny_model, f), model / f)
    good = open(os.path.join(tiny_model, SHARD), "rb").read()
    region = 8 + struct.unpack("<Q", good[:8])[0]
    meaning = Checkpoint(tiny_model).entries
    rng = random.Random(20261202)
    outcomes = {"error": 0, "same meaning": 0}
    for i in range(CASES):
        (model / SHARD).write_bytes(mutate(good, rng, region))
        with deadline(30):
            code = cli.main(["quantize", "--model_path", str(model), "--save_directory", str(tmp_path / "o"),
                             "--device_type", "cpu", "--dry_run"])
        captured = capsys.readouterr()
        if code == 0:  # not reported: the header must still say exactly what it said
            assert Checkpoint(str(model)).entries == meaning, i
            outcomes["same meaning"] += 1
            continue
        assert code == 2, (i, captured.err)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: model_path: ") and "Traceback" not in captured.err
        assert SHARD in lines[0] or "tensor" in lines[0], lines[0]
        outcomes["error"] += 1
    print(outcomes)
    assert outcomes["error"] > CASES * 0.9, outcomes
    assert not os.path.exists(tmp_path / "o")


def test_corrupt_images_are_skipped_by_name_or_decode(tiny_model, tmp_path, caplog):
    pre = calib_data.Preprocessor(tiny_model)
    photos = sorted(os.path.join(CALIB, f) for f in os.listdir(CALIB) if f.endswith(".jpg"))
    png = tmp_path / "photo.png"  # a second decoder: PNG chunks and CRCs
    from PIL import Image

    with Image.open(photos[0]) as im:
        im.resize((96, 72)).save(png)
    sources = [open(p, "rb").read() for p in photos] + [png.read_bytes()]
    rng = random.Random(7)
    outcomes = {"skipped": 0, "decoded": 0}
    for i in range(CASES):
        src = rng.choice(sources)
        ext = ".png" if src.startswith(b"\x89PNG") else ".jpg"
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        path = folder / f"img{i}{ext}"
        path.write_bytes(mutate(src, rng, min(len(src), 2048)))
        caplog.clear()
        try:
            with deadline(30):
                samples = calib_data.read_samples(pre, str(folder), [str(path)])
        except UserError as e:
            assert f"none of the 1 image files in {folder} could be read (img{i}{ext})" in str(e), e
            assert f"skipping {path}, it is not a readable image" in caplog.text
            outcomes["skipped"] += 1
        else:
            assert len(samples) == 1 and samples[0].pixel_values.shape[0] > 0
            outcomes["decoded"] += 1
        shutil.rmtree(folder)
    print(outcomes)
    assert outcomes["skipped"] > 20 and sum(outcomes.values()) == CASES, outcomes
