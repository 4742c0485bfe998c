"""Files a stage writes: every one atomically (temporary name, flush, fsync, rename), with the
mode the user's umask gives a new file (0644 under umask 022), never a private temporary file's.

A stage directory is complete only when its `result.json` exists; it is written last.
Checkpoints and models load with `torch.load(..., weights_only=True)`: a file from a stranger
can hold tensors and plain containers, never code.
"""
from __future__ import annotations

import errno
import io
import json
import os
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .errors import ArtifactError, WriteError

RESULT = "result.json"
SPEC = "spec.yaml"
MODEL = "model.pt"
METRICS = "metrics.jsonl"
# a training stage's checkpoints while it runs (pab_framework.checkpoint writes and reads them)
CHECKPOINT = "checkpoint.pt"  # the newest
CHECKPOINT_PREVIOUS = "checkpoint.prev.pt"  # the one before it, kept until the newest is safely on disk
CHECKPOINTS = (CHECKPOINT, CHECKPOINT_PREVIOUS)


def kept_weights_name(epoch: int) -> str:
    """The file a train stage's `keep_weights` writes for `epoch` (0: before training)."""
    return f"model-epoch{epoch}.pt"


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: not every file system lets a directory be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_failure_reason(e: OSError) -> str:
    """What went wrong with a write, in words (a full disk named plainly)."""
    return "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))


def create_temp(directory: str | Path, name: str) -> tuple[int, Path]:
    """A new file `.<name>.<random>.tmp` in `directory`, open for writing: (descriptor, path).

    Created with mode 0666 less the umask, as any new file is (0644 under umask 022), so that
    renaming it over `name` gives the final file the mode a collaborator expects; `mkstemp` would
    make every artifact private (0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = Path(directory) / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 48 random bits taken: draw again
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(Path(directory) / f".{name}.*.tmp"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str | Path, write: Callable[[Any], Any]) -> None:
    """`write(f)` fills a temporary file beside `path` (f: a binary file object), which is then
    flushed, fsynced and renamed over `path`: readers see the old file or the whole new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp(path.parent, path.name)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {write_failure_reason(e)} (the previous version, if any, is intact)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path}: {write_failure_reason(e)} (the previous version, if any, is intact)") from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """The whole file, rewritten atomically: a crash never leaves a torn last line."""
    atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read JSON ({e})") from None


def torch_save_atomic(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))  # straight into the file: no copy in memory


TORCH_PICKLE_PROTOCOL = 2  # what torch.save writes, and the only protocol torch's weights_only loader expects


def pickle_protocol(src: str | Path | bytes) -> int | None:
    """The protocol of a torch file's pickle (the `data.pkl` record of a zip archive, or a bare
    pickle's first bytes); None when the file is neither."""
    try:
        if isinstance(src, bytes):
            head = src[:4]
        else:
            with open(src, "rb") as f:
                head = f.read(4)
        if head == b"PK\x03\x04":  # torch.save's zip archive: <archive>/data.pkl holds the pickle
            with zipfile.ZipFile(io.BytesIO(src) if isinstance(src, bytes) else src) as z:
                name = next((n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
                if name is None:
                    return None
                with z.open(name) as f:
                    head = f.read(2)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None
    return head[1] if len(head) >= 2 and head[0] == 0x80 else None  # PROTO opcode, then the protocol


def torch_load_safe(path: str | Path, map_location: Any = "cpu", data: bytes | None = None) -> Any:
    """Load a torch file with `weights_only=True`; any failure is one clear ArtifactError.

    A pickle of another protocol than torch.save's is refused before torch reads it: pab never
    writes one (so it is not a pab artifact), and torch's loader would warn about it.

    `data`: the bytes to load, already read from `path` (a checkpoint's verified payload); `path`
    then only names them in messages."""
    path = Path(path)
    if data is None and not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    proto = pickle_protocol(path if data is None else data)
    if proto is not None and proto != TORCH_PICKLE_PROTOCOL:
        raise ArtifactError(
            f"{path}: refused: a pickle of protocol {proto}, which torch.save does not write (it writes protocol "
            f"{TORCH_PICKLE_PROTOCOL}); only files saved by torch.save, holding tensors and plain data, are loaded"
        )
    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a safe artifact"
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise ArtifactError(
                f"{path}: refused: the file asks to run or import code ({text[:200]}); only tensors and plain data are loaded"
            ) from None
        raise ArtifactError(f"{path}: not a readable torch file ({type(e).__name__}: {text[:200]})") from None


def save_model(path: str | Path, model: torch.nn.Module, masks: dict[str, torch.Tensor], **extra: Any) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save_atomic(path, {"state_dict": state, "masks": {k: m.detach().to("cpu", torch.bool) for k, m in masks.items()}, **extra})


def load_model_artifact(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, masks) from a model.pt, checked for shape."""
    obj = torch_load_safe(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict) or not isinstance(obj.get("masks"), dict):
        raise ArtifactError(f"{path}: not a pab model artifact (expected a dict with 'state_dict' and 'masks')")
    for k, m in obj["masks"].items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ArtifactError(f"{path}: mask {k!r} is not a bool tensor")
    return obj["state_dict"], obj["masks"]


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / RESULT).is_file()


# --------------------------------------------------------------------------- what an experiment directory holds
@dataclass
class StageRecord:
    """One stage directory as found on disk."""

    dir: Path
    stage_id: str
    kind: str
    experiment: str
    result: dict | None  # result.json; None while the stage is not complete
    checkpoint: bool  # a checkpoint is there (an interrupted stage, or one running now)

    @property
    def status(self) -> str:
        if self.result is not None:
            return "complete"
        return "interrupted" if self.checkpoint else "incomplete"


def read_stage_doc(d: str | Path) -> dict | None:
    """The stage spec.yaml of directory `d` (keys `stage`, `key`, `spec`), or None when `d` holds
    none (no spec.yaml, or some other file of that name). A spec.yaml that cannot be read is an
    ArtifactError."""
    path = Path(d) / SPEC
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ArtifactError(f"{path}: cannot read the stage's spec ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict) or not isinstance(doc.get("stage"), str):
        return None  # some other spec.yaml: not a stage directory
    return doc


def read_stage_record(d: str | Path) -> StageRecord | None:
    """The stage in directory `d` (its spec.yaml, result.json and checkpoint), or None when `d`
    holds no stage spec. A spec.yaml or result.json that cannot be read is an ArtifactError."""
    d = Path(d)
    doc = read_stage_doc(d)
    if doc is None:
        return None
    spec = doc["spec"]
    stage = (spec.get("stages") or {}).get(doc["stage"]) or {}
    result = read_json(d / RESULT) if is_complete(d) else None
    return StageRecord(d, doc["stage"], str(stage.get("kind", "?")), str(spec.get("name", d.parent.name)),
                       result if isinstance(result, dict) else None, any((d / n).is_file() for n in CHECKPOINTS))


def stage_dirs(root: str | Path, *, levels: int = 1) -> list[Path]:
    """The stage directories (with a spec.yaml) at `root`, in the order they were started: `root`
    itself when it is one; else its subfolders that are (an experiment directory); with
    `levels=2`, when it has none, its subfolders' subfolders (an output directory of experiments)."""
    root = Path(root)
    if read_stage_doc(root) is not None:  # (a spec.yaml of some other kind: look below)
        return [root]
    if not root.is_dir():
        return []
    found: list[Path] = []
    parents = [root]
    for _ in range(levels):
        found = [d for p in parents for d in p.iterdir() if d.is_dir() and (d / SPEC).is_file()]
        if found:
            break
        parents = [d for p in parents for d in p.iterdir() if d.is_dir()]
    return sorted(found, key=lambda d: ((d / SPEC).stat().st_mtime, str(d)))


def experiment_stages(root: str | Path) -> list[StageRecord]:
    """The stages of an experiment directory (`<output_dir>/<name>/`: one folder per stage and
    key), in the order they were started; just `root` when it is itself a stage directory."""
    return [r for r in map(read_stage_record, stage_dirs(root)) if r is not None]
