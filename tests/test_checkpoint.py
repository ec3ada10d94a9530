import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl_dq.checkpoint import Checkpoint
from qwenvl_dq.errors import UserError


def test_lists_headers_and_reads_tensors_like_safetensors(tiny_model):
    ck = Checkpoint(tiny_model)
    index = json.load(open(os.path.join(tiny_model, "model.safetensors.index.json")))["weight_map"]
    assert set(ck.names()) == set(index)
    assert len(ck.files) == 2
    ref = {}
    for f in sorted(set(index.values())):
        ref.update(load_file(os.path.join(tiny_model, f)))
    for name, t in ref.items():
        got = ck.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        assert ck.nbytes(name) == t.numel() * t.element_size()
    assert ck.bytes_read == sum(t.numel() * t.element_size() for t in ref.values())


def test_rows_reads_only_requested_embedding_rows(tiny_model):
    ck = Checkpoint(tiny_model)
    full = ck.get("model.embed_tokens.weight")
    before = ck.bytes_read
    ids = torch.tensor([5, 3, 5, 0, 99])
    rows = ck.rows("model.embed_tokens.weight", ids)
    assert torch.equal(rows, full[ids])
    assert ck.bytes_read - before == 4 * full.shape[1] * 2  # 4 distinct rows of bf16


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_shard_is_named(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors, which is missing"):
        Checkpoint(d)


def test_truncated_shard_is_refused(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    p = os.path.join(d, "model-00001-of-00002.safetensors")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(UserError, match="truncated"):
        Checkpoint(d)


def test_index_escaping_the_model_directory_is_refused(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    p = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(p))
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "../evil.safetensors"
    save_file({"x": torch.zeros(1)}, str(tmp_path / "evil.safetensors"))
    json.dump(idx, open(p, "w"))
    with pytest.raises(UserError, match="outside"):
        Checkpoint(d)


def test_bin_only_checkpoint_says_convert(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="only PyTorch .bin weights"):
        Checkpoint(str(tmp_path))
