"""Size-limited safetensors parts, written by streaming, atomically; and the small json/text files beside them.

The parts are laid out before any tensor is computed: from the list of (name, dtype, shape) in emission order,
a new part starts when the next tensor would reach the limit (a tensor larger than the limit gets a part of its
own, with a warning). Each part's header is written first; tensors are then written at their offsets as they
arrive, by whichever rank computed them, so no part is ever held whole in memory. Within a file, tensors are laid
out the way safetensors.torch.save_file lays them out (widest dtype first, then by name), so each part is
byte-identical to save_file of the same tensors.

Every file goes to a temporary name in the output directory and is renamed only once complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import struct

import torch

log = logging.getLogger(__name__)

GB = 1 << 30
TMP_SUFFIX = ".qwenvl_dq_tmp"

_ST_DTYPE = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
# safetensors' own order within a file: by dtype, widest first (its Dtype enum, descending), then name
_ST_RANK = {"I64": 9, "F64": 8, "F32": 7, "I32": 6, "BF16": 5, "F16": 4, "I16": 3, "I8": 2, "U8": 1, "BOOL": 0}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def split_parts(specs: list[TensorSpec], limit: int | None) -> list[list[TensorSpec]]:
    """Group specs (in order) into parts smaller than `limit` bytes; None -> one part.

    As msModelSlim: before adding a tensor, the part is closed if the tensor would make it reach the limit."""
    if limit is None:
        return [list(specs)]
    parts, cur, size = [], [], 0
    for s in specs:
        if s.nbytes > limit:
            log.warning("tensor %s (%d bytes) is larger than part_file_size (%d bytes): it gets a part of its own",
                        s.name, s.nbytes, limit)
        if cur and size + s.nbytes >= limit:
            parts.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += s.nbytes
    if cur:
        parts.append(cur)
    return parts


def part_names(base: str, count: int, parted: bool) -> list[str]:
    """File names: one unnumbered file when not parted; else numbered parts (even a single one)."""
    if not parted:
        return [f"{base}.safetensors"]
    return [f"{base}-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def _header(specs: list[TensorSpec], metadata: dict | None) -> tuple[bytes, dict[str, int]]:
    """Serialized safetensors header (length prefix included) and each tensor's byte offset in the data area."""
    ordered = sorted(specs, key=lambda s: (-_ST_RANK[_ST_DTYPE[s.dtype]], s.name))
    head, offsets, pos = {}, {}, 0
    if metadata:
        head["__metadata__"] = metadata
    for s in ordered:
        head[s.name] = {"dtype": _ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class PartLayout:
    """Where every planned tensor goes: the parts, their file names, headers and each tensor's byte offset. Computed
    from the specs alone, so every rank computes the same one.

    Names: msModelSlim numbers the parts whenever there is a limit (even a single part); hf_names numbers them
    only when there are several, as save_pretrained does."""

    def __init__(self, base: str, specs: list[TensorSpec], limit: int | None, metadata: dict | None = None,
                 hf_names: bool = False):
        self.specs = {s.name: s for s in specs}
        self.parts = split_parts(specs, limit)
        self.numbered = len(self.parts) > 1 if hf_names else limit is not None
        self.names = part_names(base, len(self.parts), self.numbered)
        self.headers = []
        self.where: dict[str, tuple[int, int]] = {}  # name -> (part, byte offset in its file)
        for k, part in enumerate(self.parts):
            header, offsets = _header(part, metadata)
            self.headers.append(header)
            self.where.update({n: (k, len(header) + off) for n, off in offsets.items()})

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def temporary(self, out_dir: str, k: int) -> str:
        return os.path.join(out_dir, self.names[k] + TMP_SUFFIX)

    def create(self, out_dir: str) -> None:
        """Every part under its temporary name: its header, then room for its tensors (a sparse file, filled by
        the ranks' PartFiles)."""
        for k, part in enumerate(self.parts):
            fd = os.open(self.temporary(out_dir, k), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, self.headers[k])
                os.ftruncate(fd, len(self.headers[k]) + sum(s.nbytes for s in part))
            finally:
                os.close(fd)

    def commit(self, out_dir: str, written: set[str]) -> list[str]:
        """Rename every part to its final name once every planned tensor is in `written`; returns the names."""
        missing = [n for n in self.specs if n not in written]
        if missing:
            raise RuntimeError(f"writer: {len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        for k, name in enumerate(self.names):
            os.replace(self.temporary(out_dir, k), os.path.join(out_dir, name))
        return self.names

    def abort(self, out_dir: str) -> None:
        for k in range(len(self.names)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.temporary(out_dir, k))

    def weight_map(self) -> dict[str, str]:
        return {s.name: self.names[k] for k, part in enumerate(self.parts) for s in part}


class PartFiles:
    """One process's writes into the parts PartLayout.create made: each tensor at its offset (positional writes,
    so several ranks can fill the same part), in whatever order they come. close() syncs them to disk."""

    def __init__(self, out_dir: str, layout: PartLayout):
        self.out_dir = out_dir
        self.layout = layout
        self.on_write = None  # on_write(nbytes) after each tensor, when set (a progress bar)
        self.written: set[str] = set()
        self.bytes_written = 0
        self._fds: dict[int, int] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.layout.specs.get(name)
        if spec is None or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"writer: {name} {tensor.dtype} {tuple(tensor.shape)} does not match the plan {spec}")
        if name in self.written:
            raise RuntimeError(f"writer: {name} written twice")
        k, offset = self.layout.where[name]
        if k not in self._fds:
            self._fds[k] = os.open(self.layout.temporary(self.out_dir, k), os.O_WRONLY)
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(data):
            done += os.pwrite(self._fds[k], data[done:], offset + done)
        self.written.add(name)
        self.bytes_written += len(data)
        if self.on_write is not None:
            self.on_write(len(data))

    def close(self) -> None:
        """fsync and close every part this process wrote into."""
        try:
            for fd in self._fds.values():
                os.fsync(fd)
        finally:
            self.drop()

    def drop(self) -> None:
        """Close without syncing (after a failure)."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}


class PartWriter(PartFiles):
    """PartLayout and PartFiles in one process: create the parts, write every tensor, commit() (or abort())."""

    def __init__(self, out_dir: str, base: str, specs: list[TensorSpec], limit: int | None,
                 metadata: dict | None = None, hf_names: bool = False):
        layout = PartLayout(base, specs, limit, metadata, hf_names)
        layout.create(out_dir)
        super().__init__(out_dir, layout)
        self.numbered = layout.numbered

    def commit(self) -> list[str]:
        self.close()
        return self.layout.commit(self.out_dir, self.written)

    def abort(self) -> None:
        self.drop()
        self.layout.abort(self.out_dir)

    def weight_map(self) -> dict[str, str]:
        return self.layout.weight_map()


def write_json(path: str, obj, mode: int = 0o600, indent: int = 4) -> None:
    """Write json to a temporary name, fsync, rename (so the file is whole or absent)."""
    tmp = path + TMP_SUFFIX
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
