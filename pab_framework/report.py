"""`pab report RUN_DIR`: one self-contained HTML page (PNG figures embedded) and the PNGs beside it.

RUN_DIR is a stage directory (`runs/<name>/<stage>-<key12>/`), an experiment directory holding
stage directories, or a grid directory holding `results.json` (or `results.csv`). For each stage:

- accuracy and loss per epoch, and a curve of every other scalar in metrics.jsonl, whatever
  plugin recorded it (Bop's flips, the learning rate, PSG's kept fraction, a third party's own);
- every per-layer table the run wrote (`<table>.jsonl`: Bop's flips.jsonl, layers.jsonl, ...):
  each numeric column per epoch, one line per layer, labelled by parameter name;
- the kept fraction of every prunable layer (result.json `layers`, else the masks in model.pt);
- parameters and FLOPs, dense and after pruning, and the memory of the weights stored as
  signs + mask versus float32.

Nothing here knows a plugin's names: the series are whatever the run recorded.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward pass of a single
input through the model rebuilt from the stage's spec.yaml. Sparse FLOPs scale each Conv2d/Linear
layer's dense FLOPs by its kept fraction (what a sparse kernel would execute); every other
operation is counted as dense.

For a grid: val_acc against density, one line per combination of the other varied keys (seeds
aside), mean ± sample standard deviation over seeds, and a table of the same numbers.
Nothing here needs a network or a browser; matplotlib draws with its Agg canvas.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts
from .errors import ArtifactError, PabError
from .metrics import table_files
from .stats import number, over_seeds

GRID_FILES = ("results.json", "results.csv")
FAILED = {"failed", "error", "errored", "pending", "running", "skipped", "cancelled", "incomplete"}


# --------------------------------------------------------------------------- page pieces
@dataclass
class Figure:
    name: str  # file stem of the PNG
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Table:
    id: str
    title: str
    header: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Section:
    title: str
    subtitle: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    html: Path
    pngs: list[Path]
    sections: list[Section]


# --------------------------------------------------------------------------- drawing
def _figure(nrows: int = 1, ncols: int = 1, width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure as MplFigure  # the Agg canvas: no display, no pyplot state

    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [a for row in axes for a in row]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _epoch_axis(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, n: int) -> None:
    if n <= 16:
        ax.legend(fontsize="x-small", ncols=1 if n <= 8 else 2)


# --------------------------------------------------------------------------- formatting
def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-4):
            return f"{v:.4e}"
        return f"{v:.6g}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


# --------------------------------------------------------------------------- reading runs
def has_outputs(d: Path) -> bool:
    """A stage directory with something to report (its result, metrics or model)."""
    return any((d / f).is_file() for f in (artifacts.RESULT, artifacts.METRICS, artifacts.MODEL))


def read_stage_spec(d: Path) -> dict:
    doc = artifacts.read_stage_doc(d)
    if doc is None:
        raise ArtifactError(f"{d / artifacts.SPEC}: not a pab stage spec (expected keys 'stage', 'key' and 'spec')")
    return doc


# --------------------------------------------------------------------------- model cost
def _flops_by_module(model, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = torch.zeros((1, *input_shape))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    return int(counter.get_total_flops()), {k: int(sum(v.values())) for k, v in counts.items()}


def model_cost(model, masks: dict, input_shape: tuple[int, ...]) -> dict:
    """Parameters, FLOPs (one input) and weight memory of `model`, dense and with `masks` applied."""
    from .modelutil import prunable_parameters

    prunable = prunable_parameters(model)
    total_flops, by_module = _flops_by_module(model, input_shape)
    root = type(model).__name__
    layers = []
    for pname, w in prunable.items():
        mname = pname[: -len(".weight")] if pname.endswith(".weight") else ""
        # FlopCounterMode names modules "<RootClass>.<path>" (older torch: "<path>")
        dense = by_module.get(f"{root}.{mname}" if mname else root, by_module.get(mname, 0))
        m = masks.get(pname)
        kept = int(m.sum()) if m is not None else w.numel()
        frac = kept / w.numel() if w.numel() else 1.0
        layers.append({"name": pname, "kept": kept, "total": w.numel(), "fraction": frac, "flops": dense, "sparse_flops": dense * frac})
    n_params = sum(p.numel() for p in model.parameters())
    n_prunable = sum(l["total"] for l in layers)
    n_kept = sum(l["kept"] for l in layers)
    layer_flops = sum(l["flops"] for l in layers)
    sparse_flops = total_flops - layer_flops + sum(l["sparse_flops"] for l in layers)
    other = n_params - n_prunable  # BatchNorm, biases...: float32 in every format
    return {
        "params": n_params,
        "prunable": n_prunable,
        "kept": n_kept,
        "params_after": n_params - (n_prunable - n_kept),
        "flops": total_flops,
        "sparse_flops": sparse_flops,
        "layers": layers,
        "bytes_float32": 4 * n_params,
        "bytes_float32_sparse": 4 * (other + n_kept),
        "bytes_sign_mask_2bit": (2 * n_prunable) / 8 + 4 * other,
        "bytes_bitmap_signs": (n_prunable + n_kept) / 8 + 4 * other,
    }


def stage_model_cost(d: Path, doc: dict) -> tuple[dict | None, str]:
    """model_cost() of the stage's model.pt, rebuilt from its spec.yaml; (None, why) when it cannot be."""
    if not (d / artifacts.MODEL).is_file():
        return None, "no model.pt in this stage"
    from .modelutil import build_model
    from .spec import spec_from_dict

    try:
        spec = spec_from_dict(json.loads(json.dumps(doc["spec"])), source=str(d / artifacts.SPEC))
        info = spec.data.plugin.info(spec.data.params, base_dir=None)
        model = build_model(spec.model, info, spec.seed)
    except PabError as e:
        return None, f"the model could not be rebuilt from spec.yaml: {e}"
    state, masks = artifacts.load_model_artifact(d / artifacts.MODEL)
    note = ""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # a quantizer may have wrapped the layers; counts need only shapes and masks
        note = f"model.pt's weights do not load into the rebuilt model ({str(e).splitlines()[0][:120]}); counted from shapes and masks"
    return model_cost(model, masks, tuple(info.input_shape)), note


# --------------------------------------------------------------------------- a stage
def _col(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r.get("epoch", len(xs) + 1))
            ys.append(float(v))
    return xs, ys


# the Trainer's own columns: drawn as accuracy and loss; the others each get a curve
CURVES = ("train_acc", "val_acc", "train_loss", "val_loss")
NOT_SERIES = ("epoch", "val_n")


def _numeric_columns(rows: list[dict], skip: tuple[str, ...]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in skip and k not in cols and isinstance(v, (int, float)) and not isinstance(v, bool):
                cols.append(k)
    return cols


def _maybe_log(ax, ys: list[float]) -> None:
    pos = [y for y in ys if y > 0]
    if pos and len(pos) == len(ys) and max(pos) / min(pos) > 50:
        ax.set_yscale("log")


def training_figures(tag: str, metrics: list[dict], tables: dict[str, list[dict]]) -> list[Figure]:
    """Accuracy and loss; a small curve for every other scalar of metrics.jsonl; for every per-layer
    table, one panel per numeric column with a line per layer."""
    figs: list[Figure] = []
    if metrics:
        fig, (a1, a2) = _figure(1, 2, width=9.6)
        for ax, keys, ylabel in ((a1, ("val_acc", "train_acc"), "accuracy"), (a2, ("train_loss", "val_loss"), "loss")):
            for key in keys:
                xs, ys = _col(metrics, key)
                if ys:
                    ax.plot(xs, ys, marker="o" if key.startswith("val") == (ylabel == "accuracy") else ".",
                            linestyle="-" if key in ("val_acc", "train_loss") else "--", label=key)
            ax.set(xlabel="epoch", ylabel=ylabel, title=ylabel)
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        _epoch_axis(a1, a2)
        figs.append(Figure(f"{tag}_curves", "Accuracy and loss per epoch", _png(fig), "From metrics.jsonl."))
        others = _numeric_columns(metrics, CURVES + NOT_SERIES)
        if others:
            ncols = min(3, len(others))
            nrows = -(-len(others) // ncols)
            fig, axes = _figure(nrows, ncols, width=3.4 * ncols, height=2.6 * nrows)
            for ax, key in zip(axes, others):
                xs, ys = _col(metrics, key)
                ax.plot(xs, ys, marker=".")
                _maybe_log(ax, ys)
                ax.set(xlabel="epoch", title=key)
                ax.grid(alpha=0.3)
                _epoch_axis(ax)
            for ax in axes[len(others):]:
                ax.set_visible(False)
            figs.append(Figure(f"{tag}_scalars", "Every other figure per epoch", _png(fig),
                               f"From metrics.jsonl: {', '.join(others)}."))
    for table, rows in tables.items():
        cols = _numeric_columns(rows, ("epoch",))
        layers = list(dict.fromkeys(str(r.get("layer")) for r in rows if "layer" in r))
        if not cols or not layers:
            continue
        ncols = min(2, len(cols))
        nrows = -(-len(cols) // ncols)
        fig, axes = _figure(nrows, ncols, width=4.8 * ncols, height=3.2 * nrows + 0.12 * min(len(layers), 16))
        for ax, col in zip(axes, cols):
            for layer in layers:
                xs, ys = _col([r for r in rows if str(r.get("layer")) == layer], col)
                if ys:
                    ax.plot(xs, ys, marker=".", label=layer)
            ax.set(xlabel="epoch", title=f"{col} per layer")
            ax.grid(alpha=0.3)
            _epoch_axis(ax)
        for ax in axes[len(cols):]:
            ax.set_visible(False)
        _legend(axes[0], len(layers))
        figs.append(Figure(f"{tag}_{table}", f"Per-layer figures: {table}.jsonl", _png(fig),
                           f"From {table}.jsonl, one line per layer (by parameter name): {', '.join(cols)}."))
    return figs


def sparsity_figure(tag: str, layers: list[tuple[str, int, int]]) -> Figure:
    names = [n for n, _, _ in layers]
    fracs = [k / t if t else 1.0 for _, k, t in layers]
    fig, (ax,) = _figure(1, 1, width=max(6.4, 0.45 * len(names) + 2), height=4.2)
    bars = ax.bar(range(len(names)), fracs, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center", fontsize="x-small")
    ax.set(ylim=(0, 1.08), ylabel="kept fraction", title="Kept fraction of each prunable layer")
    if len(names) <= 24:
        ax.bar_label(bars, [f"{f:.2f}" for f in fracs], fontsize="x-small")
    kept = sum(k for _, k, _ in layers)
    total = sum(t for _, _, t in layers)
    if total:
        ax.axhline(kept / total, color="tab:red", linestyle="--", linewidth=1, label=f"overall {kept / total:.3f}")
        ax.legend(fontsize="small")
    return Figure(f"{tag}_kept", "Per-layer kept fraction", _png(fig), "Kept / total prunable weights of each Conv2d and Linear layer.")


def stage_section(d: Path) -> Section:
    doc = read_stage_spec(d)
    sid = str(doc["stage"])
    stage = (doc["spec"].get("stages") or {}).get(sid, {})
    kind = stage.get("kind", "?")
    tag = _slug(d.name)
    result = artifacts.read_json(d / artifacts.RESULT) if (d / artifacts.RESULT).is_file() else None
    what = [kind]
    if isinstance(stage.get("epochs"), int):
        what.append(f"{stage['epochs']} epoch{'s' if stage['epochs'] != 1 else ''}")
    key = str(doc.get("key", ""))[:12] or d.name.rsplit("-", 1)[-1]
    sec = Section(f"{doc['spec'].get('name', '?')} / {sid} ({', '.join(what)}), key {key}", str(d))
    if result is None:
        sec.notes.append("This stage is not complete (no result.json): what it has written so far is shown.")
    else:
        rows = [[k, v] for k, v in result.items() if not isinstance(v, (dict, list))]
        sec.tables.append(Table(f"result-{tag}", "result.json", ["key", "value"], rows))
    metrics = artifacts.read_jsonl(d / artifacts.METRICS)
    tables = {name: artifacts.read_jsonl(p) for name, p in table_files(d).items()}
    sec.figures += training_figures(tag, metrics, tables)

    cost, why = stage_model_cost(d, doc)
    if result is not None and isinstance(result.get("layers"), dict):
        layers = [(n, int(kt[0]), int(kt[1])) for n, kt in result["layers"].items()]
        src = "result.json"
    elif cost is not None:
        layers = [(l["name"], l["kept"], l["total"]) for l in cost["layers"]]
        src = "the masks in model.pt"
    else:
        layers = []
    if layers:
        sec.figures.append(sparsity_figure(tag, layers))
        flops = {l["name"]: l for l in cost["layers"]} if cost else {}
        rows = []
        for n, k, t in layers:
            f = flops.get(n)
            rows.append([n, k, t, k / t if t else 1.0, f["flops"] if f else None, round(f["sparse_flops"]) if f else None])
        sec.tables.append(Table(f"layers-{tag}", "Prunable layers", ["layer", "kept", "total", "kept fraction", "FLOPs (dense)", "FLOPs (sparse)"],
                                rows, f"Kept counts from {src}; FLOPs of one input, sparse = dense x kept fraction."))
    if cost is not None:
        sec.tables.append(cost_table(tag, cost))
    if why:
        sec.notes.append(why)
    return sec


def cost_table(tag: str, c: dict) -> Table:
    mb = c["bytes_float32"]

    def mem(label: str, b: float) -> list:
        ratio = "" if b == mb else (f", {mb / b:.1f}x smaller" if b else "")
        return [label + " (bytes)", int(math.ceil(b)), human_bytes(b) + ratio]

    rows = [
        ["parameters (all)", c["params"], ""],
        ["prunable weights (Conv2d, Linear)", c["prunable"], ""],
        ["prunable weights kept", c["kept"], f"density {c['kept'] / c['prunable']:.4f}" if c["prunable"] else ""],
        ["parameters after pruning", c["params_after"], ""],
        ["FLOPs per input, dense", c["flops"], ""],
        ["FLOPs per input, after pruning", round(c["sparse_flops"]), f"{c['flops'] / c['sparse_flops']:.2f}x fewer" if c["sparse_flops"] else ""],
        mem("weights, float32 (dense)", c["bytes_float32"]),
        mem("weights, float32 values of kept weights only", c["bytes_float32_sparse"]),
        mem("weights, 1-bit mask + 1-bit sign per prunable weight", c["bytes_sign_mask_2bit"]),
        mem("weights, mask bitmap + 1 sign bit per kept weight", c["bytes_bitmap_signs"]),
    ]
    return Table(f"cost-{tag}", "Parameters, FLOPs and memory", ["", "value", ""], rows,
                 "FLOPs by torch.utils.flop_counter.FlopCounterMode on one input (a multiply-add counts 2); after pruning, each "
                 "Conv2d/Linear layer's FLOPs are scaled by its kept fraction, other operations stay dense. Sign + mask formats "
                 "store no magnitudes: with sign-only training (Bop) they are the initialisation, regenerated from the seed; the "
                 "other parameters (BatchNorm, biases) count as float32 in every row.")


# --------------------------------------------------------------------------- a grid
RESULT_KEYS = {"run", "status", "val_acc", "density", "time_s", "stages_ran", "stages_reused", "error", "stages", "job_id"}


def read_grid_rows(d: Path) -> tuple[list[dict], list[str] | None, Path]:
    """The rows of a grid's results.json (`{"rows": [...], "varied": [...]}` or a list of rows)
    or results.csv, and the varied keys when the file names them."""
    jp, cp = d / GRID_FILES[0], d / GRID_FILES[1]
    if jp.is_file():
        data = artifacts.read_json(jp)
        rows = data.get("rows", data.get("results")) if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ArtifactError(f"{jp}: expected a list of rows (objects), got {type(rows).__name__}")
        varied = data.get("varied") if isinstance(data, dict) and isinstance(data.get("varied"), list) else None
        return rows, varied, jp
    try:
        with open(cp, newline="") as f:
            return [dict(r) for r in csv.DictReader(f)], None, cp
    except OSError as e:
        raise ArtifactError(f"{cp}: cannot read ({e})") from None


def grid_summary(rows: list[dict], varied: list[str] | None = None) -> tuple[list[dict], dict]:
    """Mean and sample std of val_acc over seeds, per density and per combination of the other
    varied keys (a line each). Returns (groups, keys used): each group has `line` (the other
    keys' values), `density`, `n`, `mean`, `std`."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if varied is None:  # keys whose values differ between rows, results aside
        varied = [k for k in keys if k not in RESULT_KEYS and len({json.dumps(r.get(k), default=str) for r in rows}) > 1]
    dk = next((k for k in varied if k.split(".")[-1] == "density"), None) or ("density" if "density" in keys else None)
    if dk is None:
        raise ArtifactError("grid results have no density column (looked for a varied *.density key and density)")
    line_keys = [k for k in varied if k not in (dk, "seed")]

    def ok(r: dict) -> bool:
        return str(r.get("status", "") or "").lower() not in FAILED and number(r.get("val_acc")) is not None and number(r.get(dk)) is not None

    good = [r for r in rows if ok(r)]
    for r in good:
        r["_x"] = number(r[dk])
    stats = over_seeds(good, [*line_keys, "_x"], ["val_acc"])
    out = [{"line": [g[k] for k in line_keys], "density": g["_x"], "n": g["ok"], "mean": g["val_acc_mean"], "std": g["val_acc_std"]}
           for g in stats]
    out.sort(key=lambda g: (json.dumps(g["line"], default=str), g["density"]))
    return out, {"lines": line_keys, "density": dk, "skipped": len(rows) - len(good)}


def _label(values: list, keys: list[str]) -> str:
    from .grid import short_names

    if not keys:
        return "all runs"
    if len(keys) == 1:
        return fmt(values[0])
    return ", ".join(f"{n}={fmt(v)}" for n, v in zip(short_names(keys), values))


def grid_section(d: Path) -> Section:
    rows, varied, src = read_grid_rows(d)
    groups, used = grid_summary(rows, varied)
    sec = Section(f"grid: {d.name}", str(src))
    if not groups:
        sec.notes.append(f"No completed rows with val_acc and density in {src.name} ({len(rows)} rows).")
        return sec
    from .grid import short_names

    fig, (ax,) = _figure(1, 1, width=7.2, height=4.6)
    lines = list(dict.fromkeys(_label(g["line"], used["lines"]) for g in groups))
    for name in lines:
        gs = [g for g in groups if _label(g["line"], used["lines"]) == name]
        xs = [g["density"] for g in gs]
        ms = [g["mean"] for g in gs]
        ss = [g["std"] for g in gs]
        line = ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=name)
        ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], alpha=0.15, color=line[0].get_color())
    dens = [g["density"] for g in groups]
    if min(dens) > 0 and max(dens) / min(dens) >= 10:
        ax.set_xscale("log")
    legend_title = ", ".join(short_names(used["lines"])) if used["lines"] else None
    ax.set(xlabel=f"density ({used['density']})", ylabel="val_acc", title="Validation accuracy against density (mean ± std over seeds)")
    ax.legend(title=legend_title, fontsize="small")
    ax.grid(alpha=0.3)
    sec.figures.append(Figure(f"grid_{_slug(d.name)}_val_acc", "val_acc against density" + (f", per {legend_title}" if legend_title else ""),
                              _png(fig), "Mean ± sample standard deviation over seeds (0 with one seed)."))
    heads = short_names(used["lines"]) if used["lines"] else []
    sec.tables.append(Table("grid", "val_acc per " + " and ".join([*heads, "density"]), [*heads, "density", "seeds", "val_acc mean", "val_acc std"],
                            [[*g["line"], g["density"], g["n"], g["mean"], g["std"]] for g in groups],
                            f"Grouped by {', '.join(used['lines']) or '(nothing else varied)'} and {used['density']}; "
                            f"{used['skipped']} row(s) without a result were left out."))
    return sec


# --------------------------------------------------------------------------- the page
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1em;margin-bottom:.3em} .sub{color:#666;font-size:.85em;font-family:monospace}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em}
td.num{text-align:right;font-variant-numeric:tabular-nums} th{background:#f4f4f4}
figure{margin:1em 0} figure img{max-width:100%} figcaption,.note{color:#555;font-size:.8em}
"""


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>", f"<p class=\"note\">Written by pab report on {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>"]
    for s in sections:
        out.append(f"<section><h2>{e(s.title)}</h2><div class=\"sub\">{e(s.subtitle)}</div>")
        for n in s.notes:
            out.append(f"<p class=\"note\">{e(n)}</p>")
        for t in s.tables:
            out.append(f"<h3>{e(t.title)}</h3><table id=\"{e(t.id)}\"><thead><tr>{''.join(f'<th>{e(h)}</th>' for h in t.header)}</tr></thead><tbody>")
            for r in t.rows:
                cells = []
                for v in r:
                    num = isinstance(v, (int, float)) and not isinstance(v, bool)
                    cells.append(f"<td class=\"num\">{e(fmt(v))}</td>" if num else f"<td>{e(fmt(v))}</td>")
                out.append(f"<tr>{''.join(cells)}</tr>")
            out.append("</tbody></table>")
            if t.note:
                out.append(f"<p class=\"note\">{e(t.note)}</p>")
        for f in s.figures:
            data = base64.b64encode(f.png).decode("ascii")
            out.append(f"<figure><img alt=\"{e(f.title)}\" src=\"data:image/png;base64,{data}\"><figcaption>{e(f.title)}. {e(f.caption)} "
                       f"({e(f.name)}.png)</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>\n")
    return "\n".join(out)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Write report.html and its PNGs into out_dir (default: run_dir)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise PabError(f"{root}: not a directory (give a run directory: runs/<name>/, one stage directory, or a grid directory)")
    sections: list[Section] = []
    if any((root / g).is_file() for g in GRID_FILES):
        sections.append(grid_section(root))
    else:
        stage_dirs = [d for d in artifacts.stage_dirs(root, levels=2) if has_outputs(d)]  # in the order they ran
        if not stage_dirs:
            raise PabError(f"{root}: no stage directories (with spec.yaml and result.json) and no grid results ({', '.join(GRID_FILES)}) here")
        sections += [stage_section(d) for d in stage_dirs]
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for s in sections:
        for f in s.figures:
            p = out / f"{f.name}.png"
            artifacts.atomic_write_bytes(p, f.png)
            pngs.append(p)
    page = out / "report.html"
    artifacts.atomic_write_text(page, render_html(f"pab report: {root.resolve().name}", sections))
    return Report(page, pngs, sections)
