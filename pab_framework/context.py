"""What a stage plugin receives: the spec, its own parameters, its directory, its upstream
stages, the device, and helpers for the things every stage does (build the model and data,
load the upstream artifact, save its own)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import artifacts
from .data import Batches, DataInfo
from .distributed import DistInfo
from .errors import ArtifactError
from .modelutil import apply_masks_, build_model, prunable_parameters
from .progress import Reporter
from .specification import ExperimentSpec, StageSpec
from .tracking import Trackers


@dataclass
class Upstream:
    stage_id: str
    dir: Path
    result: dict


@dataclass
class StageContext:
    spec: ExperimentSpec
    stage_id: str
    stage: StageSpec
    key: str
    dir: Path
    upstream: dict[str, Upstream]
    device: torch.device
    reporter: Reporter
    dist: DistInfo = field(default_factory=DistInfo)
    # a stage that resumes from a checkpoint sets this to the seconds earlier sessions spent on it
    # (as recorded in the checkpoint): result.json's compute_s is this session's wall_s plus it
    earlier_s: float = 0.0
    # the trackers of runtime.loggers (rank 0's; none elsewhere): the Trainer's Tracking callback feeds them
    trackers: Trackers = field(default_factory=Trackers)

    @property
    def params(self) -> Any:
        return self.stage.params

    @property
    def seed(self) -> int:
        return self.spec.seed

    def log(self, message: str) -> None:
        self.reporter.log(message)

    # ------------------------------------------------------------------ data
    def data_info(self) -> DataInfo:
        call = self.spec.data
        return call.plugin.info(call.params, base_dir=self.spec.base_dir)

    def dataset(self, split: str):
        call = self.spec.data
        return call.plugin.build(call.params, split, base_dir=self.spec.base_dir)

    def batches(self, split: str, *, shuffle: bool | None = None, batch_size: int | None = None, shard: bool = False) -> Batches:
        """Batches of `split`, the same on every rank unless `shard`.

        `shard=True` (the train and evaluate stages) splits the data among the ranks of a DDP job:
        each rank gets every N-th example of the epoch's order, and with runtime.batch_size_is
        `global` a step takes batch_size / N examples on each of the N ranks (evaluation:
        ceil(eval_batch_size / N)). The training split is padded so every rank has as many steps;
        other splits are sharded without repeats, so sums over ranks count every example once.
        Without `shard` (the default, e.g. the batch a pruner scores with) every rank sees what a
        single process would, so stages that do not ask compute identically everywhere."""
        data, rt = self.spec.data, self.spec.runtime
        d = self.dist if shard else DistInfo()
        train = split == "train"
        bs = batch_size or (data.batch_size if train else (data.eval_batch_size or data.batch_size))
        if d.enabled and rt.batch_size_is == "global" and batch_size is None:
            bs = max(1, -(-bs // d.world_size))
        return Batches(
            self.dataset(split),
            bs,
            shuffle=train if shuffle is None else shuffle,
            seed=self.seed,
            device=self.device,
            num_workers=rt.num_workers,
            rank=d.rank,
            world_size=d.world_size,
            pad=train,
            pin_memory=rt.pin_memory,
            persistent_workers=rt.persistent_workers,
            prefetch_factor=rt.prefetch_factor,
            channels_last=rt.channels_last,
        )

    # ------------------------------------------------------------------ runtime
    def parallel(self, model: nn.Module) -> nn.Module:
        """The module a training step calls: `model` itself in one process; under DDP, `model`
        (with synchronised BatchNorm when runtime.sync_bn) wrapped in DistributedDataParallel, which
        all-reduces (averages) the gradients in backward, so every rank's optimizer steps alike.
        Evaluate, save and read parameters through `model`, never the wrapper."""
        rt = self.spec.runtime
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        if not self.dist.enabled:
            return model
        if rt.sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the children in place
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, output_device=self.device.index if ids else None)

    def autocast(self):
        """The forward pass's precision (runtime.amp)."""
        amp = self.spec.runtime.amp
        if amp == "none":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def grad_scaler(self):
        """A gradient scaler for fp16 autocast; None otherwise."""
        if self.spec.runtime.amp != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        """The model at initialisation: the same weights for the same seed, on every run and rank."""
        return build_model(self.spec.model, self.data_info(), self.seed)

    def upstream_model_dir(self) -> Path | None:
        """The latest upstream stage (in `after:` order) that left a model artifact."""
        for sid in reversed(self.stage.after):
            up = self.upstream[sid]
            if (up.dir / artifacts.MODEL).is_file():
                return up.dir
        return None

    def source_file(self, src) -> Path:
        """The model file a `masks_from` / `weights_from` source names (a stage's model.pt, the
        weights it kept after an epoch, or a path)."""
        if src.path is not None:
            return self.spec.resolve_path(src.path)
        d = self.upstream[src.stage].dir
        return d / (artifacts.MODEL if src.epoch is None else artifacts.kept_weights_name(src.epoch))

    def load_model(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The model and masks this stage starts from, pruned weights zeroed.

        By default both come from the last stage in `after:` that left a model (a fresh dense
        model when none did); the stage's `weights_from` (`init`, a stage, a stage's weights
        after an epoch, a file) and `masks_from` (`dense`, a stage, a file) choose otherwise."""
        model = self.build_model()
        default = self.upstream_model_dir()
        default_file = default / artifacts.MODEL if default is not None else None
        wsrc, msrc = self.stage.weights_from, self.stage.masks_from
        if wsrc == "init":
            wfile = None
        else:
            wfile = self.source_file(wsrc) if wsrc is not None else default_file
        if msrc == "dense":
            mfile = None
        else:
            mfile = self.source_file(msrc) if msrc is not None else default_file
        loaded: dict[Path, tuple[dict, dict]] = {}

        def read(path: Path) -> tuple[dict, dict]:
            if path not in loaded:
                if not path.is_file():
                    raise ArtifactError(f"{path}: not found (stage {self.stage_id} starts from it)")
                loaded[path] = artifacts.load_model_artifact(path)
            return loaded[path]

        if wfile is not None:
            state, _ = read(wfile)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise ArtifactError(f"{wfile}: does not fit the model {self.spec.model.name!r}: {str(e).splitlines()[0]}") from None
        masks = dict(read(mfile)[1]) if mfile is not None else {}
        params = dict(model.named_parameters())
        for name, m in masks.items():
            if name not in params or params[name].shape != m.shape:
                raise ArtifactError(f"{mfile}: mask {name!r} does not match a parameter of the model")
        apply_masks_(params, masks)
        return model, masks

    def save_model(self, model: nn.Module, masks: dict[str, torch.Tensor], **extra: Any) -> None:
        if self.dist.is_main:
            artifacts.save_model(self.dir / artifacts.MODEL, model, masks, **extra)

    def prunable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return prunable_parameters(model)
