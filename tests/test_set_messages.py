"""What a user who typed the wrong thing is told: a grid file given to `pab run`, a spec given to
`pab grid`, and `--set` typos (a stage that does not exist, a plugin changed by name alone, a
key at the wrong level), each one clear message at the --set or file, exit code 2."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import CONFIGS
from pab_framework.cli import app
from pab_framework.errors import SpecError
from pab_framework.specification import load_spec


def pab(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_a_grid_file_given_to_run_says_use_pab_grid():
    grid = CONFIGS / "compare_hidden_digits.yaml"
    code, text = pab("run", grid)
    assert code == 2 and text.count("error") == 1, text
    assert "this is a grid file" in text and f"pab grid {grid}" in text and "${density}" not in text
    code, text = pab("validate", grid)  # validate knows grid files and checks every run
    assert code == 0 and "a valid grid" in text


def test_a_spec_given_to_grid_says_use_pab_run():
    code, text = pab("grid", CONFIGS / "quickstart.yaml")
    assert code == 2 and "this is an experiment spec" in text and "pab run" in text
    assert "unknown key" not in text and "base: required" not in text


def problems(*sets):
    with pytest.raises(SpecError) as e:
        load_spec(CONFIGS / "quickstart.yaml", list(sets))
    return e.value.problems


def test_a_misspelt_stage_is_blamed_on_the_set_with_a_did_you_mean():
    ps = problems("stages.trian.epochs=3")
    assert all(p.source == "--set stages.trian.epochs=3" and p.line is None for p in ps)  # not configs/quickstart.yaml:9
    assert ps[0].path == ("stages", "trian") and "did you mean 'train'?" in ps[0].message
    # a stage meant to be new is not taken for a typo: its own problems, at its --set
    (p,) = problems("stages.extra.kind=evaluate", "stages.extra.after=[nope]")
    assert "did you mean" not in p.message and p.source == "--set stages.extra.after=[nope]"
    load_spec(CONFIGS / "quickstart.yaml", ["stages.extra.kind=evaluate", "stages.extra.after=[train]"])  # and it works


def test_changing_a_plugin_by_name_alone_says_a_key_merges_and_a_mapping_replaces():
    (p,) = problems("stages.train.optimizer.name=adam")
    assert p.source == "--set stages.train.optimizer.name=adam" and p.path == ("stages", "train", "optimizer", "name")
    assert "takes no ar, tau, ar_decay, rest" in p.message and "a mapping given whole replaces it" in p.message
    assert "weight_decay" not in p.message  # no far-fetched did-you-mean for the old plugin's keys
    spec = load_spec(CONFIGS / "quickstart.yaml", ["stages.train.optimizer={name: adam, lr: 0.001}"])  # what it suggests works
    assert spec.stages["train"].params.optimizer.name == "adam"


def test_a_key_set_at_the_wrong_level_points_where_it_stands():
    (p,) = problems("epochs=3")
    assert "did you mean stages.train.epochs?" in p.message and "Allowed here: name, seed" in p.message
    (p,) = problems("stages.train.epoch=3")  # a near miss keeps its own did-you-mean
    assert "did you mean 'epochs'?" in p.message
