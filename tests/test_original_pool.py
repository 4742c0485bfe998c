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
from pab_framework.errors import PabError
from pab_framework.masking import kept_count
from pab_framework.modelutil import prunable_parameters
from pab_framework.progress import Reporter
from pab_framework.specification import load_spec
from pab_framework.yamlio import load_yaml_file
from pab_plugins.pruners.saliency import SNIP, GraSP
from pab_plugins.stages.prune import pruning_batches

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
    from pab_plugins.pruners.basic import Magnitude

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    call = masking.MaskPolicy(density=0.5, iterations=2, classifier_density=1.0)
    inputs = masking.PruneInputs(input_shape=(20,), num_classes=3)
    before = {"3.weight": torch.rand(3, 8) < 0.5}
    got = masking.prune(net, Magnitude(), Magnitude.Params(), call, inputs, masks=before)
    assert list(got) == ["1.weight", "3.weight"]  # module order, as always
    assert torch.equal(got["3.weight"], before["3.weight"]) and int(got["1.weight"].sum()) == kept_count(0.5, 160)
    only = masking.prune(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 3)), Magnitude(), Magnitude.Params(), call, inputs)
    assert list(only) == ["1.weight"] and bool(only["1.weight"].all())


# --------------------------------------------------------------------------- the ImageNet recipe
# The original's ImageNet ResNet-50 (models/masked_imagenet_resnet.py) masks conv1, the three
# convolutions of every bottleneck and fc; its four shortcut convolutions are plain nn.Conv2d
# (`conv1x1(..., masked=False)` in `_make_layer`): outside the pool, neither scored nor pruned.
R50_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
ORIGINAL_R50_POOL = ["conv1.weight", *[f"{layer}.{b}.conv{c}.weight" for layer, n in R50_BLOCKS.items() for b in range(n) for c in (1, 2, 3)],
                     "fc.weight"]
R50_SHORTCUTS = [f"layer{i}.0.downsample.0.weight" for i in (1, 2, 3, 4)]
IMAGENET_SETS = ["data.name=synthetic", "data.num_classes=1000", "data.image_size=32", "data.train_size=8", "data.val_size=8",
                 "runtime.device=cpu", "runtime.nproc_per_node=1", "runtime.num_workers=0"]


def _imagenet_prune(tmp_path, sets=()):
    spec = load_spec(CONFIGS / "imagenet_r50.yaml", [*IMAGENET_SETS, *sets])
    d = tmp_path / f"prune{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    ctx = _Ctx(spec, "prune", spec.stages["prune"], "", d, {}, torch.device("cpu"), Reporter(mode="none"))
    result = spec.stages["prune"].plugin.run(ctx)
    _, masks = artifacts.load_model_artifact(d / artifacts.MODEL)
    return spec, ctx, result, masks


@pytest.fixture(scope="module")
def r50_pruned(tmp_path_factory):
    """The shipped ImageNet recipe's prune stage (one round: the pool does not depend on the rounds)."""
    return _imagenet_prune(tmp_path_factory.mktemp("r50"), ["stages.prune.pruner.iterations=1"])


def test_imagenet_recipe_prunes_the_original_resnet50_pool(r50_pruned):
    assert len(ORIGINAL_R50_POOL) == 50
    assert load_yaml_file(CONFIGS / "imagenet_r50.yaml").data["stages"]["prune"]["pruner"]["exclude"] == ["*.downsample.*"]
    _, _, result, masks = r50_pruned
    # the shortcuts are recorded as excluded and stay dense; everything else is the original's pool
    assert result["excluded"] == R50_SHORTCUTS
    assert all(bool(masks[n].all()) for n in R50_SHORTCUTS)
    pool = [n for n in masks if n not in result["excluded"]]
    assert pool == ORIGINAL_R50_POOL
    n = sum(masks[c].numel() for c in pool)
    assert sum(int(masks[c].sum()) for c in pool) == kept_count(0.5, n)  # the density is the pool's, as the original's
    assert result["pool_density"] == kept_count(0.5, n) / n


def test_bop_still_trains_the_excluded_shortcuts(r50_pruned):
    """As the original's get_bop_params (every nn.Conv2d): `owns: conv` takes the dense shortcuts too."""
    from pab_framework.optim import OptimizerContext

    spec, ctx, _, masks = r50_pruned
    model = ctx.build_model()
    named = list(model.named_parameters())
    modules = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
    octx = OptimizerContext(named, masks, 1, 1, modules)
    call = spec.stages["train"].params.optimizer
    assert call.name == "bop" and call.params.owns == "conv"
    opt = call.plugin.build(call.params, octx)
    convs = [n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)]
    assert set(opt.sign_params) == set(convs) and set(R50_SHORTCUTS) <= set(opt.sign_params)
    assert "fc.weight" not in opt.sign_params  # the classifier goes to SGD, as the original's non-Bop params


def test_excluded_layers_leave_the_pool_as_the_original_loop_does():
    """`exclude` on a small ResNet (its shortcuts): the masks are those of the original's loop over
    the pool without them, the shortcuts stay dense, and the other layers' masks differ from a
    pool that holds the shortcuts (they moved the global threshold)."""
    from pab_framework.modelutil import initialise
    from pab_plugins.models.resnet_cifar import cifar_resnet18
    from prune_speed import ours

    torch.manual_seed(0)
    model = cifar_resnet18(width=8)
    initialise(model, "kaiming_normal", "conv")
    excl = ("*.shortcut.*",)
    shortcuts = masking.excluded_names(list(prunable_parameters(model)), excl)["*.shortcut.*"]
    assert len(shortcuts) == 3
    got = ours(model, (3, 32, 32), 0.3, ROUNDS, num_classes=10, exclude=excl)
    want = baseline_synflow(model, (3, 32, 32), 0.3, ROUNDS, original_pool(model, 10, True, excl))
    assert set(want) == set(got) - set(shortcuts)
    assert all(bool(got[n].all()) for n in shortcuts) and all(torch.equal(got[n], want[n]) for n in want)
    pooled = ours(model, (3, 32, 32), 0.3, ROUNDS, num_classes=10)
    assert not all(bool(pooled[n].all()) for n in shortcuts) and any(not torch.equal(pooled[n], got[n]) for n in want)
    with pytest.raises(PabError, match="'nothing.*' matches no prunable parameter"):
        ours(model, (3, 32, 32), 0.3, 1, num_classes=10, exclude=("nothing.*",))


@pytest.mark.slow
def test_imagenet_recipe_matches_the_original_loop(tmp_path):
    """The shipped ImageNet recipe's prune stage (2 rounds) against the original's loop over the
    original's ResNet-50 pool, on the same initial weights: every mask entry agrees. Without the
    exclusion (as pab pruned before) the shortcuts are pruned and the other layers' masks move."""
    from prune_speed import R50_EXCLUDE

    _, ctx, result, masks = _imagenet_prune(tmp_path, ["stages.prune.pruner.iterations=2"])
    model = ctx.build_model()
    assert original_pool(model, 1000, True, R50_EXCLUDE) == ORIGINAL_R50_POOL
    want = baseline_synflow(model, (3, 32, 32), 0.5, 2, ORIGINAL_R50_POOL)
    assert all(torch.equal(masks[c], want[c]) for c in ORIGINAL_R50_POOL)
    _, _, pooled, pmasks = _imagenet_prune(tmp_path, ["stages.prune.pruner.iterations=2", "stages.prune.pruner.exclude=[]"])
    assert "excluded" not in pooled and not all(bool(pmasks[n].all()) for n in R50_SHORTCUTS)
    assert any(not torch.equal(pmasks[c], masks[c]) for c in ORIGINAL_R50_POOL)


def test_exclude_is_checked_against_the_model_and_keeps_old_keys():
    from pab_framework.errors import SpecError
    from pab_framework.pipeline import plan

    with pytest.raises(SpecError) as e:
        load_spec(CONFIGS / "imagenet_r50.yaml", [*IMAGENET_SETS, "stages.prune.pruner.exclude=['*.downsample.*', '*.shortcut.*']"])
    (p,) = e.value.problems
    assert p.path == ("stages", "prune", "pruner", "exclude", 1) and "'*.shortcut.*' matches no prunable parameter" in p.message
    # a spec that does not use the option keeps the stage keys it had before the option existed (the README's)
    quick = load_spec(CONFIGS / "quickstart.yaml", ["runtime.device=cpu"])
    assert [d.name for _, _, d, _ in plan(quick)] == ["prune-53ee8da65573", "train-b9b9475b0817"]
    excl = load_spec(CONFIGS / "quickstart.yaml", ["runtime.device=cpu", "stages.prune.pruner.exclude=['0.weight']"])
    assert plan(excl)[0][2].name != "prune-53ee8da65573"
