"""The run's journal: what a stopped run had finished, so that --resume skips it.

    <save_directory>/.qwenvl_dq/
        fingerprint.json                    what the results depend on: the model (config.json, every shard's size
                                            and header), the calibration images (names and contents), the flags that
                                            change numbers, and the versions of qwenvl-dq, torch and transformers
        layers/<unit>.<phase>.safetensors   one vision block's or decoder layer's results, written (atomically) by
                                            the rank that solved it as soon as they are known: phase "smooth" holds
                                            its anti-outlier factors (after the search, the slow part), "final"
                                            every result of the unit (factors and activation qparams)

Results do not depend on how many ranks computed them, so a run stopped on 8 cards resumes on 4. Each layer file
carries the fingerprint's digest in its metadata and is used only under the same digest: a stale file, or one a
rank on another host left in an unshared directory, never feeds a run it does not belong to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from . import __version__
from .errors import UserError
from .outdir import FILE_MODE, STATE_DIR

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
LAYERS = "layers"
PHASES = ("smooth", "final")
_TMP = ".qwenvl_dq_tmp"
# the flags that change the numbers; the output layout (part_file_size, mindie_format, output_format) does not,
# and neither does the number of ranks
FLAGS = ("w_bit", "a_bit", "anti_method", "act_method", "act_symmetric", "prompt", "min_pixels", "max_pixels",
         "device_type")
# how calibration computes its results (calibrate.py): a journal of another scheme is not resumed; journals from
# before this entry, which lack it, were made by two sweeps
CALIBRATION = "one sweep"
_UNRECORDED = {"calibration": "two sweeps"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _header_sha(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read(8)
        (n,) = struct.unpack("<Q", raw)
        return _sha(raw + f.read(n))


def fingerprint(cfg, model_files: list[str], images: list[str]) -> dict:
    """What this run's results depend on. model_files: the checkpoint's shard names; images: the paths of the
    calibration images used, in order. Shard contents are identified by size and header (hashing 145 GB would take
    longer than most runs), images and config.json by their bytes."""
    import transformers

    model = {"config.json": _file_sha(os.path.join(cfg.model_path, "config.json"))}
    for name in model_files:
        path = os.path.join(cfg.model_path, name)
        model[name] = {"bytes": os.path.getsize(path), "header": _header_sha(path)}
    return {
        "versions": {"qwenvl_dq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "calibration": CALIBRATION},
        "model": model,
        "images": [[os.path.basename(p), _file_sha(p)] for p in images],
        "flags": {f: getattr(cfg, f) for f in FLAGS},
    }


def digest(fp: dict) -> str:
    return _sha(json.dumps(fp, sort_keys=True).encode())[:32]


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two fingerprints, in words."""
    out = []
    for k in sorted(set(old.get("flags", {})) | set(new.get("flags", {}))):
        a, b = old.get("flags", {}).get(k), new.get("flags", {}).get(k)
        if a != b:
            out.append(f"--{k} was {a!r}, now {b!r}")
    for k in sorted(set(old.get("versions", {})) | set(new.get("versions", {}))):
        a, b = (fp.get("versions", {}).get(k, _UNRECORDED.get(k)) for fp in (old, new))
        if a != b:
            out.append(f"{k} was {a}, now {b}")
    om, nm = old.get("model", {}), new.get("model", {})
    for k in sorted(set(om) | set(nm)):
        if k not in nm:
            out.append(f"model file {k} is gone")
        elif k not in om:
            out.append(f"model file {k} is new")
        elif om[k] != nm[k]:
            out.append(f"model file {k} changed")
    oi, ni = dict(map(tuple, old.get("images", []))), dict(map(tuple, new.get("images", [])))
    changed = [k for k in ni if k in oi and oi[k] != ni[k]]
    added, removed = [k for k in ni if k not in oi], [k for k in oi if k not in ni]
    for what, names in (("changed", changed), ("new", added), ("no longer used", removed)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            out.append(f"calibration image{'s' if len(names) > 1 else ''} {', '.join(names[:3])}{more} {what}")
    if not out and list(oi) != list(ni):
        out.append("the calibration images are in another order")
    return out


def state_dir(save_directory: str) -> str:
    return os.path.join(save_directory, STATE_DIR)


def check_fingerprint(save_directory: str, fp: dict) -> None:
    """Refuse to resume a run whose results were computed from something else."""
    path = os.path.join(state_dir(save_directory), FINGERPRINT)
    if not os.path.isfile(path):
        return  # stopped before it solved anything: nothing to mismatch
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"resume: cannot read {path} ({e}); pass --overwrite to start over") from None
    diff = differences(old, fp)
    if diff:
        raise UserError(f"resume: the unfinished run in {save_directory} was made from something else: "
                        f"{'; '.join(diff[:6])}; resume it with the same model, images and flags, or pass "
                        "--overwrite to start over")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + _TMP
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_fingerprint(save_directory: str, fp: dict) -> None:
    os.makedirs(state_dir(save_directory), mode=0o700, exist_ok=True)
    _write_atomic(os.path.join(state_dir(save_directory), FINGERPRINT),
                  json.dumps(fp, indent=2, sort_keys=True).encode())


class Journal:
    """One rank's view of the journal. resume=False: nothing is read, but everything solved is still written, so
    a stopped run can be resumed."""

    def __init__(self, save_directory: str, digest: str, resume: bool):
        self.dir = os.path.join(state_dir(save_directory), LAYERS)
        self.digest = digest
        self.resume = resume
        self.restored = 0

    def _path(self, unit: str, phase: str) -> str:
        return os.path.join(self.dir, f"{unit.rstrip('.')}.{phase}.safetensors")

    def load(self, unit: str, phase: str) -> dict[str, torch.Tensor] | None:
        """A unit's saved results of `phase`, or None (not resuming, not saved, or saved by another run)."""
        if not self.resume:
            return None
        path = self._path(unit, phase)
        try:
            with open(path, "rb") as f:
                data = f.read()
            (n,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8:8 + n]).get("__metadata__", {})
            tensors = load(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, struct.error, SafetensorError) as e:
            log.warning("resume: ignoring %s, which cannot be read (%s); the layer is solved again", path, e)
            return None
        if meta.get("fingerprint") != self.digest or meta.get("unit") != unit:
            return None
        self.restored += 1
        return tensors

    def save(self, unit: str, phase: str, tensors: dict[str, torch.Tensor]) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        data = save({k: v.detach().cpu().clone() for k, v in tensors.items()},  # q/k/v share one tensor
                    metadata={"fingerprint": self.digest, "unit": unit, "phase": phase})
        _write_atomic(self._path(unit, phase), data)
