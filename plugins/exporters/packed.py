"""`packed`: a PaB network as what it is, the random initialisation plus one mask bit per prunable
weight and one sign bit per surviving weight (docs/export.md describes the file).

The architecture and the initial weights are rebuilt from the recorded recipe (model plugin and
parameters, seed), so the file holds no names or shapes: the state dict's entries, in the model's
own order, are each one letter of `layout`:
- `i`: a masked weight whose survivors are the initialisation's (a prune stage, edge-popup's
  frozen weights): its mask bits only;
- `s`: a masked weight whose survivors keep the initialisation's magnitudes, their signs changed
  (Bop): its mask bits and one sign bit per survivor;
- `v`: a masked weight trained otherwise (SGD, IMP) or whose initialisation does not replay: its
  mask bits and its survivors' values;
- `d`: any other tensor (BatchNorm, biases, unmasked weights), as it is.
Mask bits, sign bits, values and dense tensors are each laid end to end in one tensor (`masks`,
`signs`, `values.<dtype>`, `dense.<dtype>`). A regenerated tensor must hash to what it hashed to
when written, else loading stops (a torch that draws other numbers, say) rather than return a
model with wrong weights; the architecture's names and shapes are checked the same way.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from pab_framework import artifacts
from pab_framework.errors import ArtifactError
from pab_framework.export import ExportSource, build_from_recipe, versions

from . import bits, container

FORMAT = "pab.packed"
VERSION = 1
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two float tensors (so -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.dtype not in _INT_OF:
        return False
    return torch.equal(a.view(_INT_OF[a.dtype]), b.view(_INT_OF[b.dtype]))


def _short(t: torch.Tensor) -> str:
    return container.tensor_digest(t)[:16]


def architecture_digest(state: dict[str, torch.Tensor]) -> str:
    """Names, shapes and dtypes of a state dict, in order: what the layout letters refer to."""
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in state.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Parts:
    """The pieces being laid end to end: bits, sign bits, values and dense tensors by dtype."""

    def __init__(self):
        self.masks: list[torch.Tensor] = []
        self.signs: list[torch.Tensor] = []
        self.values: dict[torch.dtype, list[torch.Tensor]] = {}
        self.dense: dict[torch.dtype, list[torch.Tensor]] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"masks": bits.pack(torch.cat(self.masks)) if self.masks else torch.zeros(0, dtype=torch.uint8),
               "signs": bits.pack(torch.cat(self.signs)) if self.signs else torch.zeros(0, dtype=torch.uint8)}
        for kind, table in (("values", self.values), ("dense", self.dense)):
            for dt, parts in table.items():
                out[f"{kind}.{str(dt).removeprefix('torch.')}"] = torch.cat([p.reshape(-1) for p in parts])
        return out


def _encode_masked(w: torch.Tensor, m: torch.Tensor, w0: torch.Tensor | None, parts: _Parts) -> tuple[str, str | None]:
    """One masked weight (+0.0 where pruned): its layout letter and, when regenerated, its digest."""
    parts.masks.append(m.reshape(-1))
    kept, kept0 = w[m], (w0[m] if w0 is not None and w0.shape == w.shape else None)
    if kept0 is not None and _same_bits(kept, kept0):
        return "i", _short(w)
    if kept0 is not None and _same_bits(kept.abs(), kept0.abs()):
        parts.signs.append(kept.signbit())
        return "s", _short(w)
    parts.values.setdefault(kept.dtype, []).append(kept)
    return "v", None


def encode(src: ExportSource) -> bytes:
    init = src.initial_state()
    masked = src.masked_state()
    parts, layout, digests = _Parts(), [], []
    for name, t in src.state.items():
        if name in src.masks:
            letter, digest = _encode_masked(masked[name], src.masks[name].reshape(t.shape), init.get(name), parts)
            digests += [digest] if digest else []
        else:
            letter = "d"
            parts.dense.setdefault(t.dtype, []).append(t)
        layout.append(letter)
    doc = {"format": FORMAT, "version": VERSION, "recipe": container.jsonable(src.recipe), "versions": versions(),
           "layout": "".join(layout), "architecture": architecture_digest(src.state), "regenerated": digests,
           "source": {"experiment": src.experiment, "stage": src.stage_id, "kind": src.kind, "density": src.result.get("density"),
                      "val_acc": src.result.get("val_acc")}}
    return container.sealed(parts.tensors(), doc)


class _Reader:
    """Takes the pieces back off the concatenated tensors, in layout order, and checks at the end
    that every piece was taken (a layout and tensors that disagree are refused, not guessed at)."""

    def __init__(self, tensors: dict[str, torch.Tensor], n_masked: int):
        self.flat = dict(tensors)
        self.flat["masks"] = bits.unpack(tensors["masks"], n_masked)
        self.flat["signs"] = bits.unpack(tensors["signs"], tensors["signs"].numel() * 8)  # to the last byte's padding
        self.at: dict[str, int] = {}

    def take(self, key: str, n: int) -> torch.Tensor:
        flat, a = self.flat[key], self.at.get(key, 0)
        if a + n > flat.numel():
            raise ValueError(f"{key} holds {flat.numel()} entries; the layout needs more")
        self.at[key] = a + n
        return flat[a : a + n]

    def check_all_taken(self) -> None:
        for key, flat in self.flat.items():
            left = flat.numel() - self.at.get(key, 0)
            if left >= (8 if key == "signs" else 1):
                raise ValueError(f"{key} holds {left} entries the layout does not use")


def decode_state(path: Path, doc: dict, tensors: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the file describes, on the architecture `model` (freshly initialised)."""
    init = model.state_dict()
    layout = doc["layout"]
    if architecture_digest(init) != doc.get("architecture") or len(layout) != len(init):
        raise ArtifactError(f"{path}: the recorded model {doc['recipe']['model'].get('name')!r} builds another architecture here than "
                            f"when the file was written (pab {doc.get('versions', {}).get('pab', '?')}); load it with that version")
    rd = _Reader(tensors, sum(t.numel() for t, c in zip(init.values(), layout) if c != "d"))
    state, regen = {}, iter(doc.get("regenerated") or [])
    for (name, t0), letter in zip(init.items(), layout):
        dt = str(t0.dtype).removeprefix("torch.")
        if letter == "d":
            state[name] = rd.take(f"dense.{dt}", t0.numel()).view(t0.shape).clone()
            continue
        m = rd.take("masks", t0.numel()).view(t0.shape)
        w = torch.zeros_like(t0)
        k = int(m.sum())
        if letter == "v":
            w[m] = rd.take(f"values.{dt}", k)
        else:
            kept = t0[m]
            if letter == "s":
                kept = torch.where(rd.take("signs", k), -kept.abs(), kept.abs())
            w[m] = kept
            if _short(w) != next(regen, None):
                made = doc.get("versions", {})
                raise ArtifactError(
                    f"{path}: the regenerated initial weights of {name!r} differ from those it was written with (written with torch "
                    f"{made.get('torch', '?')}, pab {made.get('pab', '?')}; this is torch {versions()['torch']}): the initialisation does "
                    f"not replay here; load it where it was written, or keep its model.pt")
        state[name] = w
    rd.check_all_taken()
    return state


def decode(path: Path) -> nn.Module:
    doc, tensors = container.load(path, FORMAT, (VERSION,))
    model = build_from_recipe(doc["recipe"], str(path))
    try:
        state = decode_state(path, doc, tensors, model)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ArtifactError(f"{path}: the file's layout does not match its tensors ({type(err).__name__}: {str(err)[:200]})") from None
    model.load_state_dict(state)
    return model.eval()


class Packed:
    """The initialisation recipe, mask bits and sign bits: the smallest lossless file of a PaB network."""

    suffix = ".pab"
    readable = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def encode(self, params, src: ExportSource) -> bytes:
        return encode(src)

    def write(self, params, src: ExportSource, path: Path) -> str:
        data = encode(src)
        artifacts.atomic_write_bytes(path, data)
        layout = container.read_doc(path, data)["layout"]
        words = {"i": "initial", "s": "sign-trained", "v": "stored"}
        return ", ".join(f"{layout.count(c)} {w}" for c, w in words.items() if layout.count(c)) + " masked weights"

    def sniff(self, path: Path) -> bool:
        doc = container.read_doc(path)
        return doc is not None and doc.get("format") == FORMAT

    def load(self, params, path: Path) -> nn.Module:
        return decode(Path(path))
