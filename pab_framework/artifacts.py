"""Files a stage writes: every one atomically (temporary name, flush, fsync, rename).

A stage directory is complete only when its `result.json` exists; it is written last.
Checkpoints and models load with `torch.load(..., weights_only=True)`: a file from a stranger
can hold tensors and plain containers, never code.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import errno

from .errors import ArtifactError, WriteError

RESULT = "result.json"
SPEC = "spec.yaml"
MODEL = "model.pt"
METRICS = "metrics.jsonl"


def kept_weights_name(epoch: int) -> str:
    """The file a train stage's `keep_weights` writes for `epoch` (0: before training)."""
    return f"model-epoch{epoch}.pt"


def _fsync_dir(path: Path) -> None:
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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
    _fsync_dir(path.parent)


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
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torch_load_safe(path: str | Path, map_location: Any = "cpu", data: bytes | None = None) -> Any:
    """Load a torch file with `weights_only=True`; any failure is one clear ArtifactError.

    `data`: the bytes to load, already read from `path` (a checkpoint's verified payload); `path`
    then only names them in messages."""
    path = Path(path)
    if data is None and not path.is_file():
        raise ArtifactError(f"{path}: file not found")
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
