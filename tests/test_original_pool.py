"""The seed's CIFAR recipe prunes exactly the original code's pool.

The original CIFAR ResNet-18 builds its classifier as a plain nn.Linear: never pruned, and not part
of the global score pool. configs/cifar10_r18_pab.yaml (and the grid built on it) says
`classifier_density: 1.0`, which keeps the classifier out of the pool altogether. Its prune stage,
run here for a few rounds as shipped, must keep every classifier weight, prune the convolutions
exactly as the original's loop does, and give conv masks that do not depend on the classifier's
own scores.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from conftest import CONFIGS, ROOT
from pab_framework import artifacts, masking
from pab_framework.context import StageContext
from pab_framework.masking import kept_count
from pab_framework.progress import Reporter
from pab_framework.spec import load_spec
from pab_framework.yamlio import load_yaml_file
from plugins.pruners.saliency import SNIP, GraSP
from plugins.stages.prune import pruning_batches

sys.path.insert(0, str(ROOT / "benchmarks"))
from prune_speed import baseline_synflow, original_pool  # noqa: E402  the original's loop, written out

ROUNDS = 3
CLS = "linear.weight"


class _Ctx(StageContext):
    """The prune stage's context with a hook on the freshly built model."""

    tweak = None

    def build_model(self):
        model = super().build_model()
        if self.tweak is not None:
            self.tweak(model)
        return model


def prune_stage(tmp_path, sets=(), tweak=None):
    """Run the recipe's prune stage (the shipped spec, ROUNDS rounds); returns (model, masks)."""
    spec = load_spec(CONFIGS / "cifar10_r18_pab.yaml", [f"stages.prune.pruner.iterations={ROUNDS}", "runtime.device=cpu", *sets])
    d = tmp_path / f"prune{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    ctx = _Ctx(spec, "prune", spec.stages["prune"], "", d, {}, torch.device("cpu"), Reporter(mode="none"))
    ctx.tweak = tweak
    spec.stages["prune"].plugin.run(ctx)
    _, masks = artifacts.load_model_artifact(d / artifacts.MODEL)
    return ctx.build_model(), masks


def concentrate(model):
    """Give the classifier a very different score distribution while leaving every conv score as
    it was: each input column's |weights| summed into its first row (SynFlow's conv scores see
    the classifier only through these column sums), the other rows zero."""
    w = model.linear.weight
    with torch.no_grad():
        s = w.abs().sum(0)
        w.zero_()
        w[0] = s


def test_the_recipe_and_its_grid_keep_the_classifier_out_of_the_pool():
    assert load_yaml_file(CONFIGS / "cifar10_r18_pab.yaml").data["stages"]["prune"]["pruner"]["classifier_density"] == 1.0
    grid = load_yaml_file(CONFIGS / "ablation_pruners.yaml").data
    assert grid["base"] == "cifar10_r18_pab.yaml"
    assert not any("classifier_density" in k for k in [*grid.get("grid", {}), *grid.get("zip", {})])  # inherited by every run
    # the CIFAR comparison grid's PaB methods prune with the seed's pool too
    methods = load_yaml_file(CONFIGS / "compare_hidden_cifar10.yaml").data["variants"]["method"]
    for m in ("pab", "pab_psg"):
        assert methods[m]["stages"]["prune"]["pruner"]["classifier_density"] == 1.0, m


@pytest.mark.parametrize("width", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_prune_stage_keeps_the_classifier_and_matches_the_original_loop(tmp_path, width):
    """The recipe's CIFAR ResNet-18 (width 64 as shipped, in the slow set; 16 in the fast one)."""
    w = [f"model.width={width}"]
    model, masks = prune_stage(tmp_path, w)
    assert bool(masks[CLS].all()), "every classifier weight is kept"
    convs = [n for n in masks if n != CLS]
    n = sum(masks[c].numel() for c in convs)
    assert sum(int(masks[c].sum()) for c in convs) == kept_count(0.3, n)  # density 0.3 of the convolutions alone
    # the original's loop over its pool (the convolutions) gives the same conv masks
    want = baseline_synflow(model, (3, 32, 32), 0.3, ROUNDS, original_pool(model, 10, classifier=False))
    assert set(want) == set(convs)
    assert all(torch.equal(masks[c], want[c]) for c in convs)

    # no conv mask depends on the classifier's own scores: reshaping them changes nothing ...
    _, same = prune_stage(tmp_path, w, tweak=concentrate)
    assert bool(same[CLS].all()) and all(torch.equal(masks[c], same[c]) for c in convs)
    # ... while a classifier in the pool (as pab pruned before) moves the conv threshold
    _, pooled = prune_stage(tmp_path, [*w, "stages.prune.pruner.classifier_density=null"])
    _, pooled2 = prune_stage(tmp_path, [*w, "stages.prune.pruner.classifier_density=null"], tweak=concentrate)
    assert not bool(pooled2[CLS].all())
    assert any(not torch.equal(pooled[c], pooled2[c]) for c in convs)


def _scores_over(model, names, inputs, pruner):
    work = copy.deepcopy(model).double().eval()
    ps = dict(work.named_parameters())
    return pruner.score(pruner.Params(), work, {n: ps[n] for n in names}, inputs)


@pytest.mark.parametrize("pruner", [SNIP(), GraSP()], ids=["snip", "grasp"])
def test_data_pruners_score_the_original_pool(tmp_path, pruner):
    """SNIP's normaliser and GraSP's H g are sums over the pool: the classifier must not enter
    them. The recipe's prune stage with either pruner gives the masks of that pruner's scores over
    the convolutions alone, one global threshold."""
    name = type(pruner).__name__.lower()
    sets = [f"stages.prune.pruner.name={name}", "stages.prune.pruner.iterations=1", "stages.prune.pruner.batch_size=8",
            "data.name=synthetic", "data.train_size=16", "model.width=8"]
    model, masks = prune_stage(tmp_path, sets)
    assert bool(masks[CLS].all())
    spec = load_spec(CONFIGS / "cifar10_r18_pab.yaml", ["runtime.device=cpu", *sets])
    inputs = masking.PruneInputs(input_shape=(3, 32, 32), num_classes=10,
                                 batches=pruning_batches(spec.data.plugin.build(spec.data.params, "train"), 1, 8, spec.seed))
    convs = [n for n in masks if n != CLS]

    def masks_from(scores):
        flat = torch.cat([scores[c].reshape(-1) for c in convs])
        keep = masking.keep_top(flat, kept_count(0.3, flat.numel()))
        return dict(zip(convs, (k.view_as(masks[c]) for k, c in zip(keep.split([masks[c].numel() for c in convs]), convs))))

    want = masks_from(_scores_over(model, convs, inputs, pruner))
    assert all(torch.equal(masks[c], want[c]) for c in convs)
    if name == "grasp":  # with the classifier in H g, the conv scores (and masks) would differ
        other = masks_from(_scores_over(model, [*convs, CLS], inputs, pruner))
        assert any(not torch.equal(other[c], want[c]) for c in convs)


def test_a_whole_classifier_keeps_the_mask_it_came_with():
    from plugins.pruners.basic import Magnitude

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    call = masking.MaskPolicy(density=0.5, iterations=2, classifier_density=1.0)
    inputs = masking.PruneInputs(input_shape=(20,), num_classes=3)
    before = {"3.weight": torch.rand(3, 8) < 0.5}
    got = masking.prune(net, Magnitude(), Magnitude.Params(), call, inputs, masks=before)
    assert list(got) == ["1.weight", "3.weight"]  # module order, as always
    assert torch.equal(got["3.weight"], before["3.weight"]) and int(got["1.weight"].sum()) == kept_count(0.5, 160)
    only = masking.prune(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 3)), Magnitude(), Magnitude.Params(), call, inputs)
    assert list(only) == ["1.weight"] and bool(only["1.weight"].all())
