"""`pab report`: the HTML page, its PNGs, and its numbers checked against result.json."""
from __future__ import annotations

import base64
import json
import math
import shutil
import struct
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from conftest import TINY_SPEC

PNG_SIG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Every table (by id: rows of cell texts) and every embedded image of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.exact: dict[str, list[list[str]]] = {}  # the same, a number's full value (data-value) where the page gives one
        self._exact_row = None
        self._value = None
        self.images: list[bytes] = []
        self._table = None
        self._row = None
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            tid = a.get("id", f"t{len(self.tables)}")
            self._table, self._exact = self.tables.setdefault(tid, []), self.exact.setdefault(tid, [])
        elif tag == "tr" and self._table is not None:
            self._row, self._exact_row = [], []
        elif tag in ("td", "th") and self._row is not None:
            self._cell, self._value = [], a.get("data-value")
        elif tag == "img":
            src = a["src"]
            assert src.startswith("data:image/png;base64,"), src[:40]
            self.images.append(base64.b64decode(src.split(",", 1)[1], validate=True))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._exact_row.append(self._value if self._value is not None else self._row[-1])
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._exact.append(self._exact_row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def check_png(data: bytes) -> tuple[int, int]:
    """A valid PNG header (signature, IHDR first) of a picture of non-trivial size."""
    assert data[:8] == PNG_SIG
    length, ctype = struct.unpack(">I4s", data[8:16])
    assert ctype == b"IHDR" and length == 13
    w, h = struct.unpack(">II", data[16:24])
    assert w >= 300 and h >= 200, (w, h)
    assert len(data) > 5000
    assert data[-8:-4] == b"IEND"
    return w, h


def num(cell: str) -> float:
    return float(cell.replace(",", ""))


def kv(table: list[list[str]]) -> dict[str, str]:
    return {r[0]: r[1] for r in table[1:]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from pab_framework.pipeline import run_spec
    from pab_framework.specification import load_spec

    d = tmp_path_factory.mktemp("report")
    spec = d / "spec.yaml"
    spec.write_text(TINY_SPEC.replace("progress: plain", "progress: none, loggers: [jsonl, csv]"))
    outcomes = run_spec(load_spec(spec))
    return {o.stage_id: o.dir for o in outcomes}


def run_report(args):
    from pab_framework.cli import app

    return CliRunner().invoke(app, ["report", *map(str, args)])


def test_report_of_a_run(tiny_run, tmp_path):
    prune_dir, train_dir = tiny_run["prune"], tiny_run["train"]
    exp = prune_dir.parent
    r = run_report([exp])
    assert r.exit_code == 0, r.output
    page_path = exp / "report.html"
    page = Page(page_path.read_text())

    # every figure is embedded, a real PNG, and the same bytes as the file beside the page
    pngs = sorted(exp.glob("*.png"))
    names = {p.stem for p in pngs}
    assert {f"{prune_dir.name}_kept", f"{train_dir.name}_curves", f"{train_dir.name}_flips"} <= names
    # the train stage's masks are the prune stage's: its section says so instead of repeating the figure
    assert f"{train_dir.name}_kept" not in names and f"Its masks are those of {prune_dir.name}" in page_path.read_text()
    r = run_report([train_dir, "--out", tmp_path / "alone"])  # the train stage alone: its own kept figure and table
    assert r.exit_code == 0, r.output
    alone = Page((tmp_path / "alone" / "report.html").read_text())
    assert (tmp_path / "alone" / f"{train_dir.name}_kept.png").is_file()
    assert not any("psg" in n for n in names)  # PSG did not run
    assert len(page.images) == len(pngs)
    for img in page.images:
        check_png(img)
    assert sorted(page.images) == sorted(p.read_bytes() for p in pngs)

    pres = json.loads((prune_dir / "result.json").read_text())
    tres = json.loads((train_dir / "result.json").read_text())
    # result tables
    tr = kv(page.tables[f"result-{train_dir.name}"])
    for key in ("val_acc", "best_val_acc", "train_loss", "density"):
        assert math.isclose(num(tr[key]), tres[key], rel_tol=1e-5), key
    assert num(tr["epochs"]) == 2
    # per-layer table against the prune stage's result.json
    rows = page.tables[f"layers-{prune_dir.name}"][1:]
    assert {r[0]: (int(num(r[1])), int(num(r[2]))) for r in rows} == {n: tuple(v) for n, v in pres["layers"].items()}
    for r in rows:
        assert math.isclose(num(r[3]), num(r[1]) / num(r[2]), rel_tol=1e-5)
        # a batch-of-one Linear layer costs 2 FLOPs per weight; sparse: 2 per kept weight
        assert num(r[4]) == 2 * num(r[2]) and num(r[5]) == 2 * num(r[1])
    # the train stage's masks (read from its model.pt) are the prune stage's (shown by the report of it
    # alone; beside its prune stage the table is not repeated)
    assert f"layers-{train_dir.name}" not in page.tables
    trows = alone.tables[f"layers-{train_dir.name}"][1:]
    assert {r[0]: (int(num(r[1])), int(num(r[2]))) for r in trows} == {n: tuple(v) for n, v in pres["layers"].items()}

    cost = kv(page.tables[f"cost-{prune_dir.name}"])
    # mlp hidden [32] with BatchNorm on 8x8 digits: Linear(64,32, no bias) + BN(32) + Linear(32,10)
    params, other = 64 * 32 + 2 * 32 + 32 * 10 + 10, 2 * 32 + 10
    assert num(cost["parameters (all)"]) == params
    assert num(cost["prunable weights (Conv2d, Linear)"]) == pres["total"]
    assert num(cost["prunable weights kept"]) == pres["kept"]
    assert num(cost["parameters after pruning"]) == params - pres["total"] + pres["kept"]
    assert num(cost["FLOPs per input, dense"]) == 2 * pres["total"]
    assert num(cost["FLOPs per input, after pruning"]) == 2 * pres["kept"]
    assert num(cost["weights, float32 (dense) (bytes)"]) == 4 * params
    info = math.ceil((pres["total"] + pres["kept"]) / 8 + 4 * other)
    assert num(cost["weights, mask bitmap + 1 sign bit per kept weight (bytes)"]) == info
    # the memory of the result is the real files': the stage's model.pt, and the packed file `pab export` writes
    from pab_framework import export

    assert num(cost["model.pt, the file (bytes)"]) == (prune_dir / "model.pt").stat().st_size
    packed = export.packed_bytes(prune_dir)
    assert num(cost["packed file (pab export) (bytes)"]) == packed and packed <= info + 8192


def test_report_of_an_output_directory_and_of_one_stage(tiny_run, tmp_path):
    """The output directory (two levels above the stages) and a single stage directory are
    reports too: the stages in the order they ran (prune, then train), or just the one."""
    from pab_framework import artifacts

    prune_dir, train_dir = tiny_run["prune"], tiny_run["train"]
    outdir = prune_dir.parent.parent
    assert artifacts.stage_dirs(outdir) == []  # experiments, not stages, one level down
    assert artifacts.stage_dirs(outdir, levels=2) == [prune_dir, train_dir]
    r = run_report([outdir, "--out", tmp_path / "all"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "all" / "report.html").read_text()
    assert page.index(prune_dir.name) < page.index(train_dir.name)
    r = run_report([train_dir, "--out", tmp_path / "one"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "one" / "report.html").read_text()
    assert train_dir.name in page and prune_dir.name not in page


def test_report_draws_whatever_series_a_run_recorded(tiny_run, tmp_path):
    # a stage directory with figures no built-in plugin records: a scalar in metrics.jsonl and a
    # per-layer table of its own (as a third-party plugin would record them through the metrics
    # sink), besides PSG-style per-layer figures in layers.jsonl: each gets its figure
    d = tmp_path / tiny_run["train"].name
    shutil.copytree(tiny_run["train"], d)
    metrics = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    for r in metrics:
        r["my_plugin_score"] = 0.5 * r["epoch"]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    flips = [json.loads(l) for l in (d / "flips.jsonl").read_text().splitlines()]
    layers = sorted({r["layer"] for r in flips})
    assert layers and all(n.endswith(".weight") for n in layers)
    rows = [{"epoch": r["epoch"], "layer": n, "psg_kept": 0.1 * r["epoch"] + 0.05 * i} for r in metrics for i, n in enumerate(layers)]
    (d / "layers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "mytable.jsonl").write_text("".join(json.dumps({"epoch": r["epoch"], "layer": n, "saliency": 1.0 + i}) + "\n"
                                             for r in metrics for i, n in enumerate(layers)))
    out = tmp_path / "out"
    r = run_report([d, "--out", out])
    assert r.exit_code == 0, r.output
    names = {p.stem for p in out.glob("*.png")}
    assert {f"{d.name}_{x}" for x in ("curves", "scalars", "flips", "layers", "mytable", "kept")} == names
    html = (out / "report.html").read_text()
    assert "my_plugin_score" in html and "saliency" in html and "psg_kept" in html and "flip_rate" in html
    page = Page(html)
    assert len(page.images) == len(names)
    for img in page.images:
        check_png(img)
    # the section names what tells it apart from another train stage of the same experiment
    assert "(train, 2 epochs), key " + d.name.rsplit("-", 1)[1] in html
    assert not (d / "report.html").exists()


def grid_rows():
    rows = []
    accs = {("synflow", 0.1): [0.80, 0.82, 0.84], ("synflow", 0.5): [0.90, 0.91, 0.95],
            ("random", 0.1): [0.50, 0.60, 0.55], ("random", 0.5): [0.85, 0.86, 0.87]}
    for (pruner, dens), vals in accs.items():
        for seed, acc in enumerate(vals):
            rows.append({"stages.prune.pruner.name": pruner, "stages.prune.pruner.density": dens, "seed": seed,
                         "val_acc": acc, "density": dens * 0.999, "status": "done"})
    rows.append({"stages.prune.pruner.name": "random", "stages.prune.pruner.density": 0.1, "seed": 3,
                 "val_acc": None, "density": None, "status": "failed"})
    return rows, accs


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_report_of_a_grid(tmp_path, fmt):
    import csv
    import statistics

    rows, accs = grid_rows()
    if fmt == "json":
        (tmp_path / "results.json").write_text(json.dumps(rows))
    else:
        with open(tmp_path / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    r = run_report([tmp_path])
    assert r.exit_code == 0, r.output
    page = Page((tmp_path / "report.html").read_text())
    assert len(page.images) == 1
    check_png(page.images[0])
    table = page.exact["grid"][1:]  # the full values; the cells show them to 4 places, like `pab results`
    assert all(len(r[c].split(".")[1]) == 4 for r in page.tables["grid"][1:] for c in (3, 4))
    got = {(r[0], num(r[1])): (int(num(r[2])), num(r[3]), num(r[4])) for r in table}
    assert set(got) == set(accs)
    for key, vals in accs.items():
        n, mean, std = got[key]
        assert n == 3  # the failed row is left out
        assert math.isclose(mean, statistics.mean(vals), rel_tol=1e-5)
        assert math.isclose(std, statistics.stdev(vals), rel_tol=1e-5)


def test_report_of_nothing_is_a_clear_error(tmp_path):
    r = run_report([tmp_path])
    assert r.exit_code == 2
    assert "no stage directories" in r.output and "Traceback" not in r.output
    r = run_report([tmp_path / "missing"])
    assert r.exit_code == 2 and "not a directory" in r.output
