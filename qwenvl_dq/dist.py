"""The single seam for ranks and devices: the only module that imports torch.distributed.

Rank, world size and local rank come from the launcher's environment (torchrun / accelerate set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the backend follows the device (cpu -> gloo, cuda -> nccl, npu -> hccl after
`import torch_npu`). At world size 1 no process group is created and nothing here talks to anyone.

Every call that waits on another rank is bounded by the job's timeout (--dist_timeout, the process group's timeout)
and turns a failure into one RankLost error that names the rank that was lost. To tell a dead rank from one that
failed with its own error, every rank beats a counter in the launcher's key-value store once a second from a
thread, and writes its error there before it exits: a rank whose counter stopped without an error is the lost one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import re
import socket
import sys
import threading
import time

import torch
import torch.distributed as tdist

from .errors import RankLost, UserError

log = logging.getLogger(__name__)

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
BEAT_S = 1.0  # heartbeat period; a rank silent for 3 periods is lost
_KEY = "qwenvl_dq/"
_HEADER = 8  # int64s per tensor in a message header: dtype code, ndim, 6 dims
_MAX_TENSORS = 4
_CODES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


def _device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the npu device with torch)
        except ImportError:
            raise UserError("device_type: npu needs torch_npu, which is not installed; install the torch_npu wheel "
                            "matching your torch and CANN (pip install torch-npu==<your torch version>), "
                            "or pass --device_type cpu") from None
        if not torch.npu.is_available():
            raise UserError("device_type: npu, but torch_npu sees no NPU; "
                            "check ASCEND_RT_VISIBLE_DEVICES and the driver")
        count = torch.npu.device_count()
    elif device_type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device_type: cuda, but torch sees no GPU (torch.cuda.is_available() is False); "
                            "pass --device_type cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
    else:
        return torch.device("cpu")
    if local_rank >= count:
        ranks = f"{count} rank{'s' if count > 1 else ''}"
        raise UserError(f"device_type: local rank {local_rank} needs card {local_rank}, but only {count} "
                        f"{device_type} devices are visible; start at most {ranks} per host")
    return torch.device(device_type, local_rank)


def device_for(device_type: str) -> torch.device:
    """This process's device (card LOCAL_RANK) for a single-process tool such as evaluate."""
    return _device(device_type, int(os.environ.get("LOCAL_RANK", "0")))


def memory_budget(device: torch.device) -> int:
    """Bytes this rank may use: the card's free memory, or on cpu the host's available memory shared by the ranks
    on this host (LOCAL_WORLD_SIZE)."""
    if device.type in ("cuda", "npu"):
        return int(getattr(torch, device.type).mem_get_info(device)[0])
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return avail // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def visible_cards(device_type: str, environ=os.environ) -> int:
    """How many cards this host shows the tool: ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES when set, else
    what the device runtime counts; 0 for cpu."""
    var = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}.get(device_type)
    if var is None:
        return 0
    if environ.get(var, "").strip():
        return len([c for c in environ[var].split(",") if c.strip()])
    try:
        if device_type == "npu":
            import torch_npu  # noqa: F401
        return int(getattr(torch, device_type).device_count())
    except Exception:  # no torch_npu, no driver: dist.setup gives the clear error later
        return 0


def launch_command(device_type: str, entry: list[str], argv: list[str], environ=os.environ) -> list[str] | None:
    """The torchrun command that starts one rank per visible card, when this process was started by hand
    (no WORLD_SIZE) on a host with several cards; None when this process should run the job itself."""
    if "WORLD_SIZE" in environ:
        return None
    cards = visible_cards(device_type, environ)
    if cards <= 1:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cards),
            *entry, *argv]


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without a launcher."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise UserError(f"launcher environment: {e}; RANK, WORLD_SIZE and LOCAL_RANK must be integers "
                        "(start the ranks with torchrun, launcher/torchrun.sh or launcher/accelerate.sh)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"launcher environment: RANK={rank} WORLD_SIZE={world} is not a valid rank; "
                        "start the ranks with torchrun, launcher/torchrun.sh or launcher/accelerate.sh")
    return rank, world, local


def _short(error: BaseException) -> str:
    """The first line of a backend error without its source location and advice: 'Connection closed by peer
    [127.0.0.1]:29386'."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0].rstrip(".")


class _Heart:
    """A thread that beats this rank's counter in the launcher's store; also reads everybody's."""

    def __init__(self, rank: int, world: int, timeout_s: float):
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.where = f"{host}:{port}"
        self.rank, self.world = rank, world
        self.lock = threading.Lock()
        self.store = tdist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="qwenvl-dq-heartbeat", daemon=True)
        self.beat()
        self.thread.start()

    def reachable(self) -> bool:
        """Whether the store still answers a connection (checked first: a store call on a dead store makes c10d
        print a C++ backtrace)."""
        host, port = self.where.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return True
        except OSError:
            return False

    def beat(self) -> None:
        with self.lock:
            self.store.add(f"{_KEY}beat/{self.rank}", 1)

    def _run(self) -> None:
        while not self.stop.wait(BEAT_S):
            try:
                if not self.reachable():
                    return
                self.beat()
            except Exception:  # the store is gone: whoever waits on us will find out
                return

    def beats(self) -> list[int]:
        with self.lock:
            return [self.store.add(f"{_KEY}beat/{r}", 0) for r in range(self.world)]

    def errors(self) -> dict[int, str]:
        out = {}
        with self.lock:
            for r in range(self.world):
                key = f"{_KEY}error/{r}"
                if self.store.check([key]):
                    out[r] = self.store.get(key).decode(errors="replace")
        return out

    def post_error(self, message: str) -> None:
        with self.lock:
            self.store.set(f"{_KEY}error/{self.rank}", message)


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float = 1800.0
    heart: _Heart | None = None
    pending: dict = dataclasses.field(default_factory=dict)  # dst -> (works, tensors kept alive, what)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    # --- failures --------------------------------------------------------------------------------------------

    def diagnose(self, doing: str, peer: int | None, error: BaseException) -> RankLost:
        """The error for a failed wait: which rank was lost, from the heartbeats and the errors posted."""
        text = _short(error)
        if self.heart is None:
            return RankLost(f"rank {self.rank}: {doing} failed: {text}")
        try:
            if not self.heart.reachable():
                raise OSError
            first = self.heart.beats()
            time.sleep(3 * BEAT_S)
            second = self.heart.beats()
            errors = self.heart.errors()
        except Exception:
            who = "rank 0" if peer == 0 else "rank 0 (or the launcher)"
            return RankLost(f"lost {who}: the launcher's store at {self.heart.where} is gone; rank {self.rank} "
                            f"noticed while {doing} ({text})")
        lost = [r for r in range(self.world_size)
                if r != self.rank and first[r] == second[r] and r not in errors]
        if lost:
            return RankLost(f"lost rank {', '.join(map(str, lost))}: it stopped without reporting an error (killed, "
                            f"out of memory, or its host went down); rank {self.rank} noticed while {doing} ({text})")
        others = [f"rank {r}: {m}" for r, m in sorted(errors.items()) if r != self.rank]
        if others:
            return RankLost(f"rank {self.rank} stopped while {doing} because another rank failed: "
                            + "; ".join(others))
        if "timed out" in text.lower() or "timeout" in text.lower():
            who = "a rank" if peer is None else f"rank {peer}"
            return RankLost(f"{who} did not answer within --dist_timeout {self.timeout_s:g} s while rank "
                            f"{self.rank} was {doing}; it is alive but stuck (raise --dist_timeout if it is only "
                            "slow)")
        return RankLost(f"rank {self.rank}: {doing} failed: {text}")

    def post_error(self, message: str) -> None:
        """Tell the other ranks why this one is stopping (read by their diagnose)."""
        if self.heart is not None and self.heart.reachable():
            with contextlib.suppress(Exception):
                self.heart.post_error(message)

    @contextlib.contextmanager
    def _guard(self, doing: str, peer: int | None):
        try:
            yield
        except RankLost:
            raise
        except (RuntimeError, ValueError, OSError) as e:  # gloo/nccl/hccl raise RuntimeError subclasses
            raise self.diagnose(doing, peer, e) from None

    # --- point to point --------------------------------------------------------------------------------------

    def send(self, tensors: list[torch.Tensor], dst: int, what: str) -> None:
        """Send tensors (any dtype and shape, bit-exact) to rank dst without waiting for it to receive them;
        the previous send to dst is waited for first, so at most one message per peer is in flight."""
        if len(tensors) > _MAX_TENSORS:
            raise ValueError(f"at most {_MAX_TENSORS} tensors per message")
        self.wait_sends(dst)
        header = torch.zeros(1 + _MAX_TENSORS * _HEADER, dtype=torch.int64)
        header[0] = len(tensors)
        payload = []
        for i, t in enumerate(tensors):
            row = [_CODES.index(t.dtype), t.dim(), *t.shape] + [0] * (6 - t.dim())
            header[1 + i * _HEADER:1 + (i + 1) * _HEADER] = torch.tensor(row)
            payload.append(t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device))
        msgs = [header.to(self.device)] + payload
        with self._guard(f"sending {what} to rank {dst}", dst):
            works = [tdist.isend(m, dst) for m in msgs]
        self.pending[dst] = (works, msgs, what)

    def wait_sends(self, dst: int | None = None) -> None:
        for peer in [dst] if dst is not None else list(self.pending):
            if peer not in self.pending:
                continue
            works, _, what = self.pending.pop(peer)
            with self._guard(f"sending {what} to rank {peer}", peer):
                for w in works:
                    w.wait()

    def recv(self, src: int, what: str) -> list[torch.Tensor]:
        header = torch.zeros(1 + _MAX_TENSORS * _HEADER, dtype=torch.int64, device=self.device)
        with self._guard(f"waiting for {what} from rank {src}", src):
            tdist.recv(header, src)
            header = header.cpu()
            out = []
            for i in range(int(header[0])):
                code, ndim, *dims = header[1 + i * _HEADER:1 + (i + 1) * _HEADER].tolist()
                dtype, shape = _CODES[code], dims[:ndim]
                n = 1
                for d in shape:
                    n *= d
                buf = torch.empty(n * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8,
                                  device=self.device)
                tdist.recv(buf, src)
                out.append(buf.view(dtype).reshape(shape))
        return out

    def send_object(self, obj, dst: int, what: str) -> None:
        with self._guard(f"sending {what} to rank {dst}", dst):
            tdist.send_object_list([obj], dst, device=self.device if self.device.type != "cpu" else None)

    def recv_object(self, src: int, what: str):
        box = [None]
        with self._guard(f"waiting for {what} from rank {src}", src):
            tdist.recv_object_list(box, src, device=self.device if self.device.type != "cpu" else None)
        return box[0]

    def broadcast_object(self, obj, what: str):
        """Rank 0's obj on every rank (identity at world size 1)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        with self._guard(f"waiting for {what} from rank 0" if self.rank else f"sending {what} to every rank", 0):
            tdist.broadcast_object_list(box, 0, device=self.device if self.device.type != "cpu" else None)
        return box[0]

    def agree(self, flag: bool, what: str) -> bool:
        """Whether `flag` holds on every rank (a bounded wait for all of them)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        with self._guard(f"agreeing on {what}", None):
            tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def close(self) -> None:
        if self.heart is not None:
            self.heart.stop.set()
        if self.world_size > 1 and tdist.is_initialized():
            with contextlib.suppress(Exception):
                self.wait_sends()
            tdist.destroy_process_group()


def setup(device_type: str, timeout_s: float = 1800.0) -> Dist:
    """Read the launcher's environment, pick this rank's device and, with several ranks, join the process group."""
    rank, world, local = env_world()
    if world == 1:
        return Dist(rank, world, local, _device(device_type, local), timeout_s)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"launcher environment: WORLD_SIZE={world} but {var} is not set; start the ranks with "
                            "torchrun, launcher/torchrun.sh or launcher/accelerate.sh")
    device = _device(device_type, local)
    if device.type != "cpu":
        getattr(torch, device.type).set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        tdist.init_process_group(BACKENDS[device_type], rank=rank, world_size=world, timeout=timeout)
        heart = _Heart(rank, world, timeout_s)
    except (RuntimeError, ValueError, OSError) as e:
        raise RankLost(f"rank {rank}: could not join the other {world - 1} ranks at "
                       f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s ({e})") \
            from None
    log.debug("joined %d ranks with %s", world, BACKENDS[device_type])
    return Dist(rank, world, local, device, timeout_s, heart)
