"""A researcher's week with pab (issue 28): runs of one experiment told apart (what differs, the
overrides recorded, the report's labels and overlaid curves), a grid stopped by a signal and
resumed, a readable dry run, plots that say what they show, `pab plugins NAME`, clear small
messages, and a third-party plugin's failure as one paragraph."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import CONFIGS, ROOT, TINY_SPEC


def cli(*args, **kw):
    from pab_framework.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], **kw)
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("PAB_TEST_PAUSE", "PAB_DEBUG", "COLUMNS")}
    e.update({"CI": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]), **extra})
    return e


def pab(*args, cwd=ROOT, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pab_framework", *map(str, args)], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- what differs (item 2)
def _spec(seed=0, epochs=2, quantizer=None) -> dict:
    train = {"kind": "train", "after": ["prune"], "epochs": epochs, "optimizer": {"name": "bop", "ar": 0.001}}
    if quantizer:
        train["quantizer"] = {"name": "psg", "msb_bits": 8, "sparsify": True}
    return {"name": "x", "seed": seed, "vars": {"d": 0.3}, "model": {"name": "mlp"}, "runtime": {"output_dir": f"out{seed}"},
            "stages": {"prune": {"kind": "prune", "pruner": {"name": "synflow", "density": 0.3}}, "train": train}}


def test_what_differs_names_the_values_that_made_each_stage():
    from pab_framework.differs import what_differs

    specs = {"a": _spec(), "b": _spec(seed=5), "c": _spec(epochs=3), "d": _spec(quantizer=True)}
    got = what_differs([(k + sid, sid, s, "exp") for k, s in specs.items() for sid in ("prune", "train")])
    # a prune stage is told apart by what it depends on: the train stage's epochs are not its business
    assert (got["aprune"], got["bprune"], got["cprune"]) == ("seed=0", "seed=5", "seed=0")
    assert got["atrain"] == "seed=0, stages.train.epochs=2, stages.train.quantizer=none"
    assert got["btrain"] == "seed=5, stages.train.epochs=2, stages.train.quantizer=none"
    assert got["ctrain"] == "seed=0, stages.train.epochs=3, stages.train.quantizer=none"
    # a section present in one spec and absent in another is one difference, named by its plugin
    assert got["dtrain"] == "seed=0, stages.train.epochs=2, stages.train.quantizer.name=psg"
    # a list of plugin sections (transforms) by index: absent in one spec, and different between the others
    ep = [dict(_spec(), stages={"train": {"kind": "train", "transforms": [{"name": "edge_popup", "density": d}]}}) for d in (0.05, 0.1)]
    got = what_differs([("e1", "train", ep[0], "x"), ("e2", "train", ep[1], "x"), ("n", "train", dict(_spec(), stages={"train": {"kind": "train"}}), "x")])
    assert got == {"e1": "stages.train.transforms.0.name=edge_popup, stages.train.transforms.0.density=0.05",
                   "e2": "stages.train.transforms.0.name=edge_popup, stages.train.transforms.0.density=0.1", "n": "stages.train.transforms=none"}
    # runtime.output_dir and vars are not what a result depends on; alone in its group, nothing differs
    assert what_differs([("z", "train", _spec(), "exp"), ("y", "train", _spec(seed=9), "other")]) == {"z": "", "y": ""}


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """The tiny spec run three times: as written, with --set seed=5, with --set stages.train.epochs=3."""
    d = tmp_path_factory.mktemp("differs")
    spec = d / "spec.yaml"
    spec.write_text(TINY_SPEC.replace("progress: plain", "progress: none"))
    for extra in ([], ["--set", "seed=5"], ["--set", "stages.train.epochs=3"]):
        code, out = cli("run", spec, *extra)
        assert code == 0, out
    return d / "runs" / "tiny"


def _dirs(exp: Path) -> dict[str, Path]:
    from pab_framework import artifacts

    out = {}
    for d in artifacts.stage_dirs(exp):
        doc = artifacts.read_stage_doc(d)
        out[f"{doc['stage']}:{doc['overrides']}"] = d
    return out


def test_every_stage_records_its_overrides_and_upstream(three_runs):
    dirs = _dirs(three_runs)
    assert set(dirs) == {"prune:[]", "train:[]", "prune:['seed=5']", "train:['seed=5']", "train:['stages.train.epochs=3']"}
    doc = yaml.safe_load((dirs["train:['seed=5']"] / "spec.yaml").read_text())
    assert doc["overrides"] == ["seed=5"] and doc["spec"]["seed"] == 5
    assert doc["upstream"] == {"prune": dirs["prune:['seed=5']"].name}
    assert yaml.safe_load((dirs["prune:[]"] / "spec.yaml").read_text())["upstream"] == {}


def test_pab_results_shows_what_differs(three_runs, monkeypatch):
    from pab_framework import artifacts
    from pab_framework.cli.output import out as console
    from pab_framework.differs import stage_labels

    dirs = _dirs(three_runs)
    labels = stage_labels(dirs.values(), artifacts.read_stage_doc)
    assert labels[dirs["prune:['seed=5']"]] == "seed=5" and labels[dirs["prune:[]"]] == "seed=0"
    assert labels[dirs["train:[]"]] == "seed=0, stages.train.epochs=2"
    assert labels[dirs["train:['seed=5']"]] == "seed=5, stages.train.epochs=2"
    assert labels[dirs["train:['stages.train.epochs=3']"]] == "seed=0, stages.train.epochs=3"
    monkeypatch.setattr(console, "width", 400)  # a wide terminal: one line per row
    code, out = cli("results", three_runs)
    assert code == 0, out
    head = next(line for line in out.splitlines() if "what differs" in line)
    cells = [c.strip() for c in head.strip("┃").split("┃")]
    assert cells[6] == "what differs"  # after the time, so the columns before it stay where they were
    rows = {line.split("│")[-2].strip(): [c.strip() for c in line.strip("│").split("│")] for line in out.splitlines() if "runs/tiny/" in line}
    assert len(rows) == 5
    for d in dirs.values():
        row = next(cells for name, cells in rows.items() if name.endswith(d.name))
        assert row[6] == labels[d]  # the column sits on the stage's own row


def test_pab_report_labels_runs_and_overlays_their_curves(three_runs, tmp_path, monkeypatch):
    from pab_framework.report import draw

    drawn = {}
    real_png = draw.png
    monkeypatch.setattr(draw, "png", lambda fig: drawn.setdefault(len(drawn), fig) and real_png(fig))
    code, out = cli("report", three_runs, "--out", tmp_path)
    assert code == 0, out
    html = (tmp_path / "report.html").read_text()
    dirs = _dirs(three_runs)
    key = dirs["train:['seed=5']"].name.rsplit("-", 1)[1]
    assert f"tiny / train, seed=5, stages.train.epochs=2 (train, 2 epochs), key {key}" in html
    assert "tiny / prune, seed=5 (prune), key" in html
    assert "Computed by a command with --set seed=5." in html
    assert (tmp_path / "tiny_val_acc_compared.png").is_file()
    overlay = [f for f in drawn.values() if f.axes and f.axes[0].get_title().startswith("val_acc per epoch")]
    assert len(overlay) == 1
    lines = overlay[0].axes[0].get_lines()
    assert sorted(l.get_label() for l in lines) == ["train, seed=0, stages.train.epochs=2", "train, seed=0, stages.train.epochs=3",
                                                   "train, seed=5, stages.train.epochs=2"]
    assert sorted(len(l.get_xdata()) for l in lines) == [2, 2, 3]  # each stage's own epochs
    # the train stages' masks are their prune stages': said once, not repeated in a second table and figure
    for d in (dirs["train:[]"], dirs["train:['seed=5']"]):
        assert f"layers-{d.name}" not in html and not (tmp_path / f"{d.name}_kept.png").exists()
    assert f"Its masks are those of {dirs['prune:[]'].name}" in html
    assert f"layers-{dirs['prune:[]'].name}" in html and (tmp_path / f"{dirs['prune:[]'].name}_kept.png").is_file()


# --------------------------------------------------------------------------- a grid stopped by a signal (item 3)
def test_sigint_stops_a_grid_with_exit_3_and_the_rerun_says_what_resumed(tmp_path):
    # 90 steps an epoch, 60 epochs: once both runs have checkpointed epoch 1, either has far more
    # left to train than the gap between the two runs' starts
    (tmp_path / "spec.yaml").write_text(TINY_SPEC.replace("epochs: 2", "epochs: 60").replace("batch_size: 128", "batch_size: 16"))
    (tmp_path / "grid.yaml").write_text("base: spec.yaml\ngrid:\n  seed: [0, 1]\n")
    cmd = [sys.executable, "-m", "pab_framework", "grid", "grid.yaml", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0, seen = time.monotonic(), set()
    try:  # both runs are training (each has written a checkpoint): Ctrl-C
        while len(seen) < 2:
            seen |= {Path(p).parent for p in glob.glob(str(tmp_path / "runs" / "tiny" / "train-*" / "checkpoint*.pt"))}
            assert not glob.glob(str(tmp_path / "runs" / "tiny" / "train-*" / "result.json")), "a run finished before the signal"
            assert proc.poll() is None and time.monotonic() - t0 < 300, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, text
    assert "Traceback" not in text and "error" not in text
    assert "stopped: SIGINT while grid grid ran: runs 1, 2 interrupted" in text and "Run the same command again to resume (exit code 3)" in text
    assert text.count("interrupted (seed=") == 2 and "checkpoint written to" in text  # each run's line says where it stopped
    results = json.loads((tmp_path / "runs" / "grid" / "results.json").read_text())
    assert [r["status"] for r in results["rows"]] == ["interrupted", "interrupted"] and results["summary"]["interrupted"] == 2
    trains = sorted((tmp_path / "runs" / "tiny").glob("train-*"))
    assert len(trains) == 2 and all((d / "checkpoint.pt").is_file() and not (d / "result.json").exists() for d in trains)

    again = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("stages ran 0, resumed 1 (train), reused 1") == 2, again.stdout
    assert "stages: 0 ran, 2 resumed, 2 reused" in again.stdout
    s = json.loads((tmp_path / "runs" / "grid" / "results.json").read_text())["summary"]
    assert (s["ok"], s["stages_ran"], s["stages_resumed"], s["stages_reused"]) == (2, 0, 2, 2)
    for d in trains:
        assert [json.loads(l)["epoch"] for l in (d / "metrics.jsonl").read_text().splitlines()] == list(range(1, 61))
        assert json.loads((d / "result.json").read_text())["resumed"] is True


# --------------------------------------------------------------------------- the dry run (item 6)
def test_dry_run_fits_120_columns_and_cuts_no_name(tmp_path):
    from pab_framework import grid as G

    p = pab("grid", CONFIGS / "compare_hidden_digits.yaml", "--dry-run", "--set", f"runtime.output_dir={tmp_path}", COLUMNS="120")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert max(len(l) for l in lines) <= 120, max(lines, key=len)
    assert "…" not in p.stdout and len(lines) < 120
    g = G.load_grid(CONFIGS / "compare_hidden_digits.yaml", [f"runtime.output_dir={tmp_path}"])
    words = p.stdout.split()
    for run, plans in G.plan_grid(g).items():
        for sp in plans:
            assert sp.dir.name in words, sp.dir.name  # every directory whole, never broken over lines
    for name in ("dense_sgd", "edge_popup", "vars.density", "pab_psg"):
        assert name in words
    assert "  prune: 12 distinct directories for 24 runs (0 complete, 12 to compute)" in lines
    # one entry per run: its number first, then its values, then its stages
    first = {l.split()[0] for l in lines if l[:3].strip().isdigit()}
    assert first == {str(i) for i in range(1, 61)}


# --------------------------------------------------------------------------- plots (item 7)
@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report draws, as drawn (before they become PNG bytes)."""
    from pab_framework.report import draw

    drawn = []
    real = draw.png
    monkeypatch.setattr(draw, "png", lambda fig: drawn.append(fig) or real(fig))
    return drawn


def test_a_constant_is_drawn_flat_without_an_offset(figures):
    from pab_framework.report.draw import scalars_figure

    rows = [{"epoch": e, "psg_kept": 0.8367912 + 1e-7 * (e % 2), "flips": 10 ** (6 - e)} for e in range(1, 6)]
    scalars_figure("t", rows)
    (fig,) = figures
    fig.canvas.draw()
    by_title = {ax.get_title(): ax for ax in fig.axes}
    psg = by_title["psg_kept"]
    lo, hi = psg.get_ylim()
    assert hi - lo > 0.05  # drawn flat: the noise in the 7th digit is not magnified
    assert psg.yaxis.get_offset_text().get_text() == ""
    assert all("+" not in t.get_text() and "e" not in t.get_text() for t in psg.get_yticklabels())
    assert psg.get_ylabel() == "fraction of gradient entries kept"
    assert by_title["flips"].get_yscale() == "log"
    colours = {ax.get_title(): ax.get_lines()[0].get_color() for ax in fig.axes if ax.get_lines()}
    assert len(set(colours.values())) == len(colours)  # one colour per series


def test_train_and_validation_keep_their_colours_across_panels(figures):
    from pab_framework.report.draw import curves_figure

    curves_figure("t", [{"epoch": e, "train_acc": 0.5 + e / 10, "val_acc": 0.4 + e / 10, "train_loss": 2 - e / 10, "val_loss": 2.1 - e / 10}
                        for e in range(1, 4)])
    (fig,) = figures
    colour = {l.get_label(): l.get_color() for ax in fig.axes for l in ax.get_lines()}
    assert colour["train_acc"] == colour["train_loss"] != colour["val_acc"] == colour["val_loss"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy (fraction correct)", "loss (cross-entropy)"]


def test_per_layer_panels_have_labels_and_follow_the_totals_scale(figures):
    from pab_framework.report.draw import training_figures

    metrics = [{"epoch": e, "val_acc": 0.5, "flips": 10 ** (6 - e), "lr": 0.1} for e in range(1, 6)]
    flips = [{"epoch": e, "layer": f"{i}.weight", "flips": (10 ** (5 - e)) * (i + 1), "surviving": 100 * (i + 1)}
             for e in range(1, 6) for i in range(3)]
    flips[0]["flips"] = 0  # a layer with no flip in an epoch: still the totals' (logarithmic) kind of axis
    training_figures("t", metrics, {"flips": flips})
    layer_fig = figures[-1]
    panels = {ax.get_title(): ax for ax in layer_fig.axes if ax.get_visible()}
    assert panels["flips per layer"].get_yscale() in ("log", "symlog")
    assert panels["flips per layer"].get_ylabel() == "flips: sign flips in the epoch"
    assert panels["surviving per layer"].get_ylabel() == "surviving: weights"
    # a layer keeps its colour from panel to panel
    colours = [{l.get_label(): l.get_color() for l in ax.get_lines()} for ax in panels.values()]
    assert colours[0] == colours[1] and len(set(colours[0].values())) == 3


def _grid_results(path: Path) -> None:
    rows, run = [], 0
    for method, acc in (("dense_sgd", None), ("pab", 0.6), ("imp", 0.8)):
        for dens in (0.05, 0.1, 0.3, 0.5):
            for seed in (0, 1, 2):
                run += 1
                va = 0.98143 + 0.001 * seed if acc is None else acc + dens / 3 + 0.00160822 * seed
                rows.append({"run": run, "method": method, "vars.density": dens, "seed": seed, "status": "ok", "val_acc": va,
                             "density": 1.0 if acc is None else dens})
    path.write_text(json.dumps({"grid": "cmp", "varied": ["method", "vars.density", "seed"], "rows": rows}))


def test_grid_figure_ticks_the_grid_densities_and_draws_a_dense_reference(tmp_path, figures):
    _grid_results(tmp_path / "results.json")
    code, out = cli("report", tmp_path)
    assert code == 0, out
    (fig,) = figures
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.05", "0.1", "0.3", "0.5"]
    assert [l.get_text() for l in ax.xaxis.get_minorticklabels() if l.get_text()] == []
    dense = [l for l in ax.get_lines() if l.get_label().startswith("dense_sgd")]
    assert len(dense) == 1 and dense[0].get_label() == "dense_sgd (density 1)"
    assert len(set(dense[0].get_ydata())) == 1  # a horizontal reference line, not a curve across 0.05-0.5
    assert "density (vars.density; fraction of weights kept)" == ax.get_xlabel()
    from test_report import Page

    page = Page((tmp_path / "report.html").read_text())
    table = page.tables["grid"]
    assert table[0][3] == "val_acc mean (fraction correct)"
    rows = table[1:]
    assert [r[0] for r in rows[::4]] == ["dense_sgd", "pab", "imp"]  # the order of the grid's runs, as `pab results`
    for col in (3, 4):  # one precision down a column
        assert all(len(r[col].split(".")[1]) == 4 for r in rows), [r[col] for r in rows]
    assert [r[1] for r in rows[:4]] == ["0.05", "0.1", "0.3", "0.5"]


# --------------------------------------------------------------------------- pab plugins NAME (item 8)
def test_pab_plugins_name_shows_the_parameters():
    code, out = cli("plugins", "synflow")
    assert code == 0, out
    assert "pruner synflow" in out
    row = {line.split("│")[0].strip(): [c.strip() for c in line.split("│")] for line in out.splitlines() if "│" in line}
    assert row["density"][1:3] == ["float (> 0, <= 1)", "required"]
    assert row["iterations"][1:3] == ["int (>= 1, <= 100000)", "1"] and "Score-and-mask rounds" in row["iterations"][3]
    assert row["schedule"][1:3] == ["exponential | linear", "exponential"]
    code, out = cli("plugins", "bop")
    assert code == 0 and "optimizer bop" in out and "optimizer plugin" in out and "Decay {every, factor}" in out
    code, out = cli("plugins", "synflw")
    assert code == 2 and "did you mean 'synflow'?" in out and "Traceback" not in out
    code, out = cli("plugins")  # alone: every plugin, as before
    assert code == 0 and "synflow" in out and "digits_cnn" in out and "packed" in out


def test_plugin_parameters_come_from_the_schema_pab_schema_prints():
    from pab_framework.plugin_params import describe
    from pab_framework.schema import spec_schema

    (doc,) = describe("psg")
    variant = next(v for v in spec_schema()["$defs"]["QuantizerCall"]["anyOf"] if v["title"] == "psg")
    assert [p.name for p in doc.params] == [k for k in variant["properties"] if k != "name"]
    by_name = {p.name: p for p in doc.params}
    for k, prop in variant["properties"].items():
        if "description" in prop and k != "name":
            assert by_name[k].description == " ".join(prop["description"].split())


# --------------------------------------------------------------------------- small messages (item 9)
def test_results_of_a_missing_folder_and_of_the_output_folder(three_runs, tmp_path):
    code, out = cli("results", tmp_path / "nope")
    assert code == 2 and "no such directory or file" in out and "no results.json" not in out
    code, out = cli("results", three_runs.parent)  # runs/: the folder of experiments
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("│ tiny "))
    assert [c.strip() for c in row.strip("│").split("│")][:4] == ["tiny", "experiment", "5", "5"]


def test_the_cuda_home_note_of_torch_is_silenced_and_nothing_else(tmp_path):
    code = ("import logging, torch; assert not torch.cuda.is_available(); {pab}import torch.utils.cpp_extension; "
            "logging.getLogger('torch.utils.cpp_extension').warning('another warning')")
    for with_pab in (False, True):
        p = subprocess.run([sys.executable, "-c", code.format(pab="import pab_framework.pipeline; " if with_pab else "")],
                           cwd=ROOT, env=env(CUDA_HOME=str(tmp_path)), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert "another warning" in p.stderr
        assert ("No CUDA runtime is found" in p.stderr) is not with_pab, p.stderr


# --------------------------------------------------------------------------- a plugin's failure (item 10)
BROKEN_PKG = {
    "pyproject.toml": """\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "pab-plugin-broken"
        version = "0.1.0"

        [tool.setuptools.packages.find]
        where = ["src"]

        [project.entry-points."pab.pruners"]
        dtype_bug = "pab_plugin_broken.pruners:DtypeBug"

        [project.entry-points."pab.transforms"]
        dtype_bug = "pab_plugin_broken.transforms:Nothing"
        """,
    "src/pab_plugin_broken/__init__.py": "",
    "src/pab_plugin_broken/pruners.py": '''\
        from pydantic import BaseModel, ConfigDict


        class DtypeBug:
            """Scores with the batches as they arrive (float32), forgetting to move them."""

            class Params(BaseModel):
                model_config = ConfigDict(extra="forbid")

            def score(self, params, model, prunable, inputs):
                x, y = inputs.batches[0]
                loss = inputs.loss_fn(model(x), y)
                return {n: w.abs() for n, w in prunable.items()}
        ''',
    "src/pab_plugin_broken/transforms.py": '''\
        from pydantic import BaseModel, ConfigDict, Field


        class Nothing:
            """A transform of the same name as the pruner."""

            class Params(BaseModel):
                model_config = ConfigDict(extra="forbid")
                strength: float = Field(0.5, ge=0, description="How much nothing to do.")

            def apply(self, model, params, tctx):
                return model
        ''',
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    src = tmp_path_factory.mktemp("broken_src")
    for rel, text in BROKEN_PKG.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(textwrap.dedent(text))
    target = tmp_path_factory.mktemp("broken_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(src)], check=True, capture_output=True, text=True)
    return target


def test_a_third_party_plugin_failure_is_one_paragraph_naming_it(broken_site, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC.replace("{name: synflow, density: 0.3, iterations: 5}", "{name: dtype_bug, density: 0.3}"))
    path = os.pathsep.join([str(broken_site), str(ROOT)])
    p = pab("run", spec, PYTHONPATH=path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    said = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(said) == 1, p.stderr
    msg = said[0]
    assert msg.startswith("error: stage prune (prune): the pruner plugin 'dtype_bug' (pab_plugin_broken.pruners:DtypeBug) failed with RuntimeError")
    assert "raised in pab_plugin_broken.pruners (pruners.py:" in msg and "in score)" in msg and "--debug" in msg
    p = pab("run", spec, "--debug", PYTHONPATH=path)
    assert p.returncode == 2 and "Traceback" in p.stderr and 'pruners.py", line' in p.stderr
    # a name in two kinds: `pab plugins NAME` shows each
    p = pab("plugins", "dtype_bug", PYTHONPATH=path, COLUMNS="200")
    assert p.returncode == 0, p.stderr
    assert "pruner dtype_bug (pab_plugin_broken.pruners:DtypeBug)" in p.stdout and "transform dtype_bug" in p.stdout
    assert "strength" in p.stdout and "How much nothing to do." in p.stdout


class _Registry:
    """A registry holding one third-party plugin from the module `module`."""

    def __init__(self, module: str):
        from pab_framework.registry import GROUPS, Entry

        self.groups = GROUPS
        self.entry = Entry("fake", "pab.pruners", f"{module}:Fake", object())

    def entries(self, group):
        return {"fake": self.entry} if group == "pab.pruners" else {}


def test_the_innermost_frame_of_pab_or_a_plugin_decides(tmp_path, monkeypatch):
    from pab_framework import blame, formatting

    (tmp_path / "fakeplug_ux.py").write_text(textwrap.dedent("""\
        def fails():
            raise ValueError("the plugin's own mistake")

        def calls(fn, *args):
            return fn(*args)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fakeplug_ux

    reg = _Registry("fakeplug_ux")
    spec = {"stages": {"prune": {"kind": "prune", "pruner": {"name": "fake"}}}}
    try:  # the plugin's code raises (through its own helper): the plugin's failure
        fakeplug_ux.calls(fakeplug_ux.fails)
    except ValueError as e:
        f = blame.plugin_failure(e, "prune", "prune", spec, reg)
    assert isinstance(f, blame.PluginFailure) and f.exit_code == 2
    assert str(f).startswith("stage prune (prune): the pruner plugin 'fake' (fakeplug_ux:Fake) failed with ValueError: the plugin's own mistake")
    assert "raised in fakeplug_ux (fakeplug_ux.py:2, in fails)" in str(f)
    try:  # the plugin calls into pab, which raises: pab's own failure, left alone (its traceback is shown)
        fakeplug_ux.calls(formatting.human_bytes, "not a number")
    except TypeError as e:
        assert blame.plugin_failure(e, "prune", "prune", spec, reg) is None


def test_a_failure_in_pab_itself_keeps_its_traceback(tmp_path, monkeypatch):
    from pab_framework import masking

    def broken(*a, **k):
        raise RuntimeError("a bug in pab")

    monkeypatch.setattr(masking, "prune", broken)
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC)
    from pab_framework.cli import app

    r = CliRunner().invoke(app, ["run", str(spec)])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError) and str(r.exception) == "a bug in pab"
