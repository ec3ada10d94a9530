"""The output directory's life: what an existing one holds, making it ready, the INCOMPLETE marker, disk space, and a
full disk turned into one clear error.

An existing save_directory is one of:
    empty       absent, or a directory with nothing in it;
    complete    a finished quantizer output (ours or msModelSlim's: a quant_model_description*.json, or a
                compressed-tensors config.json) without INCOMPLETE;
    incomplete  a qwenvl-dq run that did not finish: INCOMPLETE, and the journal of its solved layers in .qwenvl_dq/;
    foreign     files no quantizer wrote (a home directory, a dataset): never deleted, --overwrite or not.
--overwrite replaces a complete or incomplete output; --resume continues an incomplete one, keeping its journal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil

from .errors import UserError

INCOMPLETE = "INCOMPLETE"
STATE_DIR = ".qwenvl_dq"
DESCRIPTIONS = ("quant_model_description_w8a8.json", "quant_model_description.json")
DIR_MODE, FILE_MODE = 0o750, 0o600
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

MARKER_TEXT = ("qwenvl-dq is writing this directory, or was stopped before it finished: do not use it.\n"
               "It is complete when this file is gone. Run the same command with --resume to continue from the\n"
               "layers already solved (kept in .qwenvl_dq/), or with --overwrite to start over.\n")


@dataclasses.dataclass(frozen=True)
class Existing:
    kind: str  # "empty", "complete", "incomplete" or "foreign"
    names: tuple[str, ...]  # what the directory holds, sorted


def _is_compressed_tensors(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config") or {}
        return qc.get("quant_method") == "compressed-tensors"
    except (OSError, ValueError, AttributeError):
        return False


def inspect(path: str) -> Existing:
    """What save_directory holds now."""
    if not os.path.isdir(path):
        return Existing("empty", ())
    try:
        names = tuple(sorted(os.listdir(path)))
    except OSError as e:
        raise UserError(f"save_directory: cannot list {path} ({e.strerror}); check its permissions") from None
    if not names:
        return Existing("empty", names)
    if INCOMPLETE in names or STATE_DIR in names:
        return Existing("incomplete", names)
    if any(d in names for d in DESCRIPTIONS) or _is_compressed_tensors(path):
        return Existing("complete", names)
    return Existing("foreign", names)


def check(path: str, model_path: str, overwrite: bool, resume: bool) -> Existing:
    """Refuse a save_directory this run must not write to; returns what it holds."""
    src = os.path.realpath(model_path)
    dst = os.path.realpath(path)
    if dst == src or dst.startswith(src + os.sep):
        raise UserError(f"save_directory: {path} is inside model_path {model_path}; "
                        "choose a directory outside the source model, which is never written to")
    if src.startswith(dst + os.sep):
        raise UserError(f"save_directory: {path} contains model_path {model_path}; "
                        "choose a directory that does not hold the source model")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"save_directory: {path} is a file; pass a directory")
    if overwrite and resume:
        raise UserError("resume: --resume continues an unfinished run and --overwrite starts over; pass one of them")
    got = inspect(path)
    shown = ", ".join(got.names[:4]) + (", ..." if len(got.names) > 4 else "")
    if got.kind == "foreign":
        raise UserError(f"save_directory: {path} holds files that are not a quantized output ({shown}); "
                        "qwenvl-dq never deletes those, --overwrite or not: empty it or choose another directory")
    if got.kind == "complete" and resume:
        raise UserError(f"save_directory: {path} already holds a complete output, so there is nothing to resume; "
                        "pass --overwrite to quantize again")
    if got.kind == "complete" and not overwrite:
        raise UserError(f"save_directory: {path} already holds a complete output ({shown}); "
                        "pass --overwrite to replace it, or choose another directory")
    if got.kind == "incomplete" and not (overwrite or resume):
        raise UserError(f"save_directory: {path} holds an unfinished qwenvl-dq run ({INCOMPLETE}); pass --resume to "
                        "continue it from the layers it solved, or --overwrite to start over")
    return got


def reclaimable(path: str, got: Existing, keep_state: bool) -> int:
    """Bytes prepare() will free."""
    total = 0
    for name in got.names:
        if keep_state and name == STATE_DIR:
            continue
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            for root, _, files in os.walk(full):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                             if not os.path.islink(os.path.join(root, f)))
        elif os.path.isfile(full):
            total += os.path.getsize(full)
    return total


def check_space(path: str, needed: int, reclaim: int = 0) -> None:
    """Refuse to start when the output cannot fit: needed bytes against the free space of save_directory's disk
    (plus what replacing its current content frees)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free + reclaim
    if needed > free:
        raise UserError(f"save_directory: the output needs {_size(needed)} but only {_size(free)} is free on the "
                        f"disk of {path}; free some space or choose a --save_directory on a larger disk")


def prepare(path: str, got: Existing, keep_state: bool) -> None:
    """Make save_directory ready: create it (750), or empty it (keeping the journal when resuming). The directory
    is marked INCOMPLETE before anything in it is removed, so an earlier output never looks whole while being
    replaced."""
    try:
        os.makedirs(path, exist_ok=True)
        os.chmod(path, DIR_MODE)
        mark(path)
        for desc in (*DESCRIPTIONS, "config.json"):  # the completion markers go first
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, desc))
        for name in got.names:
            full = os.path.join(path, name)
            if name == INCOMPLETE or (keep_state and name == STATE_DIR):
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            elif os.path.lexists(full):
                os.remove(full)
    except OSError as e:
        raise _disk_error(e, path, "preparing it") from None


def mark(path: str) -> None:
    fd = os.open(os.path.join(path, INCOMPLETE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(MARKER_TEXT)
    os.chmod(os.path.join(path, INCOMPLETE), FILE_MODE)


def finish(path: str) -> None:
    """The output is whole: drop the marker, then the journal (nothing is left to resume)."""
    os.remove(os.path.join(path, INCOMPLETE))
    shutil.rmtree(os.path.join(path, STATE_DIR), ignore_errors=True)


def _disk_error(e: OSError, path: str, doing: str) -> UserError:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in _FULL:
        try:
            free = _size(shutil.disk_usage(path).free)
        except OSError:
            free = "unknown"
        return UserError(f"save_directory: the disk is full ({e.strerror}) while {doing}{where}, {free} free; the "
                         f"output is left marked {INCOMPLETE} with no weight file that looks complete: free some "
                         "space and run the same command with --resume")
    return UserError(f"save_directory: cannot write to {path} while {doing}{where}: {e.strerror}; "
                     "check the directory's permissions and disk")


@contextlib.contextmanager
def disk_errors(path: str, doing: str):
    """Turn an OSError from writing into save_directory (full disk, quota, read-only, permissions) into one
    UserError that says what to do."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        ours = bool(e.filename) and os.path.realpath(str(e.filename)).startswith(os.path.realpath(path) + os.sep)
        if e.errno in _FULL or ours:
            raise _disk_error(e, path, doing) from None
        raise


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
