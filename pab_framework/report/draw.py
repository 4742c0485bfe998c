"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state): a stage's
curves and per-layer series, its kept fractions, a grid's accuracy against density."""
from __future__ import annotations

import io

from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

from .page import Figure

# the Trainer's own columns: drawn as accuracy and loss; the others each get a curve
CURVES = ("train_acc", "val_acc", "train_loss", "val_loss")
NOT_SERIES = ("epoch", "val_n")


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 6.4, height: float = 3.6):
    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [a for row in axes for a in row]


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _epoch_axis(*axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, n: int) -> None:
    if n <= 16:
        ax.legend(fontsize="x-small", ncols=1 if n <= 8 else 2)


def _col(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r.get("epoch", len(xs) + 1))
            ys.append(float(v))
    return xs, ys


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


def _panels(n: int, ncols: int, width: float, height: float, extra: float = 0.0):
    """A grid of n panels, at most `ncols` a row; the unused ones hidden."""
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = new_figure(nrows, ncols, width=width * ncols, height=height * nrows + extra)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def curves_figure(tag: str, metrics: list[dict]) -> Figure:
    """Accuracy and loss per epoch."""
    fig, (a1, a2) = new_figure(1, 2, width=9.6)
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
    return Figure(f"{tag}_curves", "Accuracy and loss per epoch", png(fig), "From metrics.jsonl.")


def scalars_figure(tag: str, metrics: list[dict]) -> Figure | None:
    """A small curve for every other scalar of metrics.jsonl, whatever plugin recorded it."""
    others = _numeric_columns(metrics, CURVES + NOT_SERIES)
    if not others:
        return None
    fig, axes = _panels(len(others), 3, 3.4, 2.6)
    for ax, key in zip(axes, others):
        xs, ys = _col(metrics, key)
        ax.plot(xs, ys, marker=".")
        _maybe_log(ax, ys)
        ax.set(xlabel="epoch", title=key)
        ax.grid(alpha=0.3)
        _epoch_axis(ax)
    return Figure(f"{tag}_scalars", "Every other figure per epoch", png(fig), f"From metrics.jsonl: {', '.join(others)}.")


def layer_table_figure(tag: str, table: str, rows: list[dict]) -> Figure | None:
    """One panel per numeric column of a per-layer table, a line per layer (by parameter name)."""
    cols = _numeric_columns(rows, ("epoch",))
    layers = list(dict.fromkeys(str(r.get("layer")) for r in rows if "layer" in r))
    if not cols or not layers:
        return None
    fig, axes = _panels(len(cols), 2, 4.8, 3.2, extra=0.12 * min(len(layers), 16))
    for ax, col in zip(axes, cols):
        for layer in layers:
            xs, ys = _col([r for r in rows if str(r.get("layer")) == layer], col)
            if ys:
                ax.plot(xs, ys, marker=".", label=layer)
        ax.set(xlabel="epoch", title=f"{col} per layer")
        ax.grid(alpha=0.3)
        _epoch_axis(ax)
    _legend(axes[0], len(layers))
    return Figure(f"{tag}_{table}", f"Per-layer figures: {table}.jsonl", png(fig),
                  f"From {table}.jsonl, one line per layer (by parameter name): {', '.join(cols)}.")


def training_figures(tag: str, metrics: list[dict], tables: dict[str, list[dict]]) -> list[Figure]:
    """Accuracy and loss; a small curve for every other scalar of metrics.jsonl; for every per-layer
    table, one panel per numeric column with a line per layer."""
    figs = [curves_figure(tag, metrics), scalars_figure(tag, metrics)] if metrics else []
    figs += [layer_table_figure(tag, table, rows) for table, rows in tables.items()]
    return [f for f in figs if f is not None]


def sparsity_figure(tag: str, layers: list[tuple[str, int, int]]) -> Figure:
    names = [n for n, _, _ in layers]
    fracs = [k / t if t else 1.0 for _, k, t in layers]
    fig, (ax,) = new_figure(1, 1, width=max(6.4, 0.45 * len(names) + 2), height=4.2)
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
    return Figure(f"{tag}_kept", "Per-layer kept fraction", png(fig), "Kept / total prunable weights of each Conv2d and Linear layer.")


def density_figure(name: str, title: str, lines: dict[str, list[dict]], xlabel: str, legend_title: str | None) -> Figure:
    """val_acc against density, a line per entry of `lines` (its groups: density, mean, std), the
    standard deviation shaded; the density axis logarithmic when it spans a decade or more."""
    fig, (ax,) = new_figure(1, 1, width=7.2, height=4.6)
    for label, gs in lines.items():
        xs = [g["density"] for g in gs]
        ms = [g["mean"] for g in gs]
        ss = [g["std"] for g in gs]
        line = ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label)
        ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], alpha=0.15, color=line[0].get_color())
    dens = [g["density"] for gs in lines.values() for g in gs]
    if min(dens) > 0 and max(dens) / min(dens) >= 10:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="val_acc", title="Validation accuracy against density (mean ± std over seeds)")
    ax.legend(title=legend_title, fontsize="small")
    ax.grid(alpha=0.3)
    return Figure(name, title, png(fig), "Mean ± sample standard deviation over seeds (0 with one seed).")
