"""The synthetic-anomaly cache written by the ``synthesize`` stage and read by training code.

Layout of ``out_dir``::

    images/NNNN.png   simulated anomalous images (RGB)
    masks/NNNN.png    their masks (L, 0/255)
    index.csv         file, mask, kind, method, source_image, other_image, delta
    params.json       every setting that produced the cache

Sample ``i`` draws from its own generator seeded with (seed, i) (``Synthesizer``), so a cache is
reproducible bit for bit and independent of the order samples are produced in, and a training
loop can simulate further samples online (``OnlineSynthDataset``): sample i of the online stream
is the cache's image i for i < n.
"""

from __future__ import annotations

import csv
import json
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


class Synthesizer:
    """Simulates anomalous images from a category's normal images, as the cache does: sample ``k``
    draws from its own generator seeded with (seed, k), so any sample can be produced on its own
    (``build_cache`` writes samples 0..n-1; a training loop can draw samples 0, 1, 2, ... online,
    the first n of which are the cache's images).

    ``kinds`` weights structural vs logical simulation; ``object_kind`` decides whether masks are
    restricted to an estimated foreground; ``dtd_dir`` selects DTD textures (default
    procedural); ``params`` are keyword overrides, see ``PARAM_KEYS``.
    """

    def __init__(
        self,
        normal_image_paths: list[Path],
        *,
        seed: int,
        image_size: int,
        kinds: dict[str, float],
        object_kind: Literal["object", "texture"],
        dtd_dir: Path | None = None,
        params: dict[str, Any] | None = None,
        where: Path | None = None,
    ):
        self.params = dict(params or {})
        self.names, self.probs = _kind_probabilities(kinds)
        self.kind_kwargs = _kind_kwargs(self.params)
        paths = sorted(Path(p) for p in normal_image_paths)
        if not paths:
            raise DatasetError(where or Path("."), "no normal images to synthesize from")
        if kinds.get("logical", 0) > 0 and len(paths) < 2:
            raise DatasetError(paths[0], "logical synthesis needs at least two normal images")
        root = Path(os.path.commonpath([p.parent for p in paths]))
        self.rel = [p.relative_to(root).as_posix() for p in paths]
        self.seed, self.image_size, self.kinds, self.object_kind = seed, image_size, kinds, object_kind
        self.dtd_dir = dtd_dir
        self.source = TextureSource(dtd_dir)
        self.images = [load_rgb(p, image_size) for p in paths]
        self.foregrounds = [foreground_mask(img, object_kind) for img in self.images]

    def settings(self) -> dict[str, Any]:
        """Every setting that determines the samples (``params.json`` of a cache, less ``n``)."""
        return {
            "seed": self.seed,
            "image_size": self.image_size,
            "kinds": self.kinds,
            "object_kind": self.object_kind,
            "texture_source": "dtd" if self.dtd_dir is not None else "procedural",
            "dtd_dir": str(self.dtd_dir) if self.dtd_dir is not None else None,
            "params": self.params,
            "sources": self.rel,
        }

    def sample(self, k: int) -> tuple[dict[str, Any], SynthResult]:
        """Sample k: pick kind and image(s), simulate; returns (its index row, the result)."""
        rng = np.random.default_rng([self.seed, k])
        kind = self.names[int(rng.choice(len(self.names), p=self.probs))]
        i = int(rng.integers(len(self.images)))
        other = ""
        if kind == "logical":
            j = int(rng.integers(len(self.images) - 1))
            j += j >= i  # any image but i
            other = self.rel[j]
            result = logical_anomaly(
                self.images[i], self.images[j], rng, fg=self.foregrounds[i], **self.kind_kwargs[kind]
            )
        else:
            result = structural_anomaly(
                self.images[i], rng, fg=self.foregrounds[i], source=self.source, **self.kind_kwargs[kind]
            )
        row = {
            "file": f"images/{k:04d}.png",
            "mask": f"masks/{k:04d}.png",
            "kind": result.kind,
            "method": result.method,
            "source_image": self.rel[i],
            "other_image": other,
            "delta": f"{result.delta:.6f}",
        }
        return row, result

    def whole_image_foregrounds(self) -> list[str]:
        """The normal images of an object category where the foreground heuristic found no object
        (anomalies may then land anywhere on them)."""
        if self.object_kind != "object":
            return []
        return [self.rel[i] for i, fg in enumerate(self.foregrounds) if fg.all()]

    def substitutions(self, category: str) -> list[str]:
        """What stands in for a missing resource in these samples (``defectlab.resources`` records):
        procedural textures without a DTD folder; the whole image as foreground, per category."""
        out = []
        if self.dtd_dir is None:
            out.append(record("synthesis.dtd_dir", "procedural textures instead of DTD",
                              f"the DTD texture images (synthesis.cache.<profile>.dtd_dir; {DTD_URL})"))
        whole = self.whole_image_foregrounds()
        if whole:
            out.append(record(
                "synthesis.foreground", f"whole image as foreground for {len(whole)}/{len(self.rel)} normal images of "
                f"{category} (the foreground heuristic found no object)",
                "object images whose background differs from the object (or list the category in "
                "datasets.<ds>.texture_categories)"))
        return out

    @classmethod
    def like_cache(cls, out_dir: str | Path, normal_image_paths: list[Path]) -> "Synthesizer":
        """A synthesizer with the settings a cache was written with (its ``params.json``), on the
        same normal images (refused, naming the file, when they differ: the cache is stale)."""
        path = Path(out_dir) / "params.json"
        if not path.is_file():
            raise DatasetError(path, "synthesis cache settings missing; run the synthesize stage")
        p = json.loads(path.read_text())
        if p.get("texture_source") == "dtd" and not p.get("dtd_dir"):
            raise DatasetError(path, "written without its DTD folder (dtd_dir); rerun the synthesize stage")
        synth = cls(normal_image_paths, seed=p["seed"], image_size=p["image_size"], kinds=p["kinds"],
                    object_kind=p["object_kind"], dtd_dir=Path(p["dtd_dir"]) if p.get("dtd_dir") else None,
                    params=p.get("params"), where=path)
        if synth.rel != p.get("sources"):
            raise DatasetError(path, f"cache was simulated from {len(p.get('sources') or [])} other normal images "
                                     f"than the {len(synth.rel)} given; rerun the synthesize stage")
        return synth


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
    """Simulate ``n`` anomalous images (``Synthesizer`` samples 0..n-1) from the normal images and
    write them to ``out_dir``. The directory is replaced atomically.
    """
    synth = Synthesizer(normal_image_paths, seed=seed, image_size=image_size, kinds=kinds,
                        object_kind=object_kind, dtd_dir=dtd_dir, params=params, where=Path(out_dir))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        rows = []
        for k in tqdm(range(n), desc=f"synthesize {out_dir.name}", unit="img"):
            row, result = synth.sample(k)
            Image.fromarray(_to_uint8(result.image)).save(tmp / row["file"])
            Image.fromarray(result.mask.astype(np.uint8) * 255).save(tmp / row["mask"])
            rows.append(row)
        with open(tmp / "index.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        write_json(tmp / "params.json", {"n": n, **synth.settings(),
                                         "foreground_whole_image": synth.whole_image_foregrounds(),
                                         "substitutions": synth.substitutions(out_dir.name)})


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
        with Image.open(row["image"]) as im, Image.open(row["mask"]) as m:
            return {**_tensors(im, m, self.size, self.normalize), "kind": row["kind"]}


class OnlineSynthDataset(Dataset):
    """Item ``k`` is ``synthesizer``'s sample k, simulated when it is asked for and returned as
    ``SynthDataset`` returns a cached image (through the same 8-bit PNG values and resizing): a
    training loop that asks for items 0, 1, 2, ... never sees one twice, and items below a
    cache's ``n`` equal that cache's images. ``n`` is the number of items a loop will draw.
    """

    def __init__(self, synthesizer: Synthesizer, size: int, n: int, normalize: bool = True):
        self.synth, self.size, self.n, self.normalize = synthesizer, size, n, normalize

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict[str, Any]:
        row, result = self.synth.sample(int(idx))
        image = Image.fromarray(_to_uint8(result.image))
        mask = Image.fromarray(result.mask.astype(np.uint8) * 255)
        return {**_tensors(image, mask, self.size, self.normalize), "kind": row["kind"]}


def _tensors(image: Image.Image, mask: Image.Image, size: int, normalize: bool) -> dict[str, torch.Tensor]:
    """An 8-bit image and 0/255 mask as tensors: image 3xHxW (bilinear resize to ``size``, in [0, 1]
    or ImageNet-normalised), mask 1xHxW {0, 1} (nearest resize)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if normalize:
        x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    m = mask.convert("L").resize((size, size), Image.NEAREST)
    return {"image": x, "mask": torch.from_numpy((np.asarray(m) > 127).astype(np.float32))[None]}
