"""An experiment's runs side by side: when an experiment directory holds several stages with
validation curves (the same spec run with different `--set`s, a grid's runs), one section overlays
their val_acc per epoch, each line named by what differs in the spec that made it, with a table of
their final figures."""
from __future__ import annotations

from pathlib import Path

from .. import artifacts
from .draw import compare_figure
from .page import Section, Table, slug


def compare_sections(stage_dirs: list[Path], labels: dict[Path, str]) -> list[Section]:
    """A section per experiment (parent directory) with two or more stages that recorded val_acc
    per epoch; none otherwise."""
    by_experiment: dict[Path, list[tuple[Path, dict, list[dict]]]] = {}
    for d in stage_dirs:
        rows = artifacts.read_jsonl(d / artifacts.METRICS) if (d / artifacts.METRICS).is_file() else []
        doc = artifacts.read_stage_doc(d)
        if doc is not None and any(isinstance(r.get("val_acc"), (int, float)) for r in rows):
            by_experiment.setdefault(d.parent, []).append((d, doc, rows))
    return [_section(parent, found, labels) for parent, found in by_experiment.items() if len(found) > 1]


def _name(d: Path, doc: dict, labels: dict[Path, str]) -> str:
    what = labels.get(d, "")
    return f"{doc['stage']}, {what}" if what else f"{doc['stage']} ({d.name.rsplit('-', 1)[-1]})"


def _section(parent: Path, found: list[tuple[Path, dict, list[dict]]], labels: dict[Path, str]) -> Section:
    name = str(found[0][1]["spec"].get("name", parent.name))
    sec = Section(f"{name}: {len(found)} trained stages compared", str(parent))
    runs: dict[str, list[dict]] = {}
    rows = []
    for d, doc, metrics in found:
        label = _name(d, doc, labels)
        runs[label] = metrics
        result = artifacts.read_json(d / artifacts.RESULT) if artifacts.is_complete(d) else {}
        last = next((r for r in reversed(metrics) if isinstance(r.get("val_acc"), (int, float))), {})
        rows.append([doc["stage"], labels.get(d, "") or "-", last.get("epoch"), result.get("val_acc", last.get("val_acc")),
                     max(float(r["val_acc"]) for r in metrics if isinstance(r.get("val_acc"), (int, float))),
                     result.get("density"), d.name])
    sec.figures.append(compare_figure(f"{slug(name)}_val_acc_compared", "val_acc per epoch of every trained stage", runs))
    sec.tables.append(Table(f"compare-{slug(name)}", "The trained stages", ["stage", "what differs", "epochs", "val_acc (final)",
                                                                           "val_acc (best)", "density", "directory"], rows,
                            "What differs: the values in which the specs that made the stages differ (seed, model, data and "
                            "the sections of the stage and of the stages it starts from).",
                            formats=[None, None, None, _four, _four, _four, None]))
    return sec


def _four(v) -> str:
    return f"{v:.4f}"
