"""`train`: train the upstream model; with Bop, only the signs of the surviving weights change."""
from __future__ import annotations

import time
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pab_framework import artifacts, checkpoint, loggers
from pab_framework.distributed import StopVote, state_digest, test_fail
from pab_framework.errors import ArtifactError, TrainingError
from pab_framework.modelutil import density_of, prunable_parameters
from pab_framework.optim import OptimizerContext
from pab_framework.spec import OptimizerCall, QuantizerCall


@torch.no_grad()
def evaluate(model: nn.Module, batches, dist=None) -> dict:
    """Validation loss and accuracy (fractions), with one host sync at the end. Under DDP (`dist`
    enabled, `batches` sharded) the sums are all-reduced, so every rank reports the whole split."""
    was_training = model.training
    model.eval()
    loss_sum = None
    correct = None
    n = 0
    for x, y in batches:
        out = model(x)
        l = F.cross_entropy(out, y, reduction="sum")
        c = (out.argmax(1) == y).sum()
        loss_sum = l if loss_sum is None else loss_sum + l
        correct = c if correct is None else correct + c
        n += y.numel()
    model.train(was_training)
    if dist is not None and dist.enabled:
        dev = next(iter(model.parameters())).device
        sums = torch.stack([torch.zeros((), dtype=torch.float64, device=dev) if loss_sum is None else loss_sum.double(),
                            torch.zeros((), dtype=torch.float64, device=dev) if correct is None else correct.double(),
                            torch.tensor(float(n), dtype=torch.float64, device=dev)])
        dist.sum_(sums)
        loss_sum, correct, n = sums[0], sums[1], int(sums[2])
    if n == 0:
        return {"val_loss": float("nan"), "val_acc": 0.0, "val_n": 0}
    return {"val_loss": float(loss_sum) / n, "val_acc": float(correct) / n, "val_n": n}


class TrainStage:
    """Train for `epochs` with the named optimizer (and quantizer); metrics.jsonl gets one line per epoch.

    Checkpoints every epoch (and every `checkpoint_every_steps` steps); a re-run resumes exactly
    where the last checkpoint left off. SIGTERM/SIGINT write a checkpoint at the next step boundary
    and stop with exit code 3."""

    # AMP and a per-rank batch's global size change what training computes: part of the key
    runtime_in_key = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        epochs: int = Field(..., ge=1, le=100_000, description="Training epochs.")
        optimizer: OptimizerCall = Field(default_factory=lambda: OptimizerCall(name="sgd"), description="Optimizer plugin and its parameters.")
        quantizer: Optional[QuantizerCall] = Field(None, description="A model transform such as PSG low-precision gradients.")
        label_smoothing: float = Field(0.0, ge=0, lt=1)
        checkpoint_every_steps: Optional[int] = Field(
            None, ge=1, le=10**9, description="Also checkpoint every this many steps within an epoch (always at every epoch end)."
        )
        on_nonfinite: Literal["stop", "skip"] = Field(
            "stop", description="A non-finite loss: `stop` the stage with an error (the last good checkpoint is kept) or `skip` the step."
        )

    def data_splits(self, params) -> tuple[str, ...]:
        """What must exist before the stage starts (pab_framework.datacheck)."""
        return ("train", "val")

    def run(self, ctx) -> dict:
        p = ctx.params
        model, masks = ctx.load_model()
        prunable = prunable_parameters(model)
        if not masks:  # dense start: every prunable weight is kept
            masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable.items()}
        model.to(ctx.device)
        quant_epoch = None
        if p.quantizer is not None:
            model = p.quantizer.plugin.apply(model, p.quantizer.params, set(masks))
            quant_epoch = getattr(p.quantizer.plugin, "epoch_figures", None)  # optional: per-epoch statistics
        net = ctx.parallel(model)  # DDP under several processes: gradients all-reduced, so Bop flips alike everywhere
        train = ctx.batches("train", shard=True)
        val = ctx.batches("val", shard=True)
        module_of = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        octx = OptimizerContext(named, masks, p.epochs, len(train), module_of)
        opt = p.optimizer.plugin.build(p.optimizer.params, octx)
        scaler = ctx.grad_scaler()
        run = _Run(ctx, model, masks, opt, len(train), scaler)
        run.resume()
        masks = run.masks
        # weights the optimizer does not keep at zero itself are re-masked after every step
        params_by_name = dict(named)
        remask = [n for n in masks if n not in opt.sign_params and n in params_by_name]
        remask_p = [params_by_name[n] for n in remask]
        remask_m = [masks[n].to(ctx.device, params_by_name[n].dtype) for n in remask]
        loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
        every = p.checkpoint_every_steps
        skip_bad = p.on_nonfinite == "skip"
        buffers = [b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long]
        dist = ctx.dist
        agree_finite = dist.enabled and skip_bad  # ranks must skip a step together or not at all
        step_opt = _ScaledStep(opt, [q for _, q in named], scaler) if scaler is not None else None
        vote = StopVote(dist)
        watch = _FiniteWatch(ctx, run, FINITE_CHECK_EVERY.get(ctx.device.type, FINITE_CHECK_EVERY_ACCELERATOR))
        run.before_save = watch.check
        with checkpoint.StopSignals() as stop, ctx.reporter.task("epoch", total=p.epochs) as ep_task, \
                ctx.reporter.task("batch", total=len(train)) as b_task:
            ep_task.advance(run.epoch)
            for epoch in range(run.epoch, p.epochs):
                model.train()
                train.set_epoch(epoch, skip=run.step)
                b_task.reset(f"epoch {epoch + 1}", len(train))
                b_task.advance(run.step)
                t0 = time.perf_counter()
                for x, y in train:
                    opt.zero_grad()
                    if skip_bad:  # a skipped step must not leave its forward pass in BatchNorm's running stats
                        saved = [b.detach().clone() for b in buffers]
                    with ctx.autocast():
                        out = net(x)
                        loss = loss_fn(out, y)
                    if skip_bad:  # the step is taken or skipped now: the host must know
                        finite = torch.isfinite(loss.detach())
                        if agree_finite:
                            finite = dist.min_(finite.to(torch.int32)) > 0
                        finite = bool(finite)
                    else:  # stop: noted on the device, read every few steps and before any write
                        watch.record(loss.detach(), epoch, run.step)
                        finite = True
                    if not finite:
                        run.skipped += 1
                        if buffers:
                            with torch.no_grad():
                                torch._foreach_copy_(buffers, saved)
                    else:
                        if step_opt is not None:
                            scaler.scale(loss).backward()
                            step_opt.step()
                        else:
                            loss.backward()
                            opt.step()
                        if remask_p:
                            with torch.no_grad():
                                torch._foreach_mul_(remask_p, remask_m)
                        opt.step_end()
                        run.loss_sum += loss.detach() * y.numel()
                        run.correct += (out.detach().argmax(1) == y).sum()
                        run.seen += y.numel()
                    run.step += 1
                    b_task.advance(1)
                    checkpoint.test_pause("step", epoch * len(train) + run.step)
                    test_fail("step", epoch * len(train) + run.step, dist.rank)
                    signame = vote.poll(stop.requested)
                    if signame:
                        run.interrupt(signame)
                    if every and run.step % every == 0 and run.step < len(train):
                        run.save()
                watch.check()  # a non-finite epoch is neither evaluated nor logged
                dist.broadcast_buffers_(model)  # rank 0's BatchNorm statistics everywhere, for validation and the checkpoint
                loss_sum, correct, seen = run.totals()
                train_loss = loss_sum / max(1, seen)
                opt_figs = opt.epoch_end(epoch)
                quant_figs = quant_epoch(model) if quant_epoch else {}
                row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": correct / max(1, seen)}
                if p.on_nonfinite == "skip":
                    row["skipped_steps"] = run.skipped
                row.update(evaluate(model, val, dist))
                row.update({k: v for k, v in opt_figs.items() if not isinstance(v, dict)})
                if "psg_kept" in quant_figs:  # PSG: the kept fraction of weight-gradient entries
                    row["psg_kept"] = quant_figs["psg_kept"]
                    opt_figs["psg_kept"] = quant_figs["psg_kept_per_layer"]
                row["epoch_s"] = round(time.perf_counter() - t0, 3)
                run.metrics.append(row)
                if ctx.dist.is_main:
                    artifacts.write_jsonl(ctx.dir / artifacts.METRICS, run.metrics)
                    loggers.log_epoch(ctx, row)  # runtime.loggers: tensorboard, csv
                    bop_layers = opt_figs.pop("bop_layers", None)
                    per_layer = {k: v for k, v in opt_figs.items() if isinstance(v, dict)}
                    if per_layer:
                        _append_epoch_rows(ctx.dir / "layers.jsonl", epoch, [{"epoch": epoch + 1, **per_layer}])
                    if bop_layers:  # Bop's per-layer statistics: one line per epoch and layer
                        _append_epoch_rows(ctx.dir / FLIPS, epoch, [{"epoch": epoch + 1, "layer": n, **v} for n, v in bop_layers.items()])
                checkpoint.test_pause("epoch-end", epoch + 1)
                run.next_epoch()
                run.save()
                extra = f"  flips {row['flips']}" if "flips" in row else ""
                ep_task.advance(1, info=f"loss {train_loss:.4f}  val_acc {row['val_acc']:.4f}{extra}", log=True)
                signame = vote.now(stop.requested)
                if signame:
                    run.interrupt(signame, save=False)
        kept, total = density_of(masks)
        ranks = _check_ranks_agree(ctx, model, masks)
        ctx.save_model(model, masks)
        metrics = run.metrics
        last = metrics[-1]
        return {
            **ranks,
            "density": kept / total if total else 1.0,
            "val_acc": last["val_acc"],
            "val_loss": last["val_loss"],
            "train_loss": last["train_loss"],
            "best_val_acc": max(m["val_acc"] for m in metrics),
            "epochs": p.epochs,
        }


FLIPS = "flips.jsonl"

# on_nonfinite: stop reads its flag on the host (waiting for the device) every this many steps:
# every step on the CPU, where nothing runs ahead; every few on accelerators, so that steps queue
# up without waiting. The flag is also read before every checkpoint and at every epoch's end.
FINITE_CHECK_EVERY = {"cpu": 1}
FINITE_CHECK_EVERY_ACCELERATOR = 32


class _FiniteWatch:
    """Remembers, on the device, the first step since the last check whose loss was not finite
    (and that loss); `check()` reads it and stops the stage naming the epoch and step. A
    non-finite step may be followed by a few more before the check, but nothing is written in
    between: the last good checkpoint is kept."""

    def __init__(self, ctx, run, every: int):
        self.ctx, self.run, self.every = ctx, run, max(1, every)
        dev = ctx.device
        self.first = torch.full((), -1, dtype=torch.long, device=dev)  # index into `steps`
        self.loss = torch.zeros((), dtype=torch.float32, device=dev)
        self.n = torch.zeros((), dtype=torch.long, device=dev)
        self.steps: list[tuple[int, int]] = []  # (epoch, step) of the steps since the last check

    def record(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        new = ~torch.isfinite(loss) & (self.first < 0)
        self.first = torch.where(new, self.n, self.first)
        self.loss = torch.where(new, loss.float(), self.loss)
        self.n += 1
        self.steps.append((epoch, step))
        if len(self.steps) >= self.every:
            self.check()

    def check(self) -> None:
        if not self.steps:
            return
        i = int(self.first)
        if i >= 0:
            epoch, step = self.steps[i]
            kept = self.run.last_saved or "none written yet"
            raise TrainingError(
                f"stage {self.ctx.stage_id}: the training loss is not finite ({float(self.loss)}) at epoch {epoch + 1}, "
                f"step {step + 1}; the last good checkpoint is kept ({kept}). Lower the learning rate, or set on_nonfinite: skip"
            )
        self.steps.clear()
        self.n.zero_()


def _append_epoch_rows(path, epoch: int, rows: list[dict]) -> None:
    """Rewrite a per-epoch jsonl file with the rows of epochs before `epoch` (0-based) and `rows`:
    a resumed run that logs an epoch again replaces it instead of duplicating it."""
    kept = [r for r in artifacts.read_jsonl(path) if r.get("epoch", 0) <= epoch]
    artifacts.write_jsonl(path, [*kept, *rows])


class _Run:
    """Where training stands (epoch, step, metrics, running sums) and its checkpoints."""

    def __init__(self, ctx, model: nn.Module, masks: dict, opt, steps_per_epoch: int, scaler=None):
        self.ctx, self.model, self.masks, self.opt = ctx, model, masks, opt
        self.scaler = scaler
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0  # the epoch in progress (0-based)
        self.step = 0  # steps of it done
        self.metrics: list[dict] = []
        self.saves = 0
        self.last_saved = None
        self.elapsed_before = 0.0
        self.t_start = time.perf_counter()
        self._zero()

    def _zero(self) -> None:
        dev = self.ctx.device
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.seen = 0
        self.skipped = 0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step = 0
        self._zero()

    def _sums(self) -> torch.Tensor:
        """(loss sum, correct, seen) of the epoch so far over every rank (a collective under DDP)."""
        t = torch.stack([self.loss_sum.double(), self.correct.double(), torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss_sum.device)])
        return self.ctx.dist.sum_(t)

    def totals(self) -> tuple[float, int, int]:
        loss_sum, correct, seen = self._sums().tolist()
        return loss_sum, int(correct), int(seen)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def payload(self, sums: torch.Tensor) -> dict:
        return {
            "stage": self.ctx.stage_id,
            "epoch": self.epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "masks": {k: m.detach().to("cpu", torch.bool) for k, m in self.masks.items()},
            "optimizer": self.opt.state_dict(),
            "rng": checkpoint.rng_state(),
            "metrics": list(self.metrics),
            # summed over ranks: rank 0 carries them on after a resume, the others start from zero
            "running": {"loss_sum": sums[0].to("cpu", torch.float32), "correct": sums[1].to("cpu", torch.long),
                        "seen": int(sums[2]), "skipped": self.skipped},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "elapsed": self.elapsed(),
        }

    before_save = None  # a check that must pass before anything is written (non-finite losses)

    def save(self) -> None:
        """Every rank calls this at the same points; rank 0 writes."""
        if self.before_save is not None:
            self.before_save()
        sums = self._sums()
        if not self.ctx.dist.is_main:
            return
        self.saves += 1
        self.last_saved = checkpoint.save(self.ctx.dir, self.ctx.key, self.payload(sums), count=self.saves)

    def interrupt(self, signame: str, save: bool = True) -> None:
        if save:
            self.save()
        where = f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"the end of epoch {self.epoch}"
        raise checkpoint.Interrupted(  # printed after "stopped: "
            f"{signame} at {where}; checkpoint written to {self.last_saved or self.ctx.dir}. "
            f"Run the same command again to resume (exit code {checkpoint.EXIT_INTERRUPTED})."
        )

    def resume(self) -> None:
        """Load the newest good checkpoint of this stage, if any, and carry on from it."""
        got = checkpoint.load(self.ctx.dir, self.ctx.key, warn=lambda m: self.ctx.log(f"[yellow]warning[/]: {m}"))
        if got is None:
            return
        ck, path = got
        try:
            if ck.get("steps_per_epoch") != self.steps_per_epoch:
                raise ArtifactError(f"it was written with {ck.get('steps_per_epoch')} steps per epoch, this run has {self.steps_per_epoch}")
            self.model.load_state_dict(ck["model"])
            masks = ck["masks"]
            if set(masks) != set(self.masks) or any(masks[k].shape != self.masks[k].shape for k in masks):
                raise ArtifactError("its masks do not match the model")
            self.masks = {k: masks[k].to(self.masks[k].device) for k in masks}
            self.opt.load_state_dict(ck["optimizer"])
            checkpoint.set_rng_state(ck["rng"])
            self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
            self.metrics = list(ck["metrics"])
            r = ck["running"]
            self.skipped = int(r["skipped"])
            if self.ctx.dist.is_main:  # the sums were over every rank: one rank carries them on
                self.loss_sum = r["loss_sum"].to(self.ctx.device)
                self.correct = r["correct"].to(self.ctx.device)
                self.seen = int(r["seen"])
            if self.scaler is not None and ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            self.elapsed_before = float(ck["elapsed"])
        except ArtifactError as e:
            raise ArtifactError(f"{path}: cannot resume from this checkpoint: {e.message}. Run with --restart to start afresh.") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ArtifactError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {msg[:200]}). Run with --restart to start afresh.") from None
        self.last_saved = path
        self.ctx.earlier_s = self.elapsed_before  # result.json: compute_s counts the earlier sessions
        at = f"epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}" if self.epoch < self.ctx.params.epochs else "the end of training"
        # the only line about the resume (the pipeline leaves it to the stage, which knows where)
        self.ctx.log(f"[bold]resuming[/] {self.ctx.stage_id} ({self.ctx.stage.kind}) from {path} at {at} (--restart starts it afresh)")


class _ScaledStep:
    """fp16: the optimizer steps through torch's GradScaler (gradients unscaled first; a step with
    non-finite gradients is skipped and the scale lowered). GradScaler drives torch optimizers by
    their `param_groups` and `step()`; `_View` gives it ours."""

    class _View:
        def __init__(self, opt, params: list):
            self.opt = opt
            self.param_groups = [{"params": params}]

        def step(self):
            self.opt.step()

    def __init__(self, opt, params: list, scaler):
        self.scaler = scaler
        self.view = self._View(opt, params)

    def step(self) -> None:
        self.scaler.step(self.view)
        self.scaler.update()


def _check_ranks_agree(ctx, model: nn.Module, masks: dict) -> dict:
    """Under DDP: digests of every rank's final weights and masks, compared. They must be bitwise
    equal (same start, all-reduced gradients, rank 0's buffers); a difference is a bug or a
    non-deterministic plugin, and fails the stage rather than saving rank 0's model silently."""
    if not ctx.dist.enabled:
        return {}
    mine = {"weights": state_digest(model.state_dict()), "masks": state_digest(masks)}
    every = ctx.dist.gather_object(mine)
    out = {"world_size": ctx.dist.world_size, "rank_digests": {k: [d[k] for d in every] for k in mine}}
    for k in mine:
        if len(set(out["rank_digests"][k])) != 1:
            raise TrainingError(f"stage {ctx.stage_id}: the ranks' final {k} differ ({', '.join(d[:12] for d in out['rank_digests'][k])}); "
                                f"a plugin computes differently on different ranks")
    return out
