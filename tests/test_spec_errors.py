"""Each kind of bad input: one message naming the file, the line and the key path; exit 2."""
import pytest
from typer.testing import CliRunner

from pab_framework.cli import app
from conftest import TINY_SPEC

runner = CliRunner()


def _check(path, *needles, args=()):
    res = runner.invoke(app, ["validate", str(path), *args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, (n, res.output)
    return res.output


@pytest.mark.parametrize(
    "old,new,needles",
    [
        ("density: 0.3", "densty: 0.3", [":8", "stages.prune.pruner.density", "required key is missing", "'densty' a misspelling of 'density'"]),
        ("density: 0.3", "density: 1.5", [":8", "stages.prune.pruner.density", "less than or equal to 1"]),
        ("density: 0.3", "density: 0", ["stages.prune.pruner.density", "greater than 0"]),
        ("epochs: 2", "epochs: two", [":12", "stages.train.epochs", "integer"]),
        ("ar: 1.0e-3", "ar: 1.5", ["stages.train.optimizer.ar", "less than 1"]),
        ("tau: 1.0e-6", "tau: -1.0e-6", ["stages.train.optimizer.tau", "greater than or equal to 0"]),
        ("name: synflow", "name: synflw", [":8", "stages.prune.pruner.name", "unknown pruner 'synflw'", "did you mean 'synflow'", "magnitude"]),
        ("name: bop", "name: bopp", ["stages.train.optimizer.name", "did you mean 'bop'"]),
        ("after: [prune]", "after: [prun]", [":11", "stages.train.after[0]", "'prun'", "did you mean 'prune'"]),
        ("iterations: 5", "iterations: 5, scheduel: linear", [":8", "stages.prune.pruner.scheduel", "unknown key 'scheduel'", "did you mean 'schedule'"]),
        ("name: mlp", "name: resnet5", ["model.name", "unknown model"]),
        ("kind: train", "kind: trian", ["stages.train.kind", "did you mean 'train'"]),
        ("seed: 0", "seed: -1", [":2", "seed", "greater than or equal to 0"]),
        ("seed: 0", "sead: 0", [":2", "unknown key 'sead'", "did you mean 'seed'"]),
        ("device: cpu", "device: tpu", ["runtime.device", "'auto', 'cpu' or 'cuda'"]),
        ("hidden: [32]", "hidden: 32", ["model.hidden", "list"]),
        # a key inside a section that may be one of several shapes: the hint reads the model through the union
        ("after: [prune]", "after: [prune]\n    weights_from: {stage: prune, epok: 1}",
         [":12", "stages.train.weights_from.epok", "unknown key 'epok'; did you mean 'epoch'? Allowed here: stage, epoch, path"]),
    ],
)
def test_bad_values(write_spec, old, new, needles):
    assert old in TINY_SPEC
    p = write_spec(TINY_SPEC.replace(old, new, 1))
    _check(p, str(p), *needles)


def _lines_of(out: str) -> list[str]:
    return [l.strip()[2:] for l in out.splitlines() if l.strip().startswith("- ")]


def test_every_problem_in_one_run(write_spec):
    """A misspelt pruner name beside a bad density, a wrong runtime value (which fails the spec's
    structure before any plugin is looked up), an unknown model key, a nested optimizer and a
    dangling `after`: all reported at once, in file order, each once."""
    text = (TINY_SPEC.replace("name: synflow, density: 0.3", "name: synflw, density: -0.3")
            .replace("device: cpu", "device: tpu")
            .replace("hidden: [32]", "hidden: [32], hiden: 3")
            .replace("tau: 1.0e-6}", "tau: .inf, rest: {name: sgd, lr: -1, momentm: 0.9}}")
            .replace("after: [prune]", "after: [prun]"))
    p = write_spec(text)
    lines = _lines_of(_check(p))
    name = str(p)
    assert [l.split(": ", 1)[0] for l in lines] == [
        f"{name}:3, model.hiden",
        f"{name}:8, stages.prune.pruner.density",
        f"{name}:8, stages.prune.pruner.name",
        f"{name}:11, stages.train.after[0]",
        f"{name}:13, stages.train.optimizer.tau",
        f"{name}:13, stages.train.optimizer.rest.lr",
        f"{name}:13, stages.train.optimizer.rest.momentm",
        f"{name}:14, runtime.device",
    ], lines
    assert "unknown pruner 'synflw'; did you mean 'synflow'?" in lines[2]
    assert "must be a finite number (got inf)" in lines[4]  # once, not again as a range error
    # the same spec fixed one problem at a time loses exactly that line
    fixed = write_spec(text.replace("name: synflw", "name: synflow"), "fixed.yaml")
    assert len(_lines_of(_check(fixed))) == len(lines) - 1


def test_problems_inside_a_section_that_fails_validation(write_spec):
    """The prune stage's own Params fail (a bad density) and the train stage's (epochs), and
    still the plugins named inside them are looked up and their keys checked."""
    text = (TINY_SPEC.replace("density: 0.3", "density: 7")
            .replace("epochs: 2", "epochs: -1")
            .replace("optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}", "optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6, rest: {name: adamm}}"))
    out = _check(write_spec(text), "stages.prune.pruner.density", "stages.train.epochs", "stages.train.optimizer.rest.name: unknown optimizer 'adamm'")
    assert len(_lines_of(out)) == 3, out


def test_cycle(write_spec):
    text = TINY_SPEC.replace("    kind: prune\n", "    kind: prune\n    after: [train]\n")
    _check(write_spec(text), "cycle", "prune -> train -> prune")


def test_missing_section(write_spec):
    text = TINY_SPEC.replace("data: {name: digits, batch_size: 128}\n", "")
    _check(write_spec(text), "data", "required key is missing")


@pytest.mark.parametrize(
    "content,needle",
    [
        ("", "empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
        ("name: x\n  bad indent: 1\n", "not valid YAML"),
        ("a: !!python/object/apply:os.system ['true']\n", "Python tag is refused"),
    ],
)
def test_bad_files(write_spec, content, needle):
    _check(write_spec(content), needle)


def test_missing_file_and_directory(tmp_path):
    _check(tmp_path / "nope.yaml", "not found")
    _check(tmp_path, "is a directory")


def test_bad_override(write_spec):
    p = write_spec(TINY_SPEC)
    out = _check(p, "--set stages.prune.pruner.density=2", "stages.prune.pruner.density", args=["--set", "stages.prune.pruner.density=2"])
    assert str(p) + ":" not in out  # the value came from the command line, not the file


def test_run_exits_2_on_bad_spec(write_spec):
    p = write_spec(TINY_SPEC.replace("density: 0.3", "density: 3"))
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 2 and "stages.prune.pruner.density" in res.output
