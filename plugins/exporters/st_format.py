"""`safetensors`: the state dict with the masks applied, for the Hugging Face ecosystem (and any
tool that reads safetensors); the header's metadata carries the recipe pab rebuilds the
architecture from, so `pab_framework.load` reads it back too."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from pab_framework import artifacts
from pab_framework.export import ExportSource, module_from, versions

from . import container

FORMAT = "pab.safetensors"
VERSION = 1


class SafeTensors:
    """The masked state dict as a .safetensors file (weights as float tensors, pruned entries zero)."""

    suffix = ".safetensors"
    readable = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def encode(self, params, src: ExportSource) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "recipe": container.jsonable(src.recipe), "versions": versions(),
               "masked": sorted(src.masks), "source": {"experiment": src.experiment, "stage": src.stage_id, "kind": src.kind}}
        return container.sealed({k: v.clone() for k, v in src.masked_state().items()}, doc)

    def write(self, params, src: ExportSource, path: Path) -> str:
        artifacts.atomic_write_bytes(path, self.encode(params, src))
        return f"{len(src.state)} tensors"

    def sniff(self, path: Path) -> bool:
        doc = container.read_doc(path)
        return doc is not None and doc.get("format") == FORMAT

    def load(self, params, path: Path) -> nn.Module:
        doc, tensors = container.load(path, FORMAT, (VERSION,))
        return module_from(doc["recipe"], tensors, str(path))
