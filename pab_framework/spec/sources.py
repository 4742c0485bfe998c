"""Masks and weights a stage takes from a file (`{path: model.pt}`): the file exists, is a pab
model artifact, and its tensors have the shapes of the spec's model (built once to see)."""
from __future__ import annotations

from pathlib import Path

from .. import artifacts
from ..errors import ArtifactError, DataError
from ..modelutil import build_model
from .models import ExperimentSpec
from .problems import Found


class _ModelShapes:
    """The spec's model's tensor shapes, built on first use; None when the data it needs is missing."""

    def __init__(self, spec: ExperimentSpec):
        self.spec, self._shapes, self._built = spec, None, False

    def get(self) -> dict | None:
        if not self._built:
            self._built = True
            spec = self.spec
            try:
                info = spec.data.plugin.info(spec.data.params, base_dir=spec.base_dir)
            except DataError:  # the model's shape needs data that is missing: reported when the run starts
                return None
            self._shapes = {k: tuple(v.shape) for k, v in build_model(spec.model, info, spec.seed).state_dict().items()}
        return self._shapes


def _file_problem(spec: ExperimentSpec, path: Path, key: str, shapes: _ModelShapes) -> str | None:
    """What is wrong with the artifact at `path` as the source of `key` (masks_from, weights_from)."""
    if not path.is_file():
        return f"{path} not found (the path is relative to the spec file)"
    try:
        state, masks = artifacts.load_model_artifact(path)
    except ArtifactError as e:
        return e.message
    model_shapes = shapes.get()
    if model_shapes is None:
        return None
    table, what = (masks, "mask") if key == "masks_from" else (state, "weight")
    for name, t in table.items():
        want = model_shapes.get(name)
        if want is None or tuple(t.shape) != want:
            return (f"{path}: {what} {name!r} has shape {tuple(t.shape)}, but the model {spec.model.name!r} "
                    + (f"has {want} there" if want is not None else "has no such parameter"))
    return None


def check_source_files(spec: ExperimentSpec) -> Found:
    """A problem for every masks or weights file of the spec that cannot serve its stage."""
    problems: Found = []
    shapes = _ModelShapes(spec)
    for sid, st in spec.stages.items():
        for key, src in st.sources().items():
            if src.path is not None:
                msg = _file_problem(spec, spec.resolve_path(src.path), key, shapes)
                if msg is not None:
                    problems.append((("stages", sid, key, "path"), msg))
    return problems
