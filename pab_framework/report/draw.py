"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state): a stage's
curves and per-layer series, its kept fractions, the val_acc of an experiment's train stages
together, a grid's accuracy against density. Tick labels are plain numbers (no offset), every
axis says what it measures, and a series keeps its colour from panel to panel."""
from __future__ import annotations

import io

import matplotlib
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator, NullLocator

from ..formatting import as_written
from .page import Figure

# the Trainer's own columns: drawn as accuracy and loss; the others each get a curve
CURVES = ("train_acc", "val_acc", "train_loss", "val_loss")
NOT_SERIES = ("epoch", "val_n")


# what each figure of the trainer and the built-in plugins measures: the label of its axis
UNITS = {
    "train_acc": "accuracy (fraction correct)", "val_acc": "accuracy (fraction correct)",
    "train_loss": "loss (cross-entropy)", "val_loss": "loss (cross-entropy)",
    "epoch_s": "seconds per epoch", "lr": "learning rate", "flips": "sign flips in the epoch",
    "flip_rate": "flips per surviving weight", "sign_changed": "fraction of surviving weights",
    "surviving": "weights", "psg_kept": "fraction of gradient entries kept", "skipped_steps": "steps",
    "ar": "Bop adaptivity rate", "tau": "Bop threshold",
}
# a train figure is blue, a validation figure orange, in every panel; other series take the rest
SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange"}
SERIES_COLOURS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def axis_label(name: str) -> str:
    """`name` with what it measures, when known (`flips: sign flips in the epoch`)."""
    unit = UNITS.get(name)
    return name if unit is None or unit.startswith(name) else f"{name}: {unit}"


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 6.4, height: float = 3.6):
    """A figure of panels whose tick labels are plain numbers (no offset such as "1e-6+8.37e-1")."""
    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    axes = [a for row in fig.subplots(nrows, ncols, squeeze=False) for a in row]
    for ax in axes:
        ax.ticklabel_format(useOffset=False)
    return fig, axes


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


def wants_log(ys: list[float]) -> bool:
    """A series spanning more than a factor 50 between its smallest and largest non-zero magnitude
    (a count of flips falling over training, say) is drawn on a logarithmic axis."""
    pos = [abs(y) for y in ys if y != 0]
    return bool(pos) and min(ys) >= 0 and max(pos) / min(pos) > 50


def _scale(ax, ys: list[float], log: bool) -> None:
    """A logarithmic axis (symmetric-log when a value is 0, so flips per layer and in total read on
    the same kind of scale), or, for a series that is constant to 1 part in 10^4, limits that draw
    it flat instead of magnifying rounding noise."""
    if log:
        if min(ys) > 0:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=max(1e-12, min((y for y in ys if y > 0), default=1.0)))
        return
    lo, hi = min(ys), max(ys)
    size = max(abs(lo), abs(hi))
    if hi - lo <= 1e-4 * size or size == 0:
        mid, pad = (lo + hi) / 2, (0.05 * size or 1.0)
        ax.set_ylim(mid - pad, mid + pad)


def _maybe_log(ax, ys: list[float]) -> None:
    if ys:
        _scale(ax, ys, wants_log(ys))


def _panels(n: int, ncols: int, width: float, height: float, extra: float = 0.0):
    """A grid of n panels, at most `ncols` a row; the unused ones hidden."""
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = new_figure(nrows, ncols, width=width * ncols, height=height * nrows + extra)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def curves_figure(tag: str, metrics: list[dict]) -> Figure:
    """Accuracy and loss per epoch: train in blue, validation in orange, in both panels."""
    fig, (a1, a2) = new_figure(1, 2, width=9.6)
    for ax, keys, what in ((a1, ("train_acc", "val_acc"), "accuracy"), (a2, ("train_loss", "val_loss"), "loss")):
        for key in keys:
            xs, ys = _col(metrics, key)
            if ys:
                split = key.split("_")[0]
                ax.plot(xs, ys, color=SPLIT_COLOURS[split], marker="o" if split == "val" else ".", label=key)
        ax.set(xlabel="epoch", ylabel=axis_label(keys[1]).split(": ", 1)[-1], title=what)
        if ax.get_lines():
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    _epoch_axis(a1, a2)
    return Figure(f"{tag}_curves", "Accuracy and loss per epoch", png(fig), "From metrics.jsonl: train in blue, validation in orange.")


def log_scales(metrics: list[dict]) -> dict[str, bool]:
    """Per scalar of metrics.jsonl, whether it is drawn on a logarithmic axis (`wants_log`): a
    per-layer column of the same name follows it."""
    return {k: wants_log(_col(metrics, k)[1]) for k in _numeric_columns(metrics, CURVES + NOT_SERIES)}


def scalars_figure(tag: str, metrics: list[dict]) -> Figure | None:
    """A small curve for every other scalar of metrics.jsonl, whatever plugin recorded it, each in
    a colour of its own."""
    others = _numeric_columns(metrics, CURVES + NOT_SERIES)
    if not others:
        return None
    logs = log_scales(metrics)
    fig, axes = _panels(len(others), 3, 3.4, 2.6)
    for i, (ax, key) in enumerate(zip(axes, others)):
        xs, ys = _col(metrics, key)
        ax.plot(xs, ys, marker=".", color=SERIES_COLOURS[i % len(SERIES_COLOURS)])
        if ys:
            _scale(ax, ys, logs[key])
        ax.set(xlabel="epoch", title=key, ylabel=UNITS.get(key, ""))
        ax.grid(alpha=0.3)
        _epoch_axis(ax)
    return Figure(f"{tag}_scalars", "Every other figure per epoch", png(fig), f"From metrics.jsonl: {', '.join(others)}.")


def layer_colours(n: int) -> list:
    """A colour per layer, the same in every panel and every per-layer figure."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


def layer_table_figure(tag: str, table: str, rows: list[dict], logs: dict[str, bool] | None = None) -> Figure | None:
    """One panel per numeric column of a per-layer table, a line per layer (by parameter name), each
    layer in one colour throughout; a column named like a scalar of metrics.jsonl is drawn on the
    same kind of axis as that scalar (`logs`)."""
    cols = _numeric_columns(rows, ("epoch",))
    layers = list(dict.fromkeys(str(r.get("layer")) for r in rows if "layer" in r))
    if not cols or not layers:
        return None
    colours = layer_colours(len(layers))
    fig, axes = _panels(len(cols), 2, 4.8, 3.2, extra=0.12 * min(len(layers), 16))
    for ax, col in zip(axes, cols):
        every = []
        for layer, colour in zip(layers, colours):
            xs, ys = _col([r for r in rows if str(r.get("layer")) == layer], col)
            if ys:
                ax.plot(xs, ys, marker=".", label=layer, color=colour)
                every += ys
        if every:
            _scale(ax, every, (logs or {}).get(col, wants_log(every)))
        ax.set(xlabel="epoch", ylabel=axis_label(col), title=f"{col} per layer")
        ax.grid(alpha=0.3)
        _epoch_axis(ax)
    _legend(axes[0], len(layers))
    return Figure(f"{tag}_{table}", f"Per-layer figures: {table}.jsonl", png(fig),
                  f"From {table}.jsonl, one line per layer (by parameter name): {', '.join(cols)}.")


def training_figures(tag: str, metrics: list[dict], tables: dict[str, list[dict]]) -> list[Figure]:
    """Accuracy and loss; a small curve for every other scalar of metrics.jsonl; for every per-layer
    table, one panel per numeric column with a line per layer."""
    figs = [curves_figure(tag, metrics), scalars_figure(tag, metrics)] if metrics else []
    logs = log_scales(metrics)
    figs += [layer_table_figure(tag, table, rows, logs) for table, rows in tables.items()]
    return [f for f in figs if f is not None]


def compare_figure(name: str, title: str, runs: dict[str, list[dict]], key: str = "val_acc") -> Figure:
    """`key` per epoch of several train stages of one experiment, one line each (labelled by what
    tells them apart), in one panel."""
    fig, (ax,) = new_figure(1, 1, width=7.6, height=4.4)
    for i, (label, rows) in enumerate(runs.items()):
        xs, ys = _col(rows, key)
        if ys:
            ax.plot(xs, ys, marker=".", label=label, color=layer_colours(len(runs))[i])
    ax.set(xlabel="epoch", ylabel=axis_label(key), title=f"{key} per epoch, every train stage of the experiment")
    ax.grid(alpha=0.3)
    _epoch_axis(ax)
    _legend(ax, len(runs))
    return Figure(name, title, png(fig), f"From each stage's metrics.jsonl; each line is named by what differs in its spec.")


def sparsity_figure(tag: str, layers: list[tuple[str, int, int]]) -> Figure:
    names = [n for n, _, _ in layers]
    fracs = [k / t if t else 1.0 for _, k, t in layers]
    fig, (ax,) = new_figure(1, 1, width=max(6.4, 0.45 * len(names) + 2), height=4.2)
    bars = ax.bar(range(len(names)), fracs, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center", fontsize="x-small")
    ax.set(ylim=(0, 1.08), ylabel="kept fraction (kept / total weights)", title="Kept fraction of each prunable layer")
    if len(names) <= 24:
        ax.bar_label(bars, [f"{f:.2f}" for f in fracs], fontsize="x-small")
    kept = sum(k for _, k, _ in layers)
    total = sum(t for _, _, t in layers)
    if total:
        ax.axhline(kept / total, color="tab:red", linestyle="--", linewidth=1, label=f"overall {kept / total:.3f}")
        ax.legend(fontsize="small")
    return Figure(f"{tag}_kept", "Per-layer kept fraction", png(fig), "Kept / total prunable weights of each Conv2d and Linear layer.")


def density_figure(name: str, title: str, lines: dict[str, list[dict]], xlabel: str, legend_title: str | None,
                   references: dict[str, list[dict]] | None = None) -> Figure:
    """val_acc against density, a line per entry of `lines` (its groups: density, mean, std), the
    standard deviation shaded, ticks at the densities the grid ran; each entry of `references` (a
    method whose result does not depend on the density, such as a dense baseline) is a horizontal
    line at its mean. The density axis is logarithmic when it spans a decade or more."""
    references = references or {}
    fig, (ax,) = new_figure(1, 1, width=7.2, height=4.6)
    colours = layer_colours(len(lines) + len(references))
    for (label, gs), colour in zip(lines.items(), colours):
        xs, ms, ss = ([g[k] for g in gs] for k in ("density", "mean", "std"))
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label, color=colour)
        ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], alpha=0.15, color=colour)
    for (label, gs), colour in zip(references.items(), colours[len(lines):]):
        m = sum(g["mean"] for g in gs) / len(gs)
        sd = max(g["std"] for g in gs)
        kept = gs[0].get("kept")
        ax.axhline(m, color=colour, linestyle="--", linewidth=1.5, label=f"{label}" + (f" (density {as_written(kept)})" if kept is not None else ""))
        if sd:
            ax.axhspan(m - sd, m + sd, color=colour, alpha=0.1)
    dens = sorted({g["density"] for gs in lines.values() for g in gs})
    if dens and min(dens) > 0 and max(dens) / min(dens) >= 10:
        ax.set_xscale("log")
    if 0 < len(dens) <= 12:  # the densities the grid ran, written as in the grid file
        ax.set_xticks(dens, [as_written(d) for d in dens])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel=xlabel, ylabel=axis_label("val_acc"), title="Validation accuracy against density (mean ± std over seeds)")
    ax.legend(title=legend_title, fontsize="small")
    ax.grid(alpha=0.3)
    return Figure(name, title, png(fig), "Mean ± sample standard deviation over seeds (0 with one seed)"
                  + ("; a dashed line is a method whose result does not depend on the density (drawn at its mean)." if references else "."))
