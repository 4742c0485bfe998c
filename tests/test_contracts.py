"""The plugin contracts (pab_framework.contracts): checked by the registry at load time, and the
object the engine gets has every hook of its kind, the plugin's own or the contract's default."""
from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from conftest import ROOT, TINY_SPEC
from pab_framework import contracts, masking
from pab_framework import registry as R
from pab_framework.errors import SpecError
from pab_framework.specification import spec_from_dict
from pab_framework.yamlio import load_yaml_text


class _Params(BaseModel):
    pass


class Scoreless:
    """A pruner without score()."""

    Params = _Params


class Stage:
    """A stage kind with only what it must have."""

    Params = _Params

    def run(self, ctx) -> dict:
        return {}


class Keeper(Stage):
    """A stage kind that keeps the weights after epochs 0 and 2."""

    def kept_epochs(self, params):
        return [0, 2]


def test_every_kind_has_a_contract_and_every_builtin_keeps_it():
    assert list(contracts.GROUPS) == ["model", "dataset", "pruner", "optimizer", "quantizer", "transform", "stage", "exporter",
                                      "logger"]
    assert R.GROUPS is contracts.GROUPS  # the registry's kinds are the contracts' (one place to add a kind)
    reg = R.registry()
    for group, contract in contracts.CONTRACTS.items():
        assert contract.required, group
        assert "spec_problems" in contract.defaults  # every kind inherits the common hooks
        assert not reg.broken(group), reg.broken(group)
        for entry in reg.entries(group).values():
            bound = entry.plugin
            assert bound.name == entry.name and bound.plugin is entry.obj
            for member in (*contract.required, *contract.defaults):
                assert hasattr(bound, member), (group, entry.name, member)


def test_required_and_optional_members_read_off_the_protocols():
    stage = contracts.CONTRACTS["pab.stages"]
    assert stage.required == ("run",)
    assert set(stage.defaults) == {"spec_problems", "runtime_in_key", "key", "data_splits", "kept_epochs"}
    pruner = contracts.CONTRACTS["pab.pruners"]
    assert pruner.required == ("score",) and pruner.defaults["needs_data"] is True and pruner.defaults["linearized"] is False
    assert contracts.CONTRACTS["pab.datasets"].required == ("info", "build")
    assert contracts.CONTRACTS["pab.quantizers"].required == contracts.CONTRACTS["pab.transforms"].required == ("apply",)


def test_a_plugin_that_breaks_its_contract_is_listed_as_broken(monkeypatch):
    class NotAMethod(Stage):
        data_splits = ("train",)  # a hook must be a method

    plugins = {"scoreless": Scoreless, "stage_ok": Stage, "stage_bad": NotAMethod, "no_params": type("NoParams", (), {"run": Stage.run})}

    class Extensions:  # what stevedore hands the registry: name, loaded object, entry point
        def __init__(self, namespace, **kw):
            self.extensions = [SimpleNamespace(name=n, plugin=p, entry_point=SimpleNamespace(value=f"tests:{n}")) for n, p in plugins.items()
                               if (n == "scoreless") == (namespace == "pab.pruners")]

    monkeypatch.setattr(R, "ExtensionManager", Extensions)
    reg = R.Registry()
    broken = reg.broken("pab.pruners")
    assert broken["scoreless"].error == "it has no score() method, which every plugin in pab.pruners must provide"
    assert reg.names("pab.stages") == ["stage_ok"]
    bad = reg.broken("pab.stages")
    assert bad["stage_bad"].error == "its data_splits is not a method, which the pab.stages hook data_splits() must be"
    assert "not a pydantic model" in bad["no_params"].error
    with pytest.raises(Exception, match="stage plugin 'stage_bad' is installed but broken"):
        reg.get("pab.stages", "stage_bad")


def test_the_bound_plugin_has_every_hook():
    bare = contracts.bind("pab.stages", Stage())
    assert bare.data_splits(None) == ("train", "val") and bare.kept_epochs(None) is None and bare.runtime_in_key is False
    assert bare.spec_problems(None, None) == [] and bare.name == "Stage"
    view = SimpleNamespace(default=lambda runtime: {"runtime": runtime})
    assert bare.key(view) == {"runtime": False}  # the default key asks for the runtime numerics as the plugin says

    class Numerics(Stage):
        runtime_in_key = True

    assert contracts.bind("pab.stages", Numerics()).key(view) == {"runtime": True}
    keeper = contracts.bind("pab.stages", Keeper(), "keeper")
    assert keeper.kept_epochs(None) == [0, 2] and keeper.name == "keeper"
    assert contracts.bind("pab.stages", keeper) is keeper  # binding twice changes nothing
    assert keeper.run(None) == {}
    for again in (copy.deepcopy(keeper), pickle.loads(pickle.dumps(keeper))):  # copied and pickled as the plugin it binds
        assert type(again.plugin) is Keeper and again.plugin is not keeper.plugin
        assert again.kept_epochs(None) == [0, 2] and again.data_splits(None) == ("train", "val") and again.name == "keeper"


def test_a_pruner_passed_directly_gets_the_defaults():
    class Ones:
        Params = _Params

        def score(self, params, model, prunable, inputs):
            return {}  # no scores: the framework names the pruner

    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    inputs = masking.PruneInputs(input_shape=(4,), num_classes=3)
    policy = masking.MaskPolicy(density=0.5)
    bound = contracts.bind("pab.pruners", Ones())
    assert bound.needs_data is True and bound.linearized is False
    with pytest.raises(Exception, match="pruner Ones returned no score"):
        masking.prune(net, Ones(), _Params(), policy, inputs)


def test_rewinding_asks_the_stage_kind_which_epochs_it_keeps(monkeypatch):
    reg = R.registry()
    entries, _ = reg._load("pab.stages")  # noqa: SLF001 - test-only kinds beside the installed ones
    monkeypatch.setitem(entries, "keeper_test", R.Entry("keeper_test", "pab.stages", "tests:Keeper", Keeper()))
    monkeypatch.setitem(entries, "plain_test", R.Entry("plain_test", "pab.stages", "tests:Stage", Stage()))
    data = load_yaml_text(TINY_SPEC, "spec.yaml").data
    data["stages"] = {"k": {"kind": "keeper_test"}, "p": {"kind": "plain_test"},
                      "r": {"kind": "evaluate", "after": ["k"], "weights_from": {"stage": "k", "epoch": 2}}}
    spec = spec_from_dict(copy.deepcopy(data))
    assert spec.stages["r"].dependencies() == ["k"]
    data["stages"]["r"]["weights_from"]["epoch"] = 1
    with pytest.raises(SpecError, match=r"stages.r.weights_from.epoch: stage 'k' keeps no weights after epoch 1, only after epochs \[0, 2\]"):
        spec_from_dict(copy.deepcopy(data))
    data["stages"]["r"]["weights_from"] = {"stage": "p", "epoch": 0}
    with pytest.raises(SpecError, match=r"stage 'p' \(plain_test\) keeps no weights per epoch"):
        spec_from_dict(copy.deepcopy(data))


def test_the_plugin_guide_points_at_every_contract():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    for contract in contracts.CONTRACTS.values():
        assert f"`{contract.protocol.__name__}`" in guide and f"`{contract.group}`" in guide
