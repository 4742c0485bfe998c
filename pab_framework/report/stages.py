"""A stage's section of the report: its result.json, every series it recorded (metrics.jsonl and
each per-layer `<table>.jsonl`, whatever plugin wrote them), the kept fraction of every prunable
layer (result.json `layers`, else the masks in model.pt), and what its model costs."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import artifacts
from ..errors import ArtifactError
from ..metrics import table_files
from .cost import cost_table, files_table, stage_model_cost
from .draw import sparsity_figure, training_figures
from .page import Section, Table, slug


def has_outputs(d: Path) -> bool:
    """A stage directory with something to report (its result, metrics or model)."""
    return any((d / f).is_file() for f in (artifacts.RESULT, artifacts.METRICS, artifacts.MODEL))


def read_stage_spec(d: Path) -> dict:
    doc = artifacts.read_stage_doc(d)
    if doc is None:
        raise ArtifactError(f"{d / artifacts.SPEC}: not a pab stage spec (expected keys 'stage', 'key' and 'spec')")
    return doc


def _title(d: Path, doc: dict, differs: str = "") -> str:
    """`<experiment> / <stage>[, <what differs>] (<kind>, <n> epochs), key <key12>`."""
    sid = str(doc["stage"])
    stage = (doc["spec"].get("stages") or {}).get(sid, {})
    what = [stage.get("kind", "?")]
    if isinstance(stage.get("epochs"), int):
        what.append(f"{stage['epochs']} epoch{'s' if stage['epochs'] != 1 else ''}")
    key = str(doc.get("key", ""))[:12] or d.name.rsplit("-", 1)[-1]
    return f"{doc['spec'].get('name', '?')} / {sid}{', ' + differs if differs else ''} ({', '.join(what)}), key {key}"


def same_masks_as(d: Path, doc: dict, shown: set[Path]) -> Path | None:
    """The directory of an upstream stage shown in the same report whose masks this stage's
    model.pt holds unchanged (a train stage after its prune stage), or None."""
    mine = None
    for up in (doc.get("upstream") or {}).values():
        u = (d.parent / str(up)).resolve()
        if u not in shown or not (u / artifacts.MODEL).is_file() or not (d / artifacts.MODEL).is_file():
            continue
        if mine is None:
            mine = artifacts.load_model_artifact(d / artifacts.MODEL)[1]
        theirs = artifacts.load_model_artifact(u / artifacts.MODEL)[1]
        if theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine):
            return u
    return None


def _kept_layers(result: dict | None, cost: dict | None) -> tuple[list[tuple[str, int, int]], str]:
    """(layer, kept, total) of every prunable layer and where the counts come from."""
    if result is not None and isinstance(result.get("layers"), dict):
        return [(n, int(kt[0]), int(kt[1])) for n, kt in result["layers"].items()], "result.json"
    if cost is not None:
        return [(l["name"], l["kept"], l["total"]) for l in cost["layers"]], "the masks in model.pt"
    return [], ""


def _layers_table(tag: str, layers: list[tuple[str, int, int]], src: str, cost: dict | None) -> Table:
    flops = {l["name"]: l for l in cost["layers"]} if cost else {}
    rows = []
    for n, k, t in layers:
        f = flops.get(n)
        rows.append([n, k, t, k / t if t else 1.0, f["flops"] if f else None, round(f["sparse_flops"]) if f else None])
    return Table(f"layers-{tag}", "Prunable layers", ["layer", "kept (weights)", "total (weights)", "kept fraction", "FLOPs (dense, per input)",
                                                      "FLOPs (sparse, per input)"],
                 rows, f"Kept counts from {src}; FLOPs of one input, sparse = dense x kept fraction.")


def stage_section(d: Path, differs: str = "", shown: set[Path] | None = None) -> Section:
    """A stage's section, headed by what tells it apart from the experiment's other stages of its
    id (`differs`). When its masks are those of an upstream stage among `shown` (resolved stage
    directories in the same report), the kept fractions, FLOPs and memory are not repeated."""
    doc = read_stage_spec(d)
    tag = slug(d.name)
    result = artifacts.read_json(d / artifacts.RESULT) if (d / artifacts.RESULT).is_file() else None
    sec = Section(_title(d, doc, differs), str(d))
    if doc.get("overrides"):
        sec.notes.append("Computed by a command with " + " ".join(f"--set {o}" for o in doc["overrides"]) + ".")
    if result is None:
        sec.notes.append("This stage is not complete (no result.json): what it has written so far is shown.")
    else:
        rows = [[k, v] for k, v in result.items() if not isinstance(v, (dict, list))]
        sec.tables.append(Table(f"result-{tag}", "result.json", ["key", "value"], rows))
    metrics = artifacts.read_jsonl(d / artifacts.METRICS)
    tables = {name: artifacts.read_jsonl(p) for name, p in table_files(d).items()}
    sec.figures += training_figures(tag, metrics, tables)

    same = same_masks_as(d, doc, shown or set())
    cost, why = stage_model_cost(d, doc)
    if same is not None:
        sec.notes.append(f"Its masks are those of {same.name} (its section above): the kept fraction of each layer, the FLOPs and "
                         f"the memory of the weights are as shown there; below, the sizes of this stage's own files.")
        if cost is not None:
            sec.tables.append(files_table(tag, cost))
    else:
        layers, src = _kept_layers(result, cost)
        if layers:
            sec.figures.append(sparsity_figure(tag, layers))
            sec.tables.append(_layers_table(tag, layers, src, cost))
        if cost is not None:
            sec.tables.append(cost_table(tag, cost))
    if why:
        sec.notes.append(why)
    return sec
