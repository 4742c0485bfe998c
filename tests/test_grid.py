"""Ablation grids: expansion, validation before anything runs, shared stages computed once, resume,
failures recorded while the other runs finish, the stage lock, submitit, the results table."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import HOOKS, ROOT, TINY_SPEC
from pab_framework import grid as G
from pab_framework.errors import PabError


def _write(tmp_path: Path, grid_text: str, spec_text: str = TINY_SPEC) -> Path:
    (tmp_path / "spec.yaml").write_text(spec_text)
    p = tmp_path / "grid.yaml"
    p.write_text(grid_text)
    return p


def _cli(*args):
    from pab_framework import cli

    return CliRunner().invoke(cli.app, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------- expansion
def test_expand_cartesian_order_and_zip():
    combos = G.expand({"a": [1, 2], "b": ["x", "y", "z"]}, {"c": [10, 20], "d": [0.1, 0.2]})
    assert len(combos) == 2 * 3 * 2
    assert combos[0] == {"a": 1, "b": "x", "c": 10, "d": 0.1}
    assert combos[1] == {"a": 1, "b": "x", "c": 20, "d": 0.2}  # zipped lists move together
    assert combos[-1] == {"a": 2, "b": "z", "c": 20, "d": 0.2}  # first key varies slowest
    assert all((c["c"], c["d"]) in {(10, 0.1), (20, 0.2)} for c in combos)
    assert G.expand({}, {}) == [{}]


def test_expand_zip_unequal_lengths_is_an_error():
    with pytest.raises(ValueError, match="equal lengths"):
        G.expand({"a": [1]}, {"c": [1, 2], "d": [1, 2, 3]})


def test_grid_file_zip_unequal_lengths_names_file_line_and_keys(tmp_path):
    p = _write(tmp_path, "base: spec.yaml\nzip:\n  stages.train.optimizer.ar: [1.0e-3, 1.0e-4]\n  stages.train.optimizer.tau: [1.0e-6]\n")
    with pytest.raises(G.GridError) as ei:
        G.load_grid(p)
    msg = str(ei.value)
    assert f"{p}:4" in msg and "stages.train.optimizer.tau has 1" in msg and "stages.train.optimizer.ar has 2" in msg


def test_nested_keys_and_lists_as_values(tmp_path):
    p = _write(
        tmp_path,
        "base: spec.yaml\n"
        "set:\n"
        "  stages.train.optimizer.rest: {name: sgd, lr: 0.05, milestones: [1]}\n"
        "grid:\n"
        "  stages.prune.pruner.density: [0.1, 0.4]\n"
        "  stages.train.optimizer.rest.milestones: [[1], [1, 2]]\n"
        "  model.hidden: [[16], [32, 16]]\n",
    )
    g = G.load_grid(p)
    assert len(g.runs) == 8 and g.name == "grid"
    r = g.runs[-1]
    assert r.varied == {"stages.prune.pruner.density": 0.4, "stages.train.optimizer.rest.milestones": [1, 2], "model.hidden": [32, 16]}
    spec = r.spec
    assert spec.stages["prune"].params.pruner.density == 0.4
    assert spec.stages["train"].params.optimizer.params.rest.params.milestones == [1, 2]
    assert spec.stages["train"].params.optimizer.params.rest.params.lr == 0.05
    assert spec.model.params.hidden == [32, 16]
    # the base spec's other values are untouched
    assert spec.stages["train"].params.epochs == 2 and spec.stages["prune"].params.pruner.iterations == 5
    assert g.runs[0].spec.model.params.hidden == [16]


def test_a_bad_combination_stops_the_grid_naming_run_key_and_line(tmp_path):
    p = _write(tmp_path, "base: spec.yaml\ngrid:\n  seed: [0, 1]\n  stages.prune.pruner.density: [0.3, 1.5]\n")
    with pytest.raises(G.GridError) as ei:
        G.load_grid(p)
    msg = str(ei.value)
    assert "run 2 of 4" in msg and "pruner.density=1.5" in msg  # which run
    assert "stages.prune.pruner.density" in msg and f"{p}:4" in msg  # which key, and where it was set
    assert "and 1 more invalid run: 4" in msg
    # through the CLI: one message, exit 2, nothing ran
    res = _cli("grid", str(p))
    assert res.exit_code == 2 and "Traceback" not in res.output and "run 2 of 4" in res.output
    assert not (tmp_path / "runs").exists()


def test_a_multi_process_base_is_refused_not_run_in_one_process(tmp_path):
    p = _write(tmp_path, "base: spec.yaml\ngrid:\n  seed: [0, 1]\nset:\n  runtime.nproc_per_node: 2\n")
    with pytest.raises(G.GridError, match=r"grid.yaml:5, runtime.nproc_per_node: is 2, but a grid runs each run in one process"):
        G.load_grid(p)
    assert len(G.load_grid(p, ["runtime.nproc_per_node=1"]).runs) == 2


def test_pab_validate_checks_a_grid_file_run_by_run(tmp_path):
    p = _write(tmp_path, "base: spec.yaml\ngrid:\n  seed: [0, 1]\n  stages.prune.pruner.density: [0.3, 0.5]\n")
    res = _cli("validate", str(p))
    assert res.exit_code == 0 and "a valid grid (4 runs of" in res.output
    p.write_text("base: spec.yaml\ngrid:\n  stages.prune.pruner.density: [0.3, 1.5]\n")
    res = _cli("validate", str(p))
    assert res.exit_code == 2 and "run 2 of 2" in res.output and f"{p}:3" in res.output and "Traceback" not in res.output


def test_grid_file_problems(tmp_path):
    p = _write(tmp_path, "base: nowhere.yaml\ngird: {seed: [0]}\n")
    with pytest.raises(G.GridError, match="did you mean 'grid'"):
        G.load_grid(p)
    p.write_text("base: nowhere.yaml\ngrid: {seed: [0]}\n")
    with pytest.raises(G.GridError, match=r"grid.yaml:1.*nowhere.yaml not found"):
        G.load_grid(p)
    p.write_text("base: spec.yaml\ngrid: {seed: 3}\n")
    with pytest.raises(G.GridError, match=r"grid.yaml:2, grid.seed: needs a non-empty list"):
        G.load_grid(p)
    p.write_text("base: spec.yaml\ngrid: {seed: [0, 1]}\nset: {seed: 3}\n")
    with pytest.raises(G.GridError, match="seed is set in both grid: and set:"):
        G.load_grid(p)
    p.write_text("base: spec.yaml\ngrid: {stages.prune.pruner.nme: [synflow]}\n")
    with pytest.raises(G.GridError, match=r"grid.yaml:2, stages.prune.pruner.nme: unknown key 'nme'"):
        G.load_grid(p)


def test_grid_file_problems_come_together_each_at_its_line(tmp_path):
    # the grid file is validated as the spec is: every problem at once, each at file:line, key path
    p = _write(tmp_path, "base: spec.yaml\nvariants:\n  'bad axis': {a: {seed: 1}}\n  method:\n    ok: 5\n"
                         "    ok2: {'bad key': 1}\ngrid:\n  stages: {prune: [1]}\nset: [1]\nslurm: gpu\n")
    with pytest.raises(G.GridError) as ei:
        G.load_grid(p)
    msg = str(ei.value)
    for line, needle in ((3, "variants.bad axis: axis name 'bad axis' must be a word"),
                         (5, "variants.method.ok: must be a mapping of key paths to values (as set:) (got int)"),
                         (6, "variants.method.ok2.bad key: a key path looks like stages.prune.pruner.density"),
                         (8, "grid.stages: needs a list of values, found a mapping; write the full key path with dots (e.g. stages.prune: [...])"),
                         (9, "set: must be a mapping of key paths to values (got list)"),
                         (10, "slurm: must be a mapping (partition, time, gpus_per_node, cpus_per_task, ...)")):
        assert f"{p}:{line}, {needle}" in msg, msg
    assert msg.index(f"{p}:3,") < msg.index(f"{p}:10,")  # in the order they stand in the file
    p.write_text("grid: {seed: [0]}\nname: 'a b'\n")
    msg = str(pytest.raises(G.GridError, G.load_grid, p).value)
    assert f"{p}:1, base: required: the path of the base spec" in msg and f"{p}:2, name: grid name 'a b' must start with a letter" in msg
    odd = tmp_path / "odd name.yaml"
    odd.write_text("base: spec.yaml\ngrid: {seed: [0]}\n")
    with pytest.raises(G.GridError, match="the grid's name comes from its file name, 'odd name'.*set name: in the file"):
        G.load_grid(odd)


def test_over_seeds_mean_and_std():
    rows = [
        {"p": "a", "seed": 0, "status": "ok", "val_acc": 0.5, "density": 0.3},
        {"p": "a", "seed": 1, "status": "ok", "val_acc": 0.7, "density": 0.3},
        {"p": "a", "seed": 2, "status": "failed", "val_acc": None, "density": None},
        {"p": "b", "seed": 0, "status": "ok", "val_acc": 0.9, "density": 0.1},
    ]
    agg = {r["p"]: r for r in G.over_seeds(["p", "seed"], rows)}
    assert agg["a"]["seeds"] == 3 and agg["a"]["ok"] == 2
    assert agg["a"]["val_acc_mean"] == pytest.approx(0.6) and agg["a"]["val_acc_std"] == pytest.approx(0.1414213562)
    assert agg["b"]["val_acc_mean"] == pytest.approx(0.9) and agg["b"]["val_acc_std"] == 0.0


# --------------------------------------------------------------------------- running
GRID_2x2x2 = """\
base: spec.yaml
grid:
  stages.prune.pruner.name: [synflow, magnitude]
  stages.prune.pruner.density: [0.2, 0.5]
  stages.train.optimizer.ar: [1.0e-3, 1.0e-2]
set: {stages.train.epochs: 1}
"""


def _result_files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")}


def test_grid_2x2x2_two_workers_shares_prune_stages_and_resumes(tmp_path):
    p = _write(tmp_path, GRID_2x2x2)
    res = _cli("grid", str(p), "--dry-run")
    assert res.exit_code == 0, res.output
    assert "prune: 4 distinct directories for 8 runs" in res.output and "shared x2" in res.output
    assert not (tmp_path / "runs" / "tiny").exists()  # a dry run runs nothing

    g = G.load_grid(p)
    out = G.run_grid(g, workers=2)
    assert not out.failed
    stages = tmp_path / "runs" / "tiny"
    prune_dirs = sorted(d for d in stages.glob("prune-*") if d.is_dir())
    train_dirs = sorted(d for d in stages.glob("train-*") if d.is_dir())
    # one prune directory per (pruner, density, seed), complete; one train directory per run
    assert len(prune_dirs) == 4 and len(train_dirs) == 8
    assert all((d / "result.json").is_file() for d in prune_dirs + train_dirs)
    made = set()
    for d in prune_dirs:
        r = json.loads((d / "result.json").read_text())
        made.add((r["pruner"], round(r["density"], 1)))
    assert made == {("synflow", 0.2), ("synflow", 0.5), ("magnitude", 0.2), ("magnitude", 0.5)}
    s = out.results["summary"]
    assert (s["ok"], s["failed"], s["stages_ran"], s["stages_reused"]) == (8, 0, 12, 4)

    # the table: one row per run, in run order, with the varied keys and the final metrics
    rows = out.results["rows"]
    assert [r["run"] for r in rows] == list(range(1, 9))
    assert rows[5]["stages.prune.pruner.name"] == "magnitude" and rows[5]["stages.train.optimizer.ar"] == 0.01
    assert all(0.0 <= r["val_acc"] <= 1.0 and abs(r["density"] - r["stages.prune.pruner.density"]) < 0.01 for r in rows)
    # runs 1 and 2 share the prune directory, not the train one
    assert rows[0]["stages"]["prune"] == rows[1]["stages"]["prune"] and rows[0]["stages"]["train"] != rows[1]["stages"]["train"]
    with open(g.dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and table[7]["stages.prune.pruner.density"] == "0.5" and table[7]["status"] == "ok"
    assert g.dir == tmp_path / "runs" / "grid" and (g.dir / "logs" / "run-0001.log").is_file()

    # a second invocation recomputes nothing: no stage result rewritten, no new directory
    before = _result_files(stages)
    res = _cli("grid", str(p), "--workers", "2")
    assert res.exit_code == 0, res.output
    assert _result_files(stages) == before
    assert len(list(stages.glob("*-*/"))) == 12
    again = json.loads((g.dir / "results.json").read_text())
    assert again["summary"]["stages_ran"] == 0 and again["summary"]["stages_reused"] == 16
    assert [r["val_acc"] for r in again["rows"]] == [r["val_acc"] for r in rows]
    assert "8 ok, 0 failed" in res.output and "0 ran, 16 reused" in res.output

    # `pab results DIR` prints it again from disk
    res = _cli("results", str(g.dir))
    assert res.exit_code == 0 and "magnitude" in res.output and "8 of 8 runs" in res.output


def test_a_grid_run_with_set_keeps_its_own_results(tmp_path):
    """`pab grid G --set k=v` writes to `<grid name>+k=v/` and records the --set; the results of
    the grid as written (or with another --set) are never overwritten."""
    p = _write(tmp_path, "base: spec.yaml\ngrid: {stages.prune.pruner.density: [0.2, 0.5]}\nset: {stages.train.epochs: 1}\n")
    assert _cli("grid", str(p)).exit_code == 0
    plain = tmp_path / "runs" / "grid" / "results.json"
    before = plain.read_bytes()
    res = _cli("grid", str(p), "--set", "stages.train.optimizer.ar=0.01")
    assert res.exit_code == 0, res.output
    mine = tmp_path / "runs" / "grid+stages.train.optimizer.ar=0.01" / "results.json"
    assert "--set stages.train.optimizer.ar=0.01" in res.output and "grid+stages.train.optimizer.ar=0.01" in res.output
    assert plain.read_bytes() == before  # untouched
    assert json.loads(mine.read_text())["overrides"] == ["stages.train.optimizer.ar=0.01"] and json.loads(before)["overrides"] == []
    assert "--set stages.train.optimizer.ar=0.01" in _cli("results", str(mine.parent)).output
    odd = G.load_grid(p, ["model.hidden=[16]"])
    assert odd.dir.name.startswith("grid+set-") and "/" not in odd.dir.name  # a value no folder name can hold: a hash


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path):
    # run 3's image folder passes the check before the grid starts (train/ and val/ hold class
    # folders) but has no images: its train stage fails when it builds the data
    from test_missing_data import image_folder

    unusable = image_folder(tmp_path / "no-images-here", empty=True)
    p = _write(
        tmp_path,
        "base: spec.yaml\n"
        "grid:\n  seed: [0]\n"
        "zip:\n"
        "  stages.train.optimizer.ar: [1.0e-3, 1.0e-2, 1.0e-3]\n"
        f"  data: [{{name: digits, batch_size: 128}}, {{name: digits, batch_size: 64}}, {{name: imagefolder, root: {unusable}, image_size: 8}}]\n"
        "set: {stages.train.epochs: 1, stages.prune.pruner.name: magnitude}\n",
    )
    res = _cli("grid", str(p), "--workers", "2")
    assert res.exit_code == 1, res.output
    results = json.loads((tmp_path / "runs" / "grid" / "results.json").read_text())
    status = {r["run"]: r["status"] for r in results["rows"]}
    assert status == {1: "ok", 2: "ok", 3: "failed"}
    bad = results["rows"][2]
    assert "is unusable" in bad["error"] and str(unusable) in bad["error"]
    assert bad["val_acc"] is None
    assert all(r["val_acc"] is not None for r in results["rows"][:2])
    assert "run 3 failed" in res.output and "2 ok, 1 failed" in res.output
    # the failed run's stage is incomplete; the others' are complete
    trains = list((tmp_path / "runs" / "tiny").glob("train-*/"))
    assert sum((d / "result.json").is_file() for d in trains) == 2


# --------------------------------------------------------------------------- the stage lock
def _race(spec_path: str, barrier, queue) -> None:
    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.specification import load_spec

    spec = load_spec(spec_path)
    barrier.wait()
    outcomes = run_spec(spec, reporter=Reporter(mode="none"))
    queue.put([(o.stage_id, o.reused) for o in outcomes])


def test_two_processes_compute_a_stage_once(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC.replace("iterations: 5", "iterations: 200"))
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(spec), barrier, queue)) for _ in range(2)]
    for pr in procs:
        pr.start()
    got = [queue.get(timeout=120) for _ in procs]
    for pr in procs:
        pr.join(timeout=60)
        assert pr.exitcode == 0
    for stage in ("prune", "train"):
        reused = sorted(dict(g)[stage] for g in got)
        assert reused == [False, True], got  # one computed it, the other waited and reused it
    assert len(list((tmp_path / "runs" / "tiny").glob("prune-*/"))) == 1


# --------------------------------------------------------------------------- SLURM through submitit
def test_submitit_local_executor_runs_the_grid(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = _write(tmp_path, "base: spec.yaml\ngrid:\n  stages.prune.pruner.name: [magnitude, random]\nset: {stages.train.epochs: 1}\nslurm: {time: 10}\n")
    g = G.load_grid(p)
    out = G.run_grid(g, executor="slurm", cluster="local")
    assert not out.failed, out.records
    assert [r["status"] for r in out.results["rows"]] == ["ok", "ok"]
    assert all(r.get("job_id") for r in out.records.values())
    assert len(list((tmp_path / "runs" / "tiny").glob("prune-*/result.json"))) == 2


@pytest.mark.parametrize("signame", ["SIGUSR2", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_a_preempted_slurm_run_checkpoints_is_requeued_and_resumes(tmp_path, monkeypatch, signame):
    """submitit's local executor as the cluster: SIGUSR2 (SLURM's warning ahead of a time limit) or
    SIGTERM (a pre-emption) reaches the job mid-epoch; pab writes its checkpoint and stops, the job
    hands SIGUSR2 to submitit, which requeues it through the run's checkpoint(); the requeued job
    resumes and ends with bitwise the weights of an uninterrupted run."""
    from pab_framework.pipeline import run_spec
    from pab_framework.specification import load_spec

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(HOOKS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PAB_TEST_SIGNAL", f"0:step:18:{signame}")  # epoch 2, step 6 of 12
    monkeypatch.setenv("PAB_TEST_ONCE", str(tmp_path / "preempted"))  # once: the requeued job runs through
    spec = TINY_SPEC
    p = _write(tmp_path, "base: spec.yaml\ngrid: {seed: [0]}\nslurm: {time: 10}\n", spec)
    out = G.run_grid(G.load_grid(p), executor="slurm", cluster="local")
    assert not out.failed, out.records
    assert (tmp_path / "preempted").is_file()  # the signal was sent
    log = (tmp_path / "runs" / "grid" / "logs" / "run-0001.log").read_text()
    assert f"{signame} at epoch 2, step 6; checkpoint written" in log  # the first job
    assert "resuming train (train) from" in log and "at epoch 2, step 6/12" in log  # the requeued one
    job_out = "".join(f.read_text() for f in (tmp_path / "runs" / "grid" / "slurm").rglob("*_log.out"))
    assert "Requeued job" in job_out, job_out[-2000:]  # through submitit's own protocol
    (train,) = (tmp_path / "runs" / "tiny").glob("train-*")
    assert json.loads((train / "result.json").read_text())["resumed"] is True
    monkeypatch.delenv("PAB_TEST_SIGNAL")
    (tmp_path / "whole.yaml").write_text(spec.replace("output_dir: runs", "output_dir: whole"))
    whole = {o.stage_id: o.dir for o in run_spec(load_spec(tmp_path / "whole.yaml"))}["train"]
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(train / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def test_slurm_job_is_built_without_submitting(tmp_path):
    pytest.importorskip("submitit")
    p = _write(
        tmp_path,
        "base: spec.yaml\ngrid: {seed: [0, 1, 2]}\n"
        "slurm: {partition: gpu, time: '02:30:00', gpus_per_node: 1, cpus_per_task: 8, mem_gb: 30, array_parallelism: 2,\n"
        "        setup: ['module load cuda'], additional: {mail-type: END}}\n",
    )
    g = G.load_grid(p)
    script = G.sbatch_script(g)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=150", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=30GB", "#SBATCH --array=0-2%2", "#SBATCH --job-name=pab-grid", "#SBATCH --mail-type=END", "module load cuda"):
        assert line in script, (line, script)
    assert "submitit.core._submit" in script
    res = _cli("grid", str(p), "--executor", "slurm", "--dry-run", "--partition", "big", "--time", "30")
    assert res.exit_code == 0 and "#SBATCH --partition=big" in res.output and "#SBATCH --time=30" in res.output
    if shutil.which("srun") is None:  # no SLURM here: submitting says so in one line
        with pytest.raises(PabError, match="cannot submit to SLURM from here"):
            G.make_submitit_executor(g, "slurm")
    bad = _write(tmp_path, "base: spec.yaml\nslurm: {partiton: gpu}\n")
    with pytest.raises(G.GridError, match=r"grid.yaml:2, slurm.partiton: unknown key 'partiton'; did you mean 'partition'"):
        G.load_grid(bad)


def test_ablation_pruners_config_expands_to_the_seed_comparison():
    from pab_framework.registry import registry
    from pab_framework.yamlio import load_yaml_file

    path = ROOT / "configs" / "ablation_pruners.yaml"
    data = load_yaml_file(path).data
    combos = G.expand(data["grid"], data["zip"])
    assert len(combos) == 45
    assert {c["stages.prune.pruner.name"] for c in combos} == {"synflow", "snip", "grasp", "magnitude", "random"}
    assert all(c["stages.prune.pruner.iterations"] == (100 if c["stages.prune.pruner.name"] == "synflow" else 1) for c in combos)
    from pab_framework.specification import load_spec

    base = load_spec(ROOT / "configs" / "cifar10_r18_pab.yaml")  # the seed's recipe validates
    train = base.stages["train"].params
    assert (train.epochs, train.optimizer.params.ar, train.optimizer.params.tau) == (180, 1e-3, 1e-6)
    assert train.optimizer.params.rest.params.milestones == [80, 120] and base.stages["prune"].params.pruner.iterations == 100
    reg = registry()
    if any(n in reg.broken("pab.pruners") or n not in reg.entries("pab.pruners") for n in ("snip", "grasp")):
        pytest.skip("the snip/grasp pruner module is not on this branch")
    g = G.load_grid(path)  # every run validates against the base spec
    assert len(g.runs) == 45 and g.runs[0].spec.model.name == "cifar_resnet18"
