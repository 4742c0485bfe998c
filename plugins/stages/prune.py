"""`prune`: score the initialised network and keep `density` of its prunable weights."""
from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from pab_framework import masking
from pab_framework.errors import DataError
from pab_framework.modelutil import apply_masks_, build_model, classifier_name, density_of, prunable_parameters
from pab_framework.spec import PrunerCall


class PruneStage:
    """Prune at initialisation; writes model.pt (weights with pruned entries zeroed, and masks)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pruner: PrunerCall = Field(..., description="Which pruner, and the masking options (density, iterations, schedule, scope).")

    def data_splits(self, params) -> tuple[str, ...]:
        """The pruning batches come from the training split, for pruners that score with data."""
        return ("train",) if params.pruner.plugin.needs_data else ()

    def spec_problems(self, params, spec) -> list[tuple[tuple, str]]:
        """Each `exclude` pattern must match a prunable weight of the spec's model (a typo would
        otherwise prune what it meant to keep), and a classifier left out by it has no density."""
        call = params.pruner
        if not call.exclude:
            return []
        try:
            info = spec.data.plugin.info(spec.data.params, base_dir=spec.base_dir)
        except DataError:  # the model's shape needs data that is missing: reported when the run starts
            return []
        model = _model_skeleton(spec, info)
        names = list(prunable_parameters(model, bias=call.prune_bias, batchnorm=call.prune_batchnorm))
        matched = masking.excluded_names(names, call.exclude)
        out = [(("pruner", "exclude", i), f"{pat!r} matches no prunable parameter of the model {spec.model.name!r}; its prunable "
                                             f"parameters are named like {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
               for i, (pat, hit) in enumerate(matched.items()) if not hit]
        cls = classifier_name(model, info.num_classes)
        if call.classifier_density is not None and call.classifier_density < 1 and any(cls in hit for hit in matched.values()):
            out.append((("pruner", "classifier_density"), f"the classifier {cls!r} is excluded from pruning (exclude), so it has no density"))
        return out

    def key(self, view) -> dict:
        """The model, the seed, this stage's parameters and the data set, but not the training or
        evaluation batch sizes: pruning batches are the pruner's own (`batches`, `batch_size`)."""
        return view.default(train_batch=False, eval_batch=False)

    def run(self, ctx) -> dict:
        params = ctx.params
        call = params.pruner
        model, masks = ctx.load_model()
        info = ctx.data_info()
        inputs = masking.PruneInputs(input_shape=tuple(info.input_shape), num_classes=info.num_classes, device=ctx.device, seed=ctx.seed,
                                     train_mode=call.train_mode)
        if call.plugin.needs_data:
            inputs.batches = pruning_batches(ctx.dataset("train"), call.batches, call.batch_size, ctx.seed)
        with ctx.reporter.task(f"prune {call.name}", total=call.iterations) as task:
            def on_round(k: int, d: float) -> None:
                task.advance(1, info=f"density {d:.4f}", log=k == call.iterations or k % max(1, call.iterations // 4) == 0)

            masks = masking.prune(model, call.plugin, call.params, call.mask_policy(), inputs, masks or None, on_round)
        if call.reinitialize:
            redraw_(ctx, model, masks)
        params_by_name = dict(model.named_parameters())
        apply_masks_(params_by_name, masks)
        ctx.save_model(model, masks)
        kept, total = density_of(masks)
        layers = {n: [int(m.sum()), m.numel()] for n, m in masks.items()}  # name -> [kept, total]
        excluded = [n for hit in masking.excluded_names(list(masks), call.exclude).values() for n in hit]
        ctx.reporter.table(
            f"{ctx.stage_id}: kept weights per layer", ["layer", "kept", "total", "density"],
            [[n, str(k), str(t), "excluded" if n in excluded else f"{k / t:.4f}"] for n, (k, t) in layers.items()],
        )
        out = {"density": kept / total, "kept": kept, "total": total, "pruner": call.name, "layers": layers}
        if excluded:  # dense and outside the pool: the pool's own density is the one the pruner reached
            pool_kept = sum(k for n, (k, _) in layers.items() if n not in excluded)
            pool_total = sum(t for n, (_, t) in layers.items() if n not in excluded)
            out.update(excluded=sorted(set(excluded), key=list(masks).index), pool_density=pool_kept / pool_total)
            ctx.log(f"pruned the pool to density {pool_kept / pool_total:.4f} ({pool_kept}/{pool_total} weights kept); "
                    f"{len(out['excluded'])} excluded layers stay dense")
        ctx.log(f"pruned to density {kept / total:.4f} ({kept}/{total} prunable weights kept)")
        return out


def _model_skeleton(spec, info) -> nn.Module:
    """The spec's model for its parameter names and shapes: built on the meta device (no memory,
    no time), or on the CPU for a model plugin that cannot build there."""
    try:
        with torch.device("meta"):
            return build_model(spec.model, info, spec.seed)
    except Exception:  # a plugin's build is third-party code: the real build says what is wrong, if anything
        return build_model(spec.model, info, spec.seed)


def pruning_batches(dataset, batches: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`batches` x `batch_size` training samples drawn without replacement by `seed` (fewer when
    the set is smaller), independent of the training loader's order; the same on every run."""
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)[: batches * batch_size].tolist()
    tensors = getattr(dataset, "tensors", None)  # TensorDataset: index it at once
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if tensors is not None:
            out.append((tensors[0][idx], tensors[1][idx]))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)  # random augmentations, if any, drawn the same every run
                xs, ys = zip(*(dataset[j] for j in idx))
            out.append((torch.stack(xs), torch.as_tensor(ys)))
    return out


def redraw_(ctx, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """The random re-init ablation: the surviving weights re-drawn from the model's initialisation
    (a fresh draw, with another seed), the masks kept."""
    new = dict(build_model(ctx.spec.model, ctx.data_info(), ctx.seed + 7919).named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.copy_(new[n])
