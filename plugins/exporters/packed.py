"""`packed`: a PaB network as what it is, the random initialisation plus one mask bit per prunable
weight and one sign bit per surviving weight (docs/export.md describes the file).

For each masked weight the file holds its mask as packed bits, and then whichever of these the
weight allows, tried in order:
- `init`: its surviving entries are the initialisation's (a prune stage, edge-popup's frozen
  weights): nothing more; the values are regenerated from the recipe;
- `signs`: their magnitudes are the initialisation's and only their signs changed (Bop): one sign
  bit per surviving entry; the magnitudes are regenerated;
- `values`: anything else (SGD changed them; a model whose initialisation does not replay): the
  surviving values themselves.
Every other tensor of the state dict (BatchNorm, biases, unmasked weights) is stored as it is.
A regenerated tensor must hash to what it hashed to when written; otherwise loading stops (a
torch that draws other numbers, say) rather than return a model with wrong weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from pab_framework import artifacts
from pab_framework.errors import ArtifactError
from pab_framework.export import ExportSource, build_from_recipe, module_from, versions

from . import bits, container

FORMAT = "pab.packed"
VERSION = 1
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two float tensors (so -0.0 differs from 0.0 and NaNs compare)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.dtype not in _INT_OF:
        return False
    return torch.equal(a.view(_INT_OF[a.dtype]), b.view(_INT_OF[b.dtype]))


def _masked_entry(name: str, w: torch.Tensor, m: torch.Tensor, w0: torch.Tensor | None, tensors: dict) -> dict:
    """Encode one masked weight (already masked: +0.0 where pruned) into `tensors`; its layout entry."""
    entry = {"name": name, "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}
    tensors[f"mask/{name}"] = bits.pack(m)
    kept, kept0 = w[m], (w0[m] if w0 is not None and w0.shape == w.shape else None)
    if kept0 is not None and _same_bits(kept, kept0):
        entry["how"] = "init"
    elif kept0 is not None and _same_bits(kept.abs(), kept0.abs()):
        entry["how"] = "signs"
        tensors[f"signs/{name}"] = bits.pack(kept.signbit())
    else:
        entry["how"] = "values"
        tensors[f"values/{name}"] = kept.contiguous()
        return entry
    entry["sha256"] = container.tensor_digest(w)  # what the regenerated tensor must hash to
    return entry


def encode(src: ExportSource) -> bytes:
    init = src.initial_state()
    masked = src.masked_state()
    tensors: dict[str, torch.Tensor] = {}
    layout = []
    for name, t in src.state.items():
        if name in src.masks:
            layout.append(_masked_entry(name, masked[name], src.masks[name].reshape(t.shape), init.get(name), tensors))
        else:
            tensors[f"dense/{name}"] = t.clone()
            layout.append({"name": name, "how": "dense"})
    doc = {"format": FORMAT, "version": VERSION, "recipe": container.jsonable(src.recipe), "versions": versions(), "layout": layout,
           "source": {"experiment": src.experiment, "stage": src.stage_id, "kind": src.kind, "density": src.result.get("density"),
                      "val_acc": src.result.get("val_acc")}}
    return container.sealed(tensors, doc)


def _rebuild(e: dict, tensors: dict, init: dict, where: Path, doc: dict) -> torch.Tensor:
    name, shape = e["name"], tuple(e["shape"])
    dtype = getattr(torch, e["dtype"])
    n = 1
    for s in shape:
        n *= s
    m = bits.unpack(tensors[f"mask/{name}"], n).view(shape)
    w = torch.zeros(shape, dtype=dtype)
    if e["how"] == "values":
        w[m] = tensors[f"values/{name}"]
        return w
    w0 = init.get(name)
    if w0 is None or tuple(w0.shape) != shape or w0.dtype != dtype:
        raise ArtifactError(f"{where}: the recorded model no longer has a {e['dtype']} weight {name!r} of shape {list(shape)} to regenerate")
    kept = w0[m]
    if e["how"] == "signs":
        neg = bits.unpack(tensors[f"signs/{name}"], int(m.sum()))
        kept = torch.where(neg, -kept.abs(), kept.abs())
    w[m] = kept
    if container.tensor_digest(w) != e["sha256"]:
        made = doc.get("versions", {})
        raise ArtifactError(
            f"{where}: the regenerated initial weights of {name!r} differ from those it was written with (written with torch "
            f"{made.get('torch', '?')}, pab {made.get('pab', '?')}; this is torch {versions()['torch']}): the initialisation does not "
            f"replay here; load it where it was written, or export it with stored values there")
    return w


def decode(path: Path) -> nn.Module:
    doc, tensors = container.load(path, FORMAT, (VERSION,))
    recipe = doc["recipe"]
    layout = doc.get("layout") or []
    init = build_from_recipe(recipe, str(path)).state_dict() if any(e.get("how") in ("init", "signs") for e in layout) else {}
    state = {}
    try:
        for e in layout:
            state[e["name"]] = tensors[f"dense/{e['name']}"] if e["how"] == "dense" else _rebuild(e, tensors, init, path, doc)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise ArtifactError(f"{path}: the file's layout does not match its tensors ({type(err).__name__}: {str(err)[:200]})") from None
    return module_from(recipe, state, str(path))


class Packed:
    """The initialisation recipe, mask bits and sign bits: the smallest lossless file of a PaB network."""

    suffix = ".pab"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def encode(self, params, src: ExportSource) -> bytes:
        return encode(src)

    def write(self, params, src: ExportSource, path: Path) -> str:
        data = encode(src)
        artifacts.atomic_write_bytes(path, data)
        hows = [e.get("how") for e in container.read_doc(path, data)["layout"] if e.get("how") != "dense"]
        return ", ".join(f"{hows.count(h)} {h}" for h in ("init", "signs", "values") if hows.count(h))

    def sniff(self, path: Path) -> bool:
        doc = container.read_doc(path)
        return doc is not None and doc.get("format") == FORMAT

    def load(self, params, path: Path) -> nn.Module:
        return decode(Path(path))
