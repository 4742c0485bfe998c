"""The safetensors container the `packed` and `safetensors` formats share: tensors plus one JSON
document in the header's metadata, read back with every failure named (no pickle anywhere)."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save

from pab_framework.errors import ArtifactError

HEADER_LIMIT = 100 << 20  # a header larger than this is not one pab wrote


def encode(tensors: dict[str, torch.Tensor], doc: dict) -> bytes:
    """The file's bytes: `tensors` (contiguous, unshared) and `doc` under the metadata key `pab`."""
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"pab": json.dumps(doc, sort_keys=True)})


def read_doc(path: str | Path, data: bytes | None = None) -> dict | None:
    """The pab document of a safetensors file, or None when the file is not one (or holds none)."""
    try:
        if data is None:
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                raw = f.read(n) if 0 < n <= HEADER_LIMIT else b""
        else:
            n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
            raw = data[8 : 8 + n] if 0 < n <= HEADER_LIMIT else b""
        if len(raw) != n:
            return None
        header = json.loads(raw)
        doc = json.loads((header.get("__metadata__") or {}).get("pab", "null"))
    except (OSError, ValueError, struct.error, AttributeError):
        return None
    return doc if isinstance(doc, dict) else None


def load(path: str | Path, fmt: str, versions: tuple[int, ...]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(document, tensors) of a pab file of format `fmt`, checked: the format and its version
    known, every byte there (a truncated file is refused) and the content hash matching."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from None
    doc = read_doc(path, data)
    if doc is None or doc.get("format") != fmt:
        raise ArtifactError(f"{path}: not a pab {fmt} file (its header holds no pab {fmt} document; truncated or not written by pab export)")
    if doc.get("version") not in versions:
        raise ArtifactError(f"{path}: a {fmt} file of version {doc.get('version')!r}, which this pab does not read "
                            f"(it reads {', '.join(map(str, versions))}); it was written by pab {doc.get('versions', {}).get('pab', '?')}")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors reports a short or malformed file in its own words
        raise ArtifactError(f"{path}: the file is damaged or truncated ({str(e).splitlines()[0][:200]})") from None
    if content_hash(tensors, doc) != doc.get("content_sha256"):
        raise ArtifactError(f"{path}: its contents do not match the checksum it was written with (the file was edited or damaged)")
    return doc, tensors


def content_hash(tensors: dict[str, torch.Tensor], doc: dict) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes, in name order) and of the document itself
    (without this hash): an edit to any of them shows."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in doc.items() if k != "content_sha256"}, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (CPU, contiguous)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def sealed(tensors: dict[str, torch.Tensor], doc: dict) -> bytes:
    """`encode` with the document's content hash filled in."""
    doc = dict(doc)
    doc["content_sha256"] = content_hash(tensors, doc)
    return encode(tensors, doc)


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))
