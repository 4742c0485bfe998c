"""The foundation: a real prune -> Bop train run, the stage cache, and the CLI's contract."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pab_framework.cli import app
from conftest import TINY_SPEC
from pab_framework import artifacts
from pab_framework.pipeline import run_spec
from pab_framework.progress import Reporter
from pab_framework.specification import load_spec

runner = CliRunner()


def _run(spec_path, *extra):
    return runner.invoke(app, ["run", str(spec_path), *extra])


def _stage_dirs(root: Path, prefix: str) -> list[Path]:
    return sorted(p for p in (root / "runs" / "tiny").glob(f"{prefix}-*") if p.is_dir())


@pytest.fixture
def tiny_run(write_spec, tmp_path):
    spec = write_spec(TINY_SPEC)
    res = _run(spec)
    assert res.exit_code == 0, res.output
    prune_dir = _stage_dirs(tmp_path, "prune")[0]
    train_dir = _stage_dirs(tmp_path, "train")[0]
    return spec, prune_dir, train_dir, res.output


def test_run_writes_every_artifact(tiny_run):
    spec, prune_dir, train_dir, output = tiny_run
    for d in (prune_dir, train_dir):
        assert (d / "spec.yaml").is_file() and (d / "result.json").is_file() and (d / "model.pt").is_file()
        obj = torch.load(d / "model.pt", weights_only=True)
        assert set(obj) >= {"state_dict", "masks"}
        assert all(m.dtype == torch.bool for m in obj["masks"].values())
    result = json.loads((train_dir / "result.json").read_text())
    assert abs(result["density"] - 0.3) < 1e-3
    assert 0.0 <= result["val_acc"] <= 1.0
    lines = [json.loads(l) for l in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert all({"train_loss", "val_acc", "flips"} <= set(l) for l in lines)
    assert "results" in output and "val_acc" in output


def test_bop_changes_no_magnitude_and_keeps_pruned_weights_zero(tiny_run):
    _, prune_dir, train_dir, _ = tiny_run
    before, masks = artifacts.load_model_artifact(prune_dir / "model.pt")
    after, masks_after = artifacts.load_model_artifact(train_dir / "model.pt")
    flipped = 0
    for name, m in masks.items():
        assert torch.equal(masks_after[name], m)  # masks survive the hand-over
        assert torch.equal(after[name].abs(), before[name].abs()), name
        assert torch.all(after[name][~m] == 0), name
        flipped += int((torch.sign(after[name]) != torch.sign(before[name])).sum())
    assert flipped > 0  # Bop did train the signs


def test_second_run_reuses_every_stage(tiny_run):
    spec, prune_dir, train_dir, _ = tiny_run
    mtime = (train_dir / "model.pt").stat().st_mtime_ns
    res = _run(spec)
    assert res.exit_code == 0, res.output
    assert res.output.count("reused") >= 2
    assert (train_dir / "model.pt").stat().st_mtime_ns == mtime
    # a change downstream keeps the upstream stage
    res = _run(spec, "--set", "stages.train.epochs=1")
    assert res.exit_code == 0, res.output
    assert "reused prune" in res.output and "running train" in res.output


def test_force_recomputes(tiny_run):
    spec, _, train_dir, _ = tiny_run
    res = _run(spec, "--force")
    assert res.exit_code == 0 and "reused" not in res.output


def test_synflow_reaches_density_and_ignores_data(write_spec, tmp_path):
    a = load_spec(write_spec(TINY_SPEC.replace("epochs: 2", "epochs: 1"), "a.yaml"))
    b_text = TINY_SPEC.replace("data: {name: digits, batch_size: 128}", "data: {name: digits, batch_size: 32, val_fraction: 0.5, split_seed: 7}")
    b = load_spec(write_spec(b_text.replace("name: tiny", "name: tiny_b"), "b.yaml"))
    quiet = Reporter(mode="none")
    masks = []
    for s in (a, b):
        s.stages.pop("train")
        out = run_spec(s, reporter=quiet)
        _, m = artifacts.load_model_artifact(out[0].dir / "model.pt")
        masks.append(m)
        kept = sum(int(x.sum()) for x in m.values())
        total = sum(x.numel() for x in m.values())
        assert abs(kept - round(0.3 * total)) <= len(m)
    for k in masks[0]:
        assert torch.equal(masks[0][k], masks[1][k])


def test_overrides_and_validate(write_spec):
    spec = write_spec(TINY_SPEC)
    s = load_spec(spec, ["seed=3", "stages.train.optimizer.ar=2e-3", "stages.prune.pruner.density=0.5"])
    assert s.seed == 3 and s.stages["train"].params.optimizer.params.ar == 2e-3
    assert s.stages["prune"].params.pruner.density == 0.5
    res = runner.invoke(app, ["validate", str(spec)])
    assert res.exit_code == 0 and "valid" in res.output


def test_schema_lists_plugin_parameters():
    res = runner.invoke(app, ["schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    pruners = schema["$defs"]["PrunerCall"]
    names = {v["title"] for v in pruners["anyOf"]}
    assert {"synflow", "magnitude", "random"} <= names
    bop = next(v for v in schema["$defs"]["OptimizerCall"]["anyOf"] if v["title"] == "bop")
    assert {"ar", "tau", "rest"} <= set(bop["properties"])


def test_plugins_command_lists_builtins():
    res = runner.invoke(app, ["plugins"])
    assert res.exit_code == 0
    for name in ("synflow", "bop", "digits", "cifar_resnet18", "resnet50", "prune", "train"):
        assert name in res.output


def test_version_names_pab_torch_and_the_device():
    from importlib.metadata import version

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    assert f"pab {version('pab')}" in res.output and f"torch {torch.__version__}" in res.output
    assert ("device cuda" if torch.cuda.is_available() else "device cpu") in res.output


@pytest.mark.parametrize("command,usage", [
    ([], "Usage: pab [OPTIONS] COMMAND"),
    (["run"], "Usage: pab run [OPTIONS] SPEC"),
    (["validate"], "Usage: pab validate [OPTIONS] SPEC"),
    (["grid"], "Usage: pab grid [OPTIONS] GRID"),
    (["results"], "Usage: pab results [OPTIONS] DIR"),
    (["report"], "Usage: pab report [OPTIONS] RUN_DIR"),
])
def test_help_reads_as_words(command, usage):
    """No `<bool>` after a flag, no `{spec}` in the usage line; values named by words."""
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}, prog_name="pab")
    assert res.exit_code == 0, res.output
    assert usage in res.output, res.output
    assert "<bool>" not in res.output and "{" not in res.output, res.output
    if command == ["run"]:
        assert "KEY=VALUE" in res.output and "MODE" in res.output
        # docstring paragraphs are reflowed, not cut where the source wraps them
        assert "under DistributedDataParallel, started through" in res.output


def test_plugin_descriptions_are_whole_sentences():
    from pab_framework.registry import first_sentence, registry

    assert first_sentence("One line.\n\n    More.") == "One line."
    assert first_sentence("A sentence that\n    wraps, e.g. here. Second one.") == "A sentence that wraps, e.g. here."
    assert first_sentence("No full stop at all\n    on two lines\n\n    Body.") == "No full stop at all on two lines"
    assert first_sentence("Ends with ... an ellipsis. Then.") == "Ends with ... an ellipsis."
    synflow = registry().entries("pab.pruners")["synflow"].summary
    assert synflow.startswith("Iterative Synaptic Flow") and synflow.endswith("(the linearised network).")
    res = runner.invoke(app, ["plugins"], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and "(the linearised network)." in res.output and "Data-independent" not in res.output
