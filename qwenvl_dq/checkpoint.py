"""Lazy, read-only view of a model's safetensors: header listing first, then one tensor at a time.

Reads model.safetensors.index.json (or a single model.safetensors; in a quantized output, its one index or
its one safetensors file). Opening a shard reads only its header;
tensors are read one at a time, so memory never scales with the checkpoint.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from .errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: str, role: str = "model_path") -> tuple[dict, int]:
    """The JSON header of one safetensors file, {name: {"dtype", "shape", "data_offsets"}}, checked as strictly as
    the safetensors library checks it (every entry well formed, the tensors tiling the data area exactly), and the
    file offset where the tensor data starts."""
    def bad(why: str) -> UserError:
        return UserError(f"{role}: {path} is not a valid safetensors file ({why}); the shard is corrupt, "
                         "re-download it")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{role}: {path} is not a readable safetensors file ({e}); "
                        "re-download this shard") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("its __metadata__ is not a map of strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            raise bad(f"tensor {name!r} has no known dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}")
        count = 1
        for d in shape:
            count *= d
        begin, stop = offsets
        if stop - begin != count * torch.empty(0, dtype=DTYPES[info["dtype"]]).element_size():
            raise bad(f"tensor {name!r} has {stop - begin} bytes for shape {shape}")
        spans.append((begin, stop, name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise bad(f"tensor {name!r} starts at data byte {begin}, where {end} was expected: tensors overlap "
                      "or leave a gap")
        end = stop
    if 8 + n + end > size:
        raise UserError(f"{role}: {path} is truncated ({size} bytes, its header needs {8 + n + end}); "
                        "re-download this shard")
    if 8 + n + end < size:
        raise bad(f"{size - 8 - n - end} bytes follow its last tensor")
    return header, 8 + n


class Checkpoint:
    """Name -> (file, dtype, shape) for every tensor of a model directory; get(name) reads one tensor.

    Tensors are read with plain positional reads into fresh memory, not through a memory map, so the process holds
    only the tensors it is using (a long-lived map would keep every page it touched resident)."""

    def __init__(self, model_path: str, role: str = "model_path"):
        """role: the flag named in error messages."""
        self.model_path = model_path
        self.role = role
        index = os.path.join(model_path, INDEX)
        single = os.path.join(model_path, SINGLE)
        if not os.path.isfile(index) and not os.path.isfile(single):
            index, single = self._other_layout(model_path, index, single)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                raise UserError(f"{role}: cannot read {index} ({type(e).__name__}: {e}); restore the index file") \
                    from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{role}: {index} has no weight_map of tensor names to file names; "
                                "restore the index file")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = [os.path.basename(single)]
        else:
            bins = [n for n in os.listdir(model_path) if n.endswith(".bin")]
            hint = (" (it holds only PyTorch .bin weights: convert them to safetensors first, e.g. "
                    "model.save_pretrained(dir, safe_serialization=True))" if bins else "")
            raise UserError(f"{role}: {model_path} has no {INDEX} or {SINGLE}{hint}")
        self.files = files
        # name -> (file, dtype, shape, absolute byte offset, byte length)
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        for fname in files:
            header, data_start = read_header(self._path(fname), role)
            for name, info in header.items():
                if name in self.entries:
                    raise UserError(f"{role}: tensor {name!r} is in both {self.entries[name][0]} and {fname}; "
                                    "the shards are from different downloads, re-download them")
                begin, stop = info["data_offsets"]
                self.entries[name] = (fname, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin,
                                      stop - begin)
        self._fds: dict[str, int] = {}
        self.bytes_read = 0
        self.opened: list[str] = []  # names of the tensors read so far (get or rows), in order, for accounting

    @staticmethod
    def _other_layout(model_path: str, index: str, single: str) -> tuple[str, str]:
        """A directory written by a quantizer (quant_model_weight_w8a8.safetensors or its numbered parts and
        index): its one *.safetensors.index.json, else its one *.safetensors file."""
        try:
            names = sorted(os.listdir(model_path))
        except OSError:
            return index, single
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        files = [n for n in names if n.endswith(".safetensors")]
        if len(indexes) == 1:
            return os.path.join(model_path, indexes[0]), single
        if not indexes and len(files) == 1:
            return index, os.path.join(model_path, files[0])
        return index, single

    def _path(self, fname: str) -> str:
        if not fname or "\0" in fname:
            raise UserError(f"{self.role}: the index names the file {fname!r}, which is not a file name; "
                            "restore the index file")
        # confined by name, not by where a link points: a Hugging Face cache snapshot is a folder of links to blobs
        if os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/"):
            raise UserError(f"{self.role}: the index names {fname!r}, which lies outside {self.model_path}; "
                            "restore the index file")
        path = os.path.join(self.model_path, fname)
        if not os.path.isfile(path):
            raise UserError(f"{self.role}: the index names {fname}, which is missing from {self.model_path}; "
                            "download the missing shard")
        return path

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def nbytes(self, name: str) -> int:
        return self.entries[name][4]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _read(self, fname: str, offset: int, length: int) -> torch.Tensor:
        fd = self._fds.get(fname)
        if fd is None:
            fd = self._fds[fname] = os.open(self._path(fname), os.O_RDONLY)
        buf = torch.empty(length, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise UserError(f"{self.role}: {fname} ended early while reading it; the shard is truncated")
            done += n
        self.bytes_read += length
        return buf

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, in memory of its own."""
        if name not in self.entries:
            raise UserError(f"{self.role}: tensor {name!r} is missing from {self.model_path}; "
                            "the checkpoint does not match its config.json")
        fname, dtype, shape, offset, length = self.entries[name]
        self.opened.append(name)
        return self._read(fname, offset, length).view(dtype).reshape(shape)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor (an embedding table), reading only those rows. ids: [n] -> [n, cols]."""
        fname, dtype, shape, offset, _ = self.entries[name]
        self.opened.append(name)
        row = shape[1] * torch.empty(0, dtype=dtype).element_size()
        uniq, inverse = torch.unique(ids, return_inverse=True)
        got = torch.stack([self._read(fname, offset + int(i) * row, row).view(dtype) for i in uniq])
        return got[inverse]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
