"""The synthetic-anomaly cache written by the ``synthesize`` stage and read by training code.

Layout of ``out_dir``::

    images/NNNN.png   simulated anomalous images (RGB)
    masks/NNNN.png    their masks (L, 0/255)
    index.csv         file, mask, kind, method, source_image, other_image, delta
    params.json       every setting that produced the cache

Sample ``i`` draws from its own generator seeded with (seed, i), so a cache is reproducible
bit for bit and independent of the order samples are produced in.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from defectlab.errors import ConfigError, DatasetError
from defectlab.io import atomic_dir, write_json
from defectlab.resources import record
from defectlab.synthesis.compose import SynthResult
from defectlab.synthesis.foreground import foreground_mask
from defectlab.synthesis.logical import logical_anomaly
from defectlab.synthesis.structural import structural_anomaly
from defectlab.synthesis.textures import DTD_URL, TextureSource

KINDS = ("structural", "logical")
INDEX_FIELDS = ("file", "mask", "kind", "method", "source_image", "other_image", "delta")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# params key -> (kind it applies to, keyword of the synthesis function)
PARAM_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "delta": (KINDS, "delta"),
    "self_permute_prob": (("structural",), "self_permute_prob"),
    "structural_threshold": (("structural",), "threshold"),
    "logical_threshold": (("logical",), "threshold"),
    "max_angle": (("logical",), "max_angle"),
    "max_blobs": (("logical",), "max_blobs"),
}


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """An image file as float32 size x size x 3 in [0, 1] (bilinear resize)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _kind_kwargs(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        known = sorted(PARAM_KEYS)
        raise ConfigError(f"synthesis params: unknown key(s) {unknown}; known: {known}")
    kwargs: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
    for key, value in params.items():
        kinds, keyword = PARAM_KEYS[key]
        for kind in kinds:
            kwargs[kind][keyword] = tuple(value) if isinstance(value, list) else value
    return kwargs


def _kind_probabilities(kinds: dict[str, float]) -> tuple[list[str], np.ndarray]:
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        raise ConfigError(f"synthesis kinds: {bad or 'none given'}; choose from {list(KINDS)}")
    names = sorted(kinds)
    p = np.array([float(kinds[k]) for k in names])
    if (p < 0).any() or p.sum() <= 0:
        raise ConfigError(f"synthesis kinds: weights must be >= 0 and not all 0, got {kinds}")
    return names, p / p.sum()


def build_cache(
    normal_image_paths: list[Path],
    out_dir: Path,
    *,
    n: int,
    seed: int,
    image_size: int,
    kinds: dict[str, float],
    object_kind: Literal["object", "texture"],
    dtd_dir: Path | None = None,
    params: dict[str, Any] | None = None,
) -> None:
    """Simulate ``n`` anomalous images from the normal images and write them to ``out_dir``.

    ``kinds`` weights structural vs logical simulation; ``object_kind`` decides whether
    masks are restricted to an estimated foreground; ``dtd_dir`` selects DTD textures
    (default procedural); ``params`` are keyword overrides, see ``PARAM_KEYS``.
    The directory is replaced atomically.
    """
    params = dict(params or {})
    names, probs = _kind_probabilities(kinds)
    kind_kwargs = _kind_kwargs(params)
    paths = sorted(Path(p) for p in normal_image_paths)
    if not paths:
        raise DatasetError(out_dir, "no normal images to synthesize from")
    if kinds.get("logical", 0) > 0 and len(paths) < 2:
        raise DatasetError(paths[0], "logical synthesis needs at least two normal images")
    root = Path(os.path.commonpath([p.parent for p in paths]))
    rel = [p.relative_to(root).as_posix() for p in paths]
    source = TextureSource(dtd_dir)
    images = [load_rgb(p, image_size) for p in paths]
    foregrounds = [foreground_mask(img, object_kind) for img in images]
    substitutions = []
    if dtd_dir is None:
        substitutions.append(record("synthesis.dtd_dir", "procedural textures instead of DTD",
                                        f"the DTD texture images (synthesis.cache.<profile>.dtd_dir; {DTD_URL})"))
    whole = [rel[i] for i, fg in enumerate(foregrounds) if object_kind == "object" and fg.all()]
    if whole:      # the heuristic found no object: anomalies may land anywhere on those images
        substitutions.append(record(
            "synthesis.foreground", f"whole image as foreground for {len(whole)}/{len(paths)} normal images of "
            f"{Path(out_dir).name} (the foreground heuristic found no object)",
            "object images whose background differs from the object (or list the category in "
            "datasets.<ds>.texture_categories)"))

    def simulate(k: int) -> dict[str, Any]:
        """Sample k: pick kind and image(s), simulate; returns the index row (+ arrays)."""
        rng = np.random.default_rng([seed, k])
        kind = names[int(rng.choice(len(names), p=probs))]
        i = int(rng.integers(len(paths)))
        other = ""
        if kind == "logical":
            j = int(rng.integers(len(paths) - 1))
            j += j >= i  # any image but i
            other = rel[j]
            result = logical_anomaly(
                images[i], images[j], rng, fg=foregrounds[i], **kind_kwargs[kind]
            )
        else:
            result = structural_anomaly(
                images[i], rng, fg=foregrounds[i], source=source, **kind_kwargs[kind]
            )
        return {
            "file": f"images/{k:04d}.png",
            "mask": f"masks/{k:04d}.png",
            "kind": result.kind,
            "method": result.method,
            "source_image": rel[i],
            "other_image": other,
            "delta": f"{result.delta:.6f}",
            "result": result,
        }

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        rows = []
        for k in tqdm(range(n), desc=f"synthesize {out_dir.name}", unit="img"):
            row = simulate(k)
            result: SynthResult = row.pop("result")
            Image.fromarray(_to_uint8(result.image)).save(tmp / row["file"])
            Image.fromarray(result.mask.astype(np.uint8) * 255).save(tmp / row["mask"])
            rows.append(row)
        with open(tmp / "index.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        write_json(
            tmp / "params.json",
            {
                "n": n,
                "seed": seed,
                "image_size": image_size,
                "kinds": kinds,
                "object_kind": object_kind,
                "texture_source": "dtd" if dtd_dir is not None else "procedural",
                "foreground_whole_image": whole,
                "substitutions": substitutions,
                "params": params,
                "sources": rel,
            },
        )


def load_cache(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``index.csv`` with ``image``/``mask`` as absolute Paths and ``delta`` as float."""
    out_dir = Path(out_dir)
    index = out_dir / "index.csv"
    if not index.is_file():
        raise DatasetError(index, "synthesis cache index missing; run the synthesize stage")
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {
            **row,
            "image": out_dir / row["file"],
            "mask": out_dir / row["mask"],
            "delta": float(row["delta"]),
        }
        for row in rows
    ]


class SynthDataset(Dataset):
    """Torch dataset over a synthesis cache: dict(image CxHxW float, mask 1xHxW {0,1}, kind).

    Images are resized to ``size`` (bilinear; masks nearest) and ImageNet-normalised when
    ``normalize``.
    """

    def __init__(self, out_dir: str | Path, size: int, normalize: bool = True):
        self.rows = load_cache(out_dir)
        self.size = size
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        row = self.rows[idx]
        image = torch.from_numpy(load_rgb(row["image"], self.size)).permute(2, 0, 1)
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            image = (image - mean) / std
        with Image.open(row["mask"]) as m:
            m = m.convert("L").resize((self.size, self.size), Image.NEAREST)
            mask = torch.from_numpy((np.asarray(m) > 127).astype(np.float32))[None]
        return {"image": image, "mask": mask, "kind": row["kind"]}
