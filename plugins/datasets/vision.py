"""Image datasets from disk: CIFAR-10/100 (torchvision's format) and ImageFolder (ImageNet layout)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from pab_framework.data import DataInfo
from pab_framework.errors import DataError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.507, 0.487, 0.441)  # CIFAR-100's own statistics, as the original PaB code
CIFAR100_STD = (0.267, 0.256, 0.276)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _root(root: str, base_dir) -> Path:
    """`root` relative to the spec's folder, made absolute and normalised (no `configs/../`)."""
    p = Path(root).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return Path(os.path.normpath(os.path.abspath(p)))


class _Cifar:
    num_classes = 10
    mean, std = CIFAR_MEAN, CIFAR_STD
    folder = "cifar-10-batches-py"
    tv_class = "CIFAR10"
    # the files torchvision reads, by split (and for both: the class names)
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"], "both": ["batches.meta"]}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        root: str = Field("data", description="Directory holding the dataset (relative to the spec file).")
        download: bool = Field(False, description="Download when missing (needs a network).")
        augment: bool = Field(True, description="Random crop (padding 4) and horizontal flip for training.")

    def info(self, params, *, base_dir=None) -> DataInfo:
        return DataInfo(num_classes=self.num_classes, input_shape=(3, 32, 32), mean=self.mean, std=self.std)

    def check(self, params, splits, *, base_dir=None) -> None:
        """The files the splits need are there (or will be downloaded); their checksums are
        torchvision's to verify when it reads them."""
        if params.download or not splits:
            return
        d = _root(params.root, base_dir) / self.folder
        if not d.is_dir():
            raise DataError(
                f"{self.tv_class} data not found: {d} does not exist; set data.root to the directory that holds {self.folder}/, "
                f"or data.download: true to download it there", key="root")
        missing = [f for s in ("both", *sorted(set(splits))) for f in self.files.get(s, []) if not (d / f).is_file()]
        if missing:
            raise DataError(f"{self.tv_class} data incomplete: {d} lacks {', '.join(missing)}; data.download: true fetches "
                            f"it again (or point data.root elsewhere)", key="root")

    def build(self, params, split: str, *, base_dir=None):
        import torchvision
        import torchvision.transforms as T

        root = _root(params.root, base_dir)
        if not params.download and not (root / self.folder).is_dir():
            raise DataError(
                f"{self.tv_class} data not found: looked for {root / self.folder} "
                f"(set data.root to the directory that contains {self.folder}/, or data.download: true)", key="root"
            )
        norm = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if split == "train" and params.augment else []) + norm)
        try:
            return getattr(torchvision.datasets, self.tv_class)(str(root), train=split == "train", transform=tf, download=params.download)
        except RuntimeError as e:
            raise DataError(f"{self.tv_class} data under {root} is unusable: {e}") from None


class Cifar10(_Cifar):
    """CIFAR-10 in torchvision's format (`cifar-10-batches-py/` under `root`)."""


class Cifar100(_Cifar):
    """CIFAR-100 in torchvision's format (`cifar-100-python/` under `root`)."""

    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    folder = "cifar-100-python"
    tv_class = "CIFAR100"
    files = {"train": ["train"], "val": ["test"], "both": ["meta"]}


class ImageFolder:
    """`root/train/<class>/*.jpg` and `root/val/<class>/*.jpg` (the ImageNet layout)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        root: str = Field(..., description="Directory with train/ and val/ (relative to the spec file).")
        image_size: int = Field(224, ge=8, le=4096, description="Crop size: random-resized crops for training, centre crops for validation.")
        resize: Optional[int] = Field(
            None, ge=8, le=4096, description="Validation images are resized to this, then centre-cropped to image_size (default: image_size * 8/7, 256 for 224)."
        )
        augment: bool = Field(True, description="Random-resized crop and horizontal flip for training (else: as validation).")
        num_classes: int | None = Field(None, ge=2, description="Number of classes (default: counted from train/).")

    def info(self, params, *, base_dir=None) -> DataInfo:
        n = params.num_classes
        if n is None:
            train = _root(params.root, base_dir) / "train"
            n = len([d for d in train.iterdir() if d.is_dir()]) if train.is_dir() else 1000
        return DataInfo(num_classes=n, input_shape=(3, params.image_size, params.image_size), mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def check(self, params, splits, *, base_dir=None) -> None:
        """root/train and root/val (those the splits read; train/ also when num_classes is not
        given, since info() counts its class folders) exist and hold class folders."""
        root = _root(params.root, base_dir)
        need = set(splits) | ({"train"} if params.num_classes is None else set())
        problems = [] if root.is_dir() or not need else [f"{root} does not exist"]
        for split in sorted(need) if not problems else ():
            d = root / ("train" if split == "train" else "val")
            if not d.is_dir():
                problems.append(f"{d} does not exist")
            elif not any(e.is_dir() for e in os.scandir(d)):
                problems.append(f"{d} holds no class folders")
        if problems:
            raise DataError(f"image folder not usable: {'; '.join(problems)}; data.root must hold train/<class>/... and "
                            f"val/<class>/... (no download: this dataset is yours)", key="root")

    def build(self, params, split: str, *, base_dir=None):
        import torchvision
        import torchvision.transforms as T

        d = _root(params.root, base_dir) / ("train" if split == "train" else "val")
        if not d.is_dir():
            raise DataError(f"image folder not found: {d} (expected {d.parent}/train/<class>/... and {d.parent}/val/<class>/...)", key="root")
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        resize = params.resize or round(params.image_size * 8 / 7)
        if split == "train" and params.augment:
            tf = T.Compose([T.RandomResizedCrop(params.image_size), T.RandomHorizontalFlip()] + norm)
        else:
            tf = T.Compose([T.Resize(resize), T.CenterCrop(params.image_size)] + norm)
        try:
            return torchvision.datasets.ImageFolder(str(d), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"image folder {d} is unusable: {e}") from None
