import os

import torch
from safetensors.torch import load_file, save_file

from qwenvl_dq.writer import PartWriter, TensorSpec, split_parts


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randint(-127, 127, (8, 16), generator=g, dtype=torch.int8),
        "b.deq_scale": torch.rand(8, generator=g),
        "a.quant_bias": torch.randint(-1000, 1000, (8,), generator=g, dtype=torch.int32),
        "a.weight_scale": torch.rand(8, 1, generator=g).to(torch.bfloat16),
        "c.bits": torch.randint(0, 1 << 30, (4,), generator=g, dtype=torch.int64),
        "c.half": torch.rand(3, generator=g).to(torch.float16),
    }


def test_single_part_is_byte_identical_to_safetensors_save_file(tmp_path):
    t = _tensors()
    specs = [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in t.items()]
    w = PartWriter(str(tmp_path), "w", specs, None)
    for n in reversed(list(t)):  # any arrival order
        w.write(n, t[n])
    assert w.commit() == ["w.safetensors"]
    save_file(t, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "w.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not [f for f in os.listdir(tmp_path) if f.endswith("_tmp")]


def test_parts_respect_limit_and_a_big_tensor_stands_alone(tmp_path, caplog):
    specs = [TensorSpec("t0", torch.int8, (40,)), TensorSpec("t1", torch.int8, (50,)),
             TensorSpec("big", torch.int8, (300,)), TensorSpec("t2", torch.int8, (60,)),
             TensorSpec("t3", torch.int8, (39,))]
    parts = split_parts(specs, 100)
    assert [[s.name for s in p] for p in parts] == [["t0", "t1"], ["big"], ["t2", "t3"]]
    assert "big" in caplog.text and "larger than part_file_size" in caplog.text
    # a part never reaches the limit: 60 + 40 == 100 starts a new part
    assert [len(p) for p in split_parts([TensorSpec("a", torch.int8, (60,)), TensorSpec("b", torch.int8, (40,))],
                                        100)] == [1, 1]
    w = PartWriter(str(tmp_path), "q", specs, 100)
    for s in specs:
        w.write(s.name, torch.full(s.shape, 3, dtype=torch.int8))
    names = w.commit()
    assert names == ["q-00001-of-00003.safetensors", "q-00002-of-00003.safetensors", "q-00003-of-00003.safetensors"]
    assert set(load_file(str(tmp_path / names[2]))) == {"t2", "t3"}
    assert w.weight_map()["big"] == names[1]


def test_abort_leaves_no_files(tmp_path):
    specs = [TensorSpec("a", torch.int8, (4,)), TensorSpec("b", torch.int8, (4,))]
    w = PartWriter(str(tmp_path), "q", specs, None)
    w.write("a", torch.zeros(4, dtype=torch.int8))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_a_size_limit_numbers_even_a_single_part(tmp_path):
    specs = [TensorSpec("a", torch.int8, (4,))]
    w = PartWriter(str(tmp_path), "q", specs, 1 << 30)
    w.write("a", torch.ones(4, dtype=torch.int8))
    assert w.commit() == ["q-00001-of-00001.safetensors"]
