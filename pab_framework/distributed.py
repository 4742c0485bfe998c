"""Several processes, one experiment: DistributedDataParallel through torch's own launcher.

`pab run SPEC --nproc N` hands the command to torch's elastic launcher (`elastic_launch`, the
machinery behind `torchrun`), which starts N copies of `python -m pab_framework run SPEC`. Each copy
(and each copy `torchrun ... -m pab_framework run SPEC` starts, on one node or several) reads the
standard environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
joins the process group and drives its own device. We never start processes ourselves.

Rules every rank keeps: rank 0 writes files and draws progress; every rank computes; collectives
are entered by every rank in the same order. A rank that dies ends the job: the launcher stops the
others at once (and with `runtime.max_restarts: N` starts them all again, up to N times, each time
resuming from the checkpoint), and a rank that hangs in a collective gives up after
`runtime.dist_timeout_s`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch

from .errors import PabError, Problem, SpecError

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    """This process's place in the job, and the collectives stages need (no-ops in a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    control: Any = field(default=None, repr=False)  # a gloo group on the CPU for small agreements

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=self.control)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather_object(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.control)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce `t` in place (sum over ranks) and return it."""
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return t

    def broadcast_buffers_(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank.

        DDP broadcasts buffers at the start of each forward pass, so after the last step of an
        epoch each rank holds the statistics of its own last batch; this makes them rank 0's again.
        """
        if not self.enabled:
            return
        for b in module.buffers():
            torch.distributed.broadcast(b, src=0)


def from_env(environ: dict | None = None) -> DistInfo:
    """This process's rank and world from the launcher's environment; one process without it."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return DistInfo()
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        shown = ", ".join(f"{k}={env.get(k)!r}" for k in ENV if k in env)
        raise PabError(f"the distributed environment is not numbers: {shown}") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise PabError(f"the distributed environment is inconsistent: RANK={rank}, WORLD_SIZE={world}, "
                       f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}")
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise PabError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: start the processes with "
                       "`pab run SPEC --nproc N` or `torchrun ... -m pab_framework run SPEC`")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def under_launcher() -> bool:
    """True in a process that torchrun / elastic_launch started (it must not launch again)."""
    return "WORLD_SIZE" in os.environ


def restarted() -> bool:
    """True in a process the elastic launcher started again after one of the job's died."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def pick_device(runtime, dist: DistInfo) -> torch.device:
    want = runtime.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise PabError("runtime.device is 'cuda' but no CUDA device is available here (use 'auto' or 'cpu')")
        return torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_backend(runtime, device: torch.device) -> str:
    b = runtime.backend
    if b == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if b == "nccl" and device.type != "cuda":
        raise PabError("runtime.backend is 'nccl' but the device is the CPU: NCCL needs CUDA (use backend 'auto' or 'gloo')")
    return b


def check(spec, dist: DistInfo, device: torch.device) -> None:
    """What a spec asks that this job cannot do: problems named by their key, before any work."""
    rt = spec.runtime
    probs = []
    if dist.enabled and rt.batch_size_is == "global" and spec.data.batch_size % dist.world_size:
        n = dist.world_size
        probs.append(Problem(("data", "batch_size"), f"{spec.data.batch_size} is the global batch (runtime.batch_size_is: global) "
                             f"and does not divide among {n} processes; use a multiple of {n}, or runtime.batch_size_is: per_rank"))
    if dist.enabled and rt.sync_bn and device.type != "cuda":
        probs.append(Problem(("runtime", "sync_bn"), "synchronised BatchNorm needs CUDA devices (torch's SyncBatchNorm); "
                             "on the CPU use sync_bn: false"))
    if rt.amp == "fp16" and device.type == "cpu":
        probs.append(Problem(("runtime", "amp"), "fp16 autocast is for CUDA; on the CPU use amp: bf16 or none"))
    if dist.enabled and device.type == "cuda" and pick_backend(rt, device) == "nccl" and dist.local_world_size > torch.cuda.device_count():
        probs.append(Problem(("runtime", "nproc_per_node"), f"{dist.local_world_size} processes on this node but only "
                             f"{torch.cuda.device_count()} CUDA devices: NCCL needs one device per process"))
    if probs:
        raise SpecError([Problem(p.path, p.message, None, spec.source) for p in probs])


@contextmanager
def session(runtime, dist: DistInfo | None = None) -> Iterator[DistInfo]:
    """Join the process group for the length of a run (nothing to join in a single process)."""
    dist = dist or from_env()
    if not dist.enabled:
        yield dist
        return
    device = pick_device(runtime, dist)
    backend = pick_backend(runtime, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=runtime.dist_timeout_s)
    kw = {"device_id": device} if device.type == "cuda" else {}
    if (store := _attempt_store(dist, timeout)) is not None:
        kw["store"] = store
    torch.distributed.init_process_group(backend=backend, timeout=timeout, rank=dist.rank, world_size=dist.world_size, **kw)
    try:
        dist.backend = backend
        # small agreements (stop votes, objects) go over gloo on the CPU, beside NCCL's device traffic
        dist.control = torch.distributed.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        yield dist
    except BaseException:
        if under_launcher():  # the process ends as soon as the error is reported (pab_framework.cli.app.main): tearing the
            raise  # group down now, with a peer gone or mid-collective, can hang or abort the process
        _destroy()
        raise
    _destroy()


def _attempt_store(dist: DistInfo, timeout: timedelta):
    """Under torch's elastic agent, its store with keys of this attempt's own; None elsewhere (the
    process group's usual store). The agent serves one store for the whole job: the processes it
    starts again after one died (runtime.max_restarts) would otherwise read the addresses the dead
    attempt published there and wait on them."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), dist.world_size, is_master=False,
                                       timeout=timeout)
    return torch.distributed.PrefixStore(f"pab/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _destroy() -> None:
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # pragma: no cover - a peer already gone
        pass


class StopVote:
    """SIGTERM/SIGINT reach ranks at different steps; every rank must stop at the same step.

    At each step boundary a rank offers its own signal (0: none) to an asynchronous all-reduce
    (max) on the CPU control group and reads the outcome of the vote of the previous boundary,
    which has long finished: all ranks learn the same answer at the same step, one step late, and
    no step waits for it. `now()` votes synchronously (at an epoch's end)."""

    def __init__(self, dist: DistInfo):
        self.dist = dist
        self._pending = None
        self._flag = None

    @staticmethod
    def _code(name: str | None) -> int:
        return int(getattr(signal, name)) if name else 0

    @staticmethod
    def _name(code: int) -> str | None:
        return signal.Signals(code).name if code else None

    def _collect(self) -> str | None:
        if self._pending is None:
            return None
        self._pending.wait()
        self._pending = None
        return self._name(int(self._flag[0]))

    def poll(self, local: str | None) -> str | None:
        if not self.dist.enabled:
            return local
        decided = self._collect()
        self._flag = torch.tensor([self._code(local)], dtype=torch.int32)
        self._pending = torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX, group=self.dist.control, async_op=True)
        return decided

    def now(self, local: str | None) -> str | None:
        if not self.dist.enabled:
            return local
        earlier = self._collect()
        flag = torch.tensor([max(self._code(local), self._code(earlier))], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.dist.control)
        return self._name(int(flag[0]))


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes: equal exactly when the tensors are bitwise equal."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- launching
EXIT_PRIORITY = (2, 4, 3)  # a user's error first, then a failed write, then a signal


def lost_peer(e: BaseException) -> bool:
    """An error that only says another rank went away (its own message tells why)."""
    text = str(e)
    return isinstance(e, getattr(torch.distributed, "DistError", ())) or any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")
    )


def _quiet_elastic(debug: bool) -> None:
    level = logging.INFO if debug else logging.CRITICAL  # we say which rank failed ourselves
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(level)


def exit_code_of(failures: dict) -> tuple[int, int]:
    """(exit code, rank) of a failed launch: a rank's own pab exit code (2, 4, 3) first, then any
    other non-zero code, then a signal (as 128 + its number), SIGTERM last: that is what the
    launcher sends the other ranks once one died, so the rank a signal other than SIGTERM killed
    (an abort, SIGKILL) is the one to name."""
    codes = {int(rank): int(f.exitcode) for rank, f in failures.items()}
    for want in EXIT_PRIORITY:
        for rank in sorted(codes):
            if codes[rank] == want:
                return want, rank
    for rank in sorted(codes):
        if codes[rank] > 0:
            return codes[rank], rank
    if not codes:
        return 1, 0
    rank = min(codes, key=lambda r: (codes[r] == -signal.SIGTERM, r))
    code = codes[rank]
    return (128 - code if code < 0 else 1), rank


def launch(argv: list[str], nproc: int, *, max_restarts: int = 0, debug: bool = False, log=None, monitor_interval: float = 0.1) -> int:
    """Run `python -m pab_framework ARGV` in `nproc` processes on this node through torch's elastic
    launcher (a standalone rendezvous on localhost); returns the job's exit code. When a process
    dies, the launcher stops the others and, up to `max_restarts` times, starts them all again:
    each run of the command resumes from the stage's last checkpoint."""
    # the launcher's machinery (80 ms of imports) only in the process that launches
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _quiet_elastic(debug)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: do not let N processes each take every core
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"pab-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=monitor_interval,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "pab_framework", *argv)
    except ChildFailedError as e:
        code, rank = exit_code_of(e.failures)
        if log is not None:
            log(f"rank {rank} of {nproc} failed (exit code {code}; its message is above); the other ranks were stopped")
        return code
    except SignalException as e:
        if log is not None:
            log(f"stopped: {signal.Signals(e.sigval).name}; each rank checkpointed at its next step boundary "
                f"(exit code 3); run the same command again to resume")
        return 3
    return 0
