"""What a stage plugin receives: the spec, its own parameters, its directory, its upstream
stages, the device, and helpers for the things every stage does (build the model and data,
load the upstream artifact, save its own)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import artifacts
from .data import Batches, DataInfo
from .errors import ArtifactError
from .modelutil import apply_masks_, initialise, prunable_parameters
from .progress import Reporter
from .spec import ExperimentSpec, StageSpec


@dataclass
class Upstream:
    stage_id: str
    dir: Path
    result: dict


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


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

    def batches(self, split: str, *, shuffle: bool | None = None, batch_size: int | None = None) -> Batches:
        data = self.spec.data
        train = split == "train"
        bs = batch_size or (data.batch_size if train else (data.eval_batch_size or data.batch_size))
        return Batches(
            self.dataset(split),
            bs,
            shuffle=train if shuffle is None else shuffle,
            seed=self.seed,
            device=self.device,
            num_workers=self.spec.runtime.num_workers,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        """The model at initialisation: the same weights for the same seed, on every run and rank."""
        call = self.spec.model
        info = self.data_info()
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            model = call.plugin.build(call.params, info.num_classes, tuple(info.input_shape))
            initialise(model, call.init, call.init_scope)
        finally:
            torch.random.set_rng_state(state)
        return model

    def upstream_model_dir(self) -> Path | None:
        """The latest upstream stage (in `after:` order) that left a model artifact."""
        for sid in reversed(self.stage.after):
            up = self.upstream[sid]
            if (up.dir / artifacts.MODEL).is_file():
                return up.dir
        return None

    def load_model(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The upstream model and masks; a fresh dense model when no upstream stage left one."""
        model = self.build_model()
        src = self.upstream_model_dir()
        if src is None:
            return model, {}
        path = src / artifacts.MODEL
        state, masks = artifacts.load_model_artifact(path)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ArtifactError(f"{path}: does not fit the model {self.spec.model.name!r}: {str(e).splitlines()[0]}") from None
        params = dict(model.named_parameters())
        for name, m in masks.items():
            if name not in params or params[name].shape != m.shape:
                raise ArtifactError(f"{path}: mask {name!r} does not match a parameter of the model")
        apply_masks_(params, masks)
        return model, masks

    def save_model(self, model: nn.Module, masks: dict[str, torch.Tensor], **extra: Any) -> None:
        if self.dist.is_main:
            artifacts.save_model(self.dir / artifacts.MODEL, model, masks, **extra)

    def prunable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return prunable_parameters(model)
