"""MVTec-format reader for any folder (stopgap by the lead; replaced by the data-layer module)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from defectlab.errors import DatasetError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 80_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    defect_type: str
    mask_paths: tuple[Path, ...] = ()
    kind: str = "good"


@dataclass
class CategoryData:
    root: Path
    category: str
    train: list[Sample]
    test: list[Sample]
    validation: list[Sample] = field(default_factory=list)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def list_categories(root: str | Path) -> list[str]:
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []


def scan_category(root: str | Path, category: str) -> CategoryData:
    root = Path(root)
    base = root / category
    if not base.is_dir():
        raise DatasetError(base, f"category not found; valid: {', '.join(list_categories(root)) or 'none'}")
    train_dir = base / "train" / "good"
    train = [Sample(p, 0, "good") for p in _images(train_dir)] if train_dir.is_dir() else []
    if not train:
        raise DatasetError(train_dir, "no training images (train/good is empty or missing)")
    kinds = json.loads((base / "defects.json").read_text()) if (base / "defects.json").exists() else {}
    test = []
    for d in sorted(p for p in (base / "test").iterdir() if p.is_dir()) if (base / "test").is_dir() else []:
        for p in _images(d):
            if d.name == "good":
                test.append(Sample(p, 0, "good"))
                continue
            mask = base / "ground_truth" / d.name / f"{p.stem}_mask.png"
            if not mask.exists():
                raise DatasetError(p, f"no mask (expected {mask})")
            test.append(Sample(p, 1, d.name, (mask,), kinds.get(d.name, "unknown")))
    return CategoryData(root, category, train, test)


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    path = Path(path)
    if path.stat().st_size == 0:
        raise DatasetError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DatasetError(path, f"image too large ({im.width}x{im.height})")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32) / (65535.0 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 255.0)
                im = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
            im = im.convert("RGB")
            if size:
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(path, f"cannot decode image ({err})") from None


def load_mask(paths, size: int | None = None) -> np.ndarray:
    out = None
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("L")
            if size:
                im = im.resize((size, size), Image.NEAREST)
            m = np.asarray(im) > 0
        out = m if out is None else out | m
    return out


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples, size: int, normalize: bool = True):
        self.samples, self.size, self.normalize = list(samples), size, normalize

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        img = torch.from_numpy(load_image(s.path, self.size)).permute(2, 0, 1)
        if self.normalize:
            img = (img - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        mask = torch.from_numpy(load_mask(s.mask_paths, self.size).astype(np.float32))[None] if s.mask_paths \
            else torch.zeros(1, self.size, self.size)
        return {"image": img, "mask": mask, "label": s.label, "path": str(s.path), "kind": s.kind,
                "defect_type": s.defect_type}
