"""Exporting the network a stage found, and loading it back.

A complete stage directory holds `model.pt`: every weight in float32 and a byte-per-weight mask.
`pab export` turns it into a file of another format, each a plugin of the `pab.exporters` group
(the built-ins: `packed`, the seed + mask bits + sign bits a PaB network is; `safetensors`; `onnx`),
and `load(path)` turns a model.pt or an exported file back into an `nn.Module`.

This module is the engine's half: where a stage's model is (`ExportSource`), the recipe that
rebuilds its architecture and initial weights (`recipe`, `build_from_recipe`), writing with a
format plugin (`export_stage`) and loading (`load`).
"""
from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import ValidationError

from . import artifacts
from .data import DataInfo
from .errors import ArtifactError, DataError, PabError, PluginError, install_command
from .modelutil import apply_masks_, build_model
from .registry import registry
from .specification import DataCall, ModelCall, PluginCall

GROUP = "pab.exporters"
RECIPE_VERSION = 1


def versions() -> dict:
    """The versions an export records (a regenerated initialisation depends on torch's)."""
    try:
        pab = version("pab")
    except PackageNotFoundError:  # a source tree that was never installed
        pab = "unknown"
    return {"pab": pab, "torch": torch.__version__.split("+")[0], "python": platform.python_version()}


# --------------------------------------------------------------------------- recipes
def resolve_call(cls: type[PluginCall], section: dict, where: str) -> PluginCall:
    """A spec section naming a plugin (`model:`, `data:`), validated by the plugin's own Params;
    an ArtifactError naming `where` when the plugin is missing or the section does not fit it."""
    try:
        call = cls.model_validate(section)
        entry = registry().get_any(call.groups(), call.name)
        call.resolve(entry, entry.Params.model_validate(call.plugin_keys()))
    except PluginError as e:
        raise ArtifactError(f"{where}: {e.message}") from None
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise ArtifactError(f"{where}: the recorded {cls.__name__[:-4].lower()} section does not validate here "
                            f"({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
    return call


def build_from_recipe(recipe: dict, where: str = "recipe") -> nn.Module:
    """The model a recipe describes, as its stage built it at the start: the architecture from
    the model plugin and its parameters, initialised from the seed (on the CPU, in eval mode)."""
    if recipe.get("version") != RECIPE_VERSION:
        raise ArtifactError(f"{where}: a model recipe of version {recipe.get('version')!r}, which this pab does not know "
                            f"(it reads version {RECIPE_VERSION}); upgrade pab")
    call = resolve_call(ModelCall, recipe["model"], where)
    info = DataInfo(num_classes=int(recipe["data_info"]["num_classes"]), input_shape=tuple(recipe["data_info"]["input_shape"]))
    return build_model(call, info, int(recipe["seed"])).eval()


# --------------------------------------------------------------------------- what a stage exports
@dataclass
class ExportSource:
    """A complete stage and the model it leaves: `state` and `masks` as model.pt holds them."""

    dir: Path
    stage_id: str
    kind: str
    experiment: str
    result: dict
    model_file: Path
    state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    recipe: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.experiment} / {self.stage_id} ({self.kind})"

    def masked_state(self) -> dict[str, torch.Tensor]:
        """The state dict with the masks applied (pruned weights exactly +0.0)."""
        out = dict(self.state)
        for n, m in self.masks.items():
            out[n] = torch.where(m, self.state[n], torch.zeros((), dtype=self.state[n].dtype))
        return out

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The weights the stage's model had at initialisation, regenerated from the recipe."""
        return build_from_recipe(self.recipe, str(self.model_file)).state_dict()

    def module(self) -> nn.Module:
        """The plain architecture with the masked weights, in eval mode."""
        return module_from(self.recipe, self.masked_state(), str(self.model_file))


def module_from(recipe: dict, state: dict, where: str) -> nn.Module:
    model = build_from_recipe(recipe, where)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{where}: the weights do not fit the recorded model {recipe['model'].get('name')!r}: "
                            f"{str(e).splitlines()[0][:300]}") from None
    return model.eval()


def _data_info(doc: dict, result: dict, where: str) -> dict:
    """The data's classes and input shape: as the stage recorded them, else from the dataset plugin."""
    if isinstance(result.get("data_info"), dict):
        return result["data_info"]
    spec = doc["spec"]
    data = resolve_call(DataCall, spec["data"], where)
    out_root = Path(where).parent.parent  # <output_dir>/<name>/<stage dir>
    try:
        info = data.plugin.info(data.params, base_dir=out_root.parent)
    except DataError as e:
        raise ArtifactError(f"{where}: the model's input shape and classes come from the data set, which is not here "
                            f"({e.message})") from None
    return {"num_classes": info.num_classes, "input_shape": list(info.input_shape)}


def stage_source(stage_dir: str | Path) -> ExportSource:
    """The model a complete stage directory leaves (an evaluate stage's: the one it evaluated)."""
    d = Path(stage_dir)
    doc = artifacts.read_stage_doc(d) if d.is_dir() else None
    if doc is None:
        raise ArtifactError(f"{d}: not a stage directory (no pab spec.yaml here); give a stage directory "
                            f"(<output_dir>/<name>/<stage>-<key>/), or an experiment or grid directory with --all")
    if not artifacts.is_complete(d):
        raise ArtifactError(f"{d}: the stage is not complete (no {artifacts.RESULT}); run its spec again to finish it, then export")
    result = artifacts.read_json(d / artifacts.RESULT)
    spec, sid = doc["spec"], doc["stage"]
    model_file = d / artifacts.MODEL
    if not model_file.is_file():
        model_file = _upstream_model(d, spec, sid)
    state, masks = artifacts.load_model_artifact(model_file)
    recipe = {"version": RECIPE_VERSION, "model": spec["model"], "seed": int(spec.get("seed", 0)),
              "data_info": _data_info(doc, result, str(d / artifacts.SPEC))}
    kind = str(spec["stages"][sid].get("kind", "?"))
    return ExportSource(d, sid, kind, str(spec.get("name", d.parent.name)), result, model_file, state, masks, recipe)


def _upstream_model(d: Path, spec: dict, sid: str) -> Path:
    """The model.pt of the stage a model-less stage (evaluate) read: the last stage of its
    `after:` that left one, found beside it by its stage id and recorded key."""
    for up in reversed(spec["stages"][sid].get("after") or []):
        for cand in sorted(d.parent.glob(f"{up}-*")):
            udoc = artifacts.read_stage_doc(cand)
            if udoc is not None and udoc.get("stage") == up and (cand / artifacts.MODEL).is_file() and udoc["spec"] == spec:
                return cand / artifacts.MODEL
    raise ArtifactError(f"{d}: stage {sid!r} leaves no {artifacts.MODEL} and the stage it read is not beside it; "
                        f"export that stage's directory instead")


def stage_sources(root: str | Path) -> list[Path]:
    """Every complete stage directory of an experiment directory, an output directory of
    experiments, or a grid directory (the stages its results.json names)."""
    root = Path(root)
    if (root / "results.json").is_file():  # a grid: its runs' stages live under their experiments
        rows = artifacts.read_json(root / "results.json").get("rows") or []
        dirs = list(dict.fromkeys(Path(d) for r in rows for d in (r.get("stages") or {}).values()))
    else:
        dirs = artifacts.stage_dirs(root, levels=2)
    return [d for d in dirs if artifacts.is_complete(d)]


# --------------------------------------------------------------------------- writing and loading
@dataclass
class Exported:
    source: ExportSource
    format: str
    path: Path
    bytes: int
    model_pt_bytes: int
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.bytes / self.model_pt_bytes if self.model_pt_bytes else float("nan")

    @property
    def density(self) -> float | None:
        return self.source.result.get("density")


def exporter(name: str):
    """The exporter plugin `name`, every hook of its contract present."""
    return registry().get(GROUP, name).plugin


def export_stage(stage_dir: str | Path, fmt: str = "packed", out: str | Path | None = None) -> Exported:
    """Write the stage's model in format `fmt` to `out` (default: `<stage dir>/model<suffix>`)."""
    plugin = exporter(fmt)
    src = stage_source(stage_dir)
    path = Path(out) if out is not None else src.dir / f"model{plugin.suffix}"
    note = plugin.write(plugin.Params(), src, path) or ""
    return Exported(src, fmt, path, path.stat().st_size, src.model_file.stat().st_size, note)


def discard_exports(stage_dir: str | Path) -> list[Path]:
    """Remove the files `pab export` wrote into a stage directory by default (`model<suffix>` of
    every installed format): called when the stage is computed again, whose new model they do not
    describe. Returns what it removed."""
    d = Path(stage_dir)
    if not any(p.name != artifacts.MODEL for p in d.glob("model.*")):  # (most stages: the exporters stay unloaded)
        return []
    gone = []
    for entry in registry().entries(GROUP).values():
        p = d / f"model{entry.plugin.suffix}"
        if p != d / artifacts.MODEL and p.is_file():
            p.unlink()
            gone.append(p)
    return gone


def packed_bytes(stage_dir: str | Path, fmt: str = "packed") -> int:
    """The size the stage's model takes in format `fmt`, encoded in memory (nothing written)."""
    plugin = exporter(fmt)
    return len(plugin.encode(plugin.Params(), stage_source(stage_dir)))


def file_sizes(stage_dir: str | Path) -> tuple[int | None, int | None]:
    """(model.pt bytes, packed bytes) of a stage: the packed file's when `pab export` wrote one
    after model.pt, else encoded in memory; None where there is none (or it cannot be made here)."""
    d = Path(stage_dir)
    pt = d / artifacts.MODEL
    if not pt.is_file():
        return None, None
    packed = d / f"model{exporter('packed').suffix}"
    if packed.is_file() and packed.stat().st_mtime >= pt.stat().st_mtime:
        return pt.stat().st_size, packed.stat().st_size
    try:
        return pt.stat().st_size, packed_bytes(d)
    except PabError:  # the model plugin is missing here, say: the table shows what it can
        return pt.stat().st_size, None


def load(path: str | Path) -> nn.Module:
    """The network a model.pt or an exported file holds, as an `nn.Module` in eval mode: the
    architecture built from the recorded spec, the masks applied. A stage directory stands for
    its model.pt. Anything that does not check out (a truncated or edited file, a version this pab
    does not know, magnitudes that do not regenerate) is an ArtifactError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = stage_source(path).model_file
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip archive: a model.pt beside its stage's spec.yaml
        src = stage_source(path.parent)
        if src.model_file.resolve() != path.resolve():
            src = _source_for(path, src)
        return src.module()
    formats = registry().entries(GROUP)
    for entry in formats.values():
        if entry.plugin.sniff(path):
            return entry.plugin.load(entry.Params(), path)
    raise ArtifactError(f"{path}: not a file pab can load (a model.pt, a stage directory, or a file `pab export` wrote in a format "
                        f"that reads back: {', '.join(n for n, e in formats.items() if e.plugin.readable)})")


def _source_for(path: Path, beside: ExportSource) -> ExportSource:
    """A model file other than the stage's model.pt (a kept epoch's weights) with the stage's recipe."""
    state, masks = artifacts.load_model_artifact(path)
    return ExportSource(beside.dir, beside.stage_id, beside.kind, beside.experiment, beside.result, path, state, masks, beside.recipe)


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PabError(f"{what} needs the {module} package, which is not installed; install it with: {install_command(extra)}") from None
