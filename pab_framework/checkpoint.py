"""Checkpoint files: written so that a crash at any instant loses at most the work since the
last one, read so that a corrupted file or a file from a stranger is refused with a clear message.
What a training run puts in one, when, and how it resumes: `pab_framework.checkpointing`.

Layout of a stage directory while it trains:

    checkpoint.pt       the newest checkpoint
    checkpoint.prev.pt  the one before it, kept until the newest is safely on disk

A save writes the new checkpoint to a temporary file (flushed, fsynced), then renames
`checkpoint.pt` to `checkpoint.prev.pt`, then the temporary file to `checkpoint.pt`. A crash (or a
full disk) before the first rename leaves both old files untouched; a crash between the renames
leaves `checkpoint.prev.pt`, which `load()` falls back to.

Writing happens in the background (`Writer`): the trainer copies the state to host memory (a
few tens of milliseconds) and a thread serialises, checksums, writes, fsyncs and renames while
training goes on, one checkpoint at a time. The trainer waits for the write in flight before it
starts the next one, before it reports a stop, and before the stage finishes, so a write that
fails (a full disk) still ends the run with exit code 4 and the previous checkpoint intact; a
crash while a write is in flight loses at most that checkpoint, as above.

File format: one header line `PABCKPT1 <json>\\n` (format, stage key, sha256 and size of the
payload), then the payload, a `torch.save` of plain containers and tensors, loaded with
`weights_only=True` through `artifacts.torch_load_safe`. The checksum catches truncation and bit
rot; the key catches a checkpoint copied from another stage.

Exit codes of `pab run` (see pab_framework/cli/run.py): 0 done, 2 bad input (spec, artifact), 3 stopped by
SIGTERM/SIGINT/SIGUSR2 after writing a checkpoint (run the same command again to resume), 4 a write failed
(a full disk, say) and the previous checkpoint was kept.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import artifacts
from .errors import ArtifactError, PabError, WriteError

CURRENT = artifacts.CHECKPOINT
PREVIOUS = artifacts.CHECKPOINT_PREVIOUS
NAMES = artifacts.CHECKPOINTS
MAGIC = b"PABCKPT1 "
FORMAT = 1

EXIT_INTERRUPTED = 3
EXIT_WRITE_FAILED = 4


class Interrupted(PabError):
    """SIGTERM/SIGINT/SIGUSR2: a checkpoint was written at a step boundary; running again resumes."""

    exit_code = EXIT_INTERRUPTED


class CheckpointWriteError(WriteError):
    """Writing a checkpoint failed (a full disk, say); the previous checkpoint is intact."""

    exit_code = EXIT_WRITE_FAILED


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG a training step may draw from: torch CPU and CUDA, Python `random`, NumPy."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


# --------------------------------------------------------------------------- writing
def write_all(fd: int, data) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def encode(payload: dict, key: str) -> memoryview:
    """The file's bytes: header line and payload (one buffer, no copy of the payload made)."""
    buf = io.BytesIO()
    buf.write(b"\0" * 4096)  # room for the header, filled in below (it is far shorter)
    torch.save(payload, buf)
    view = buf.getbuffer()
    body = view[4096:]
    header = {"format": FORMAT, "key": key, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    line = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
    start = 4096 - len(line)
    view[start:4096] = line
    return view[start:]


def snapshot(obj: Any) -> Any:
    """A copy of `obj` (nested dicts, lists, tuples) whose tensors are host copies, detached from
    anything training goes on changing: what a background write may serialise at leisure.

    Device tensors are copied into pinned host memory without waiting for each copy, then the
    device is waited for once (not once per tensor)."""
    waits: set = set()

    def copy(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.device.type == "cuda":
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                waits.add(t.device)
                return host
            return t.to("cpu", copy=True)
        if isinstance(obj, dict):
            return {k: copy(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [copy(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(copy(v) for v in obj)
        return obj

    out = copy(obj)
    for dev in waits:
        torch.cuda.current_stream(dev).synchronize()  # the copies are done before anyone reads them
    return out


def save(stage_dir: str | Path, key: str, payload: dict) -> Path:
    """Write `payload` as the newest checkpoint of the stage, keeping the previous one until it is safe.

    A failed write (full disk, say) raises CheckpointWriteError and leaves the existing files as they were."""
    d = Path(stage_dir)
    d.mkdir(parents=True, exist_ok=True)
    cur, prev = d / CURRENT, d / PREVIOUS
    for stale in d.glob(f".{CURRENT}.*.tmp"):  # left by a crash in an earlier write
        try:
            stale.unlink()
        except OSError:
            pass
    data = encode(payload, key)
    try:
        fd, tmp = artifacts.create_temp(d, CURRENT)  # the mode a new file gets under the umask
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint {cur}: {artifacts.write_failure_reason(e)}") from None
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            why = artifacts.write_failure_reason(e)
            kept = [str(p) for p in (cur, prev) if p.exists()]
            raise CheckpointWriteError(
                f"cannot write checkpoint {cur}: {why}. "
                + (f"The previous checkpoint is intact ({', '.join(kept)}); free space and run again to resume from it."
                   if kept else "No earlier checkpoint exists.")
            ) from None
        raise
    try:
        if cur.exists():
            os.replace(cur, prev)
        os.replace(tmp, cur)
    except OSError as e:
        raise CheckpointWriteError(f"cannot install checkpoint {cur}: {e.strerror or e}") from None
    artifacts.fsync_dir(d)
    return cur


class Writer:
    """Writes a stage's checkpoints in a background thread, one at a time (module docstring).

    `submit` waits for the write in flight (raising its error, if it failed) and starts the next;
    `wait` waits for the write in flight and raises its error. The payload must not change while
    it is written: pass a `snapshot`."""

    THREAD = "pab-checkpoint-writer"

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, stage_dir: str | Path, key: str, payload: dict) -> Path:
        self.wait()

        def job():
            try:
                save(stage_dir, key, payload)
            except BaseException as e:  # handed to the trainer's thread by wait()
                self._error = e

        self._thread = threading.Thread(target=job, name=self.THREAD, daemon=True)
        self._thread.start()
        return Path(stage_dir) / CURRENT

    def wait(self) -> None:
        t = self._thread
        if t is not None:
            t.join()
            self._thread = None
        e, self._error = self._error, None
        if e is not None:
            raise e


# --------------------------------------------------------------------------- reading
def decode(path: Path, key: str | None) -> dict:
    """The payload of one checkpoint file, verified (format, stage key, size, checksum) and safely loaded."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None
    if not raw.startswith(MAGIC) or b"\n" not in raw[:4096]:
        raise ArtifactError(f"{path}: not a pab checkpoint (no PABCKPT1 header)")
    head, body = raw.split(b"\n", 1)
    try:
        header = json.loads(head[len(MAGIC):])
        size, digest, hkey = int(header["size"]), str(header["sha256"]), str(header["key"])
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{path}: checkpoint header is corrupted") from None
    if len(body) != size:
        raise ArtifactError(f"{path}: checkpoint is truncated or corrupted ({len(body)} bytes of payload, header says {size})")
    if hashlib.sha256(body).hexdigest() != digest:
        raise ArtifactError(f"{path}: checkpoint is corrupted (checksum mismatch)")
    if key is not None and hkey != key:
        raise ArtifactError(f"{path}: checkpoint belongs to stage key {hkey[:12]}, not this stage's {key[:12]}")
    obj = artifacts.torch_load_safe(path, data=body)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: checkpoint payload is a {type(obj).__name__}, not a mapping")
    return obj


def exists(stage_dir: str | Path) -> bool:
    return any((Path(stage_dir) / n).is_file() for n in NAMES)


def load(stage_dir: str | Path, key: str | None, warn=None) -> tuple[dict, Path] | None:
    """The newest good checkpoint of a stage and its path; None when there is none.

    A bad file is reported through `warn` (naming it) and the previous one is tried; when every
    checkpoint present is bad, ArtifactError names them all."""
    d = Path(stage_dir)
    errors = []
    for name in NAMES:
        p = d / name
        if not p.is_file():
            continue
        try:
            payload = decode(p, key)
        except ArtifactError as e:
            errors.append(e.message)
            if warn is not None:
                warn(f"{e.message}; trying the previous checkpoint")
            continue
        return payload, p
    if errors:
        raise ArtifactError("no usable checkpoint: " + "; ".join(errors) + ". Run with --restart to start this stage afresh.")
    return None


def discard(stage_dir: str | Path) -> list[Path]:
    """Remove the checkpoints (and stray temporary files) of a stage; returns what was removed."""
    d = Path(stage_dir)
    gone = []
    if not d.is_dir():
        return gone
    for p in [d / n for n in NAMES] + list(d.glob(f".{CURRENT}.*.tmp")):
        if p.exists():
            p.unlink()
            gone.append(p)
    return gone


# --------------------------------------------------------------------------- signals
class StopSignals:
    """While active, SIGTERM, SIGINT and SIGUSR2 (what a cluster sends ahead of a time limit or a
    pre-emption: SLURM's `--signal=USR2@90`, submitit's default) only set `requested`; the train
    loop checks it at every step boundary, writes a checkpoint and raises Interrupted. The same
    signal a second time acts at once; another one while the stop is under way changes nothing (a
    pre-empted SLURM job gets SIGTERM, then SIGUSR2)."""

    SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR2", None)) if s is not None)

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested == name:  # the same signal again: stop now, no checkpoint
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.requested = self.requested or name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
