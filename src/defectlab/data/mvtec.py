"""MVTec-format reader for any folder, strict about what it accepts.

Layout (one folder per category)::

    <root>/<category>/train/good/*.png            normal training images (required, non-empty)
    <root>/<category>/validation/good/*.png       optional normal validation images (MVTec LOCO)
    <root>/<category>/test/<kind>/*.png           'good' or a defect type
    <root>/<category>/ground_truth/<kind>/<stem>_mask.png   one mask per defective image, or
    <root>/<category>/ground_truth/<kind>/<stem>.png        (same, BTAD-style name), or
    <root>/<category>/ground_truth/<kind>/<stem>/*.png      a folder of per-defect masks (LOCO)
    <root>/<category>/labelled/<kind>/*.png       optional annotated anomalous *training* images (the
                                                  supervised protocols, e.g. KolektorSDD2's 246), never
                                                  scored; their masks in
    <root>/<category>/labelled_ground_truth/<kind>/<stem>_mask.png   (every one needs its mask)
    <root>/<category>/defects.json                optional {defect type: structural|logical}
    <root>/<category>/defects_config.json         optional LOCO sPRO config (see load_defect_masks)

Images may be .png .jpg .jpeg .bmp .tif .tiff (any case); other files and hidden files
are ignored. Every problem is a ``DatasetError`` whose message starts with the offending
file. What the reader does with each kind of bad input:

========================================  ============================================
input                                     behaviour
========================================  ============================================
zero-byte image or mask                   DatasetError "empty file (0 bytes)"
non-image content with an image suffix    DatasetError "not a readable image"
corrupt / truncated image                 DatasetError "corrupt or truncated image"
                                          (header problems at scan time, truncated
                                          pixel data when decoded: load_image /
                                          verify_samples)
grayscale, palette, RGBA/LA, CMYK,        converted to RGB (alpha dropped, gray
16-bit (I;16), 32-bit int, float          replicated, 16-bit scaled by 1/65535)
image over MAX_PIXELS (from its header,   DatasetError "image too large", before any
before decoding)                          pixel is decoded (bounded memory)
mask size differs from its image          DatasetError naming the mask and the image
defective test image without a mask       DatasetError naming the image and the
                                          expected mask path; with
                                          ``masks_optional`` (params ``masks:
                                          optional``) accepted as label 1 without
                                          masks (pixel metrics of its category: null)
mask present for a test/good image        ignored if it is empty; DatasetError if it
                                          marks any pixel (the label contradicts it)
empty or missing train/good               DatasetError
file or folder symlinked outside root     DatasetError "symlink points outside the
                                          dataset root"
unknown category                          DatasetError listing the valid categories
                                          (``source: folder``: all listed categories
                                          missing from the root in one error)
non-square image                          resized with ``datasets.<name>.resize``
                                          (squash | shorter_side_crop | pad, see
                                          defectlab.data.transform)
malformed defects.json /                  DatasetError naming the file
defects_config.json
no validation/good                        validation images held out of train/good
                                          (defectlab.data.split; pipeline stages only)
bad file in a ``source: folder`` root     the errors above, naming the file in the
                                          root, raised before anything is linked
                                          (data/prepared/<ds> stays as it was)
========================================  ============================================

``MAX_PIXELS`` defaults to 80 megapixels (MVTec's largest images are 1024x1024, VisA's
about 1.5k x 2k); the environment variable ``DEFECTLAB_MAX_PIXELS`` overrides it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from defectlab.data.transform import (IMAGENET_MEAN, IMAGENET_STD, area_scale, current_mode, hw, resize_image,
                                      resize_mask)
from defectlab.errors import DatasetError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = int(os.environ.get("DEFECTLAB_MAX_PIXELS", 80_000_000))
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


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
    #: annotated anomalous training images (``labelled/<kind>/``): for supervised training only
    labelled: list[Sample] = field(default_factory=list)


# --------------------------------------------------------------------------- files


def _check_inside(path: Path, root: Path) -> Path:
    """``path`` resolved; ``DatasetError`` if a symlink takes it outside ``root``."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise DatasetError(path, f"symlink points outside the dataset root {root} (to {real})")
    return real


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _images(folder: Path, root: Path) -> list[Path]:
    """Image files of ``folder`` (sorted), each checked to stay inside ``root``."""
    if not folder.is_dir():
        return []
    _check_inside(folder, root)
    out = []
    for p in sorted(folder.iterdir()):
        if _is_image_name(p):
            _check_inside(p, root)
            if not p.is_file():
                raise DatasetError(p, "not a regular file")
            out.append(p)
    return out


def probe_image(path: str | Path) -> tuple[int, int, str]:
    """(width, height, mode) from the header only; DatasetError for empty, non-image or huge files."""
    im = _open_checked(Path(path), decode=False)
    return im.width, im.height, im.mode


def _open_checked(path: Path, decode: bool) -> Image.Image:
    """Open ``path``, check it from its header (empty, not an image, over MAX_PIXELS), then,
    with ``decode``, decode the pixels (truncated data fails here). One open per call."""
    try:
        if path.stat().st_size == 0:
            raise DatasetError(path, "empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.width, im.height
            _check_size(path, w, h)
            if not decode:
                return im
            im.load()
            return im.copy()
    except DatasetError:
        raise
    except Image.DecompressionBombError as err:
        raise DatasetError(path, f"image too large ({err})") from None
    except UnidentifiedImageError:
        raise DatasetError(path, "not a readable image (unknown or damaged format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(path, f"corrupt or truncated image ({err})") from None


def _check_size(path: Path, w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise DatasetError(
            path, f"image too large ({w}x{h} = {w * h} pixels > limit {MAX_PIXELS}; "
            "set DEFECTLAB_MAX_PIXELS to raise it)"
        )
    if w == 0 or h == 0:
        raise DatasetError(path, f"image has zero size ({w}x{h})")


def _find_masks(base: Path, defect: str, stem: str, root: Path, gt_dir: str = "ground_truth") -> tuple[Path, ...]:
    """Mask files for test image ``stem`` of ``defect``: <stem>_mask.*, <stem>.* or <stem>/*
    (under ``<base>/<gt_dir>/<defect>``)."""
    gt = base / gt_dir / defect
    if not gt.is_dir():
        return ()
    for name in (f"{stem}_mask", stem):
        for ext in (".png", *sorted(IMAGE_EXTS - {".png"})):
            for cand in (gt / f"{name}{ext}", gt / f"{name}{ext.upper()}"):
                if cand.is_file():
                    _check_inside(cand, root)
                    return (cand,)
    folder = gt / stem
    if folder.is_dir():
        return tuple(_images(folder, root))
    return ()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(path, f"malformed JSON ({err})") from None


# --------------------------------------------------------------------------- scanning


def list_categories(root: str | Path) -> list[str]:
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []


def require_categories(root: str | Path, categories) -> None:
    """One DatasetError naming ``root`` and the categories it holds when any of ``categories``
    has no folder there (or ``root`` itself is missing)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "dataset folder not found")
    missing = [c for c in categories if not (root / c).is_dir()]
    if missing:
        raise DatasetError(root, f"categories {missing} not found in this folder; it holds: "
                                 f"{', '.join(list_categories(root)) or 'none'}")


def scan_category(root: str | Path, category: str, *, check_images: bool = True,
                  masks_optional: bool = False) -> CategoryData:
    """Index one category; with ``check_images`` also read every image/mask header (sizes,
    formats, pixel limit) so that bad files fail here, naming the file, not mid-training.
    ``masks_optional``: a defective test image without a mask is a Sample with label 1 and no
    ``mask_paths`` instead of an error."""
    root = Path(root)
    base = root / category
    if not base.is_dir():
        raise DatasetError(base, f"category not found; valid: {', '.join(list_categories(root)) or 'none'}")
    _check_inside(base, root)
    train_dir = base / "train" / "good"
    train = [Sample(p, 0, "good") for p in _images(train_dir, root)]
    if not train:
        raise DatasetError(train_dir, "no training images (train/good is empty or missing)")
    validation = [Sample(p, 0, "good") for p in _images(base / "validation" / "good", root)]
    kinds = _read_json(base / "defects.json") if (base / "defects.json").exists() else {}
    if not isinstance(kinds, dict):
        raise DatasetError(base / "defects.json", "must map defect type -> structural|logical")
    test = []
    test_dir = base / "test"
    for d in sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []:
        for p in _images(d, root):
            masks = _find_masks(base, d.name, p.stem, root)
            if d.name == "good":
                if masks and check_images and load_mask(masks).any():
                    raise DatasetError(
                        masks[0], f"mask marks defect pixels but its image {p} is in test/good"
                    )
                test.append(Sample(p, 0, "good"))
                continue
            if not masks and not masks_optional:
                expected = base / "ground_truth" / d.name / f"{p.stem}_mask.png"
                raise DatasetError(p, f"defective test image has no mask (expected {expected})")
            test.append(Sample(p, 1, d.name, masks, str(kinds.get(d.name, "unknown"))))
    labelled = []
    labelled_dir = base / "labelled"
    for d in sorted(p for p in labelled_dir.iterdir() if p.is_dir()) if labelled_dir.is_dir() else []:
        for p in _images(d, root):
            masks = _find_masks(base, d.name, p.stem, root, "labelled_ground_truth")
            if not masks:
                expected = base / "labelled_ground_truth" / d.name / f"{p.stem}_mask.png"
                raise DatasetError(p, f"labelled anomalous training image has no mask (expected {expected})")
            labelled.append(Sample(p, 1, d.name, masks, str(kinds.get(d.name, "unknown"))))
    data = CategoryData(root, category, train, test, validation, labelled)
    if check_images:
        for s in [*data.train, *data.validation, *data.test, *data.labelled]:
            w, h, _ = probe_image(s.path)
            for m in s.mask_paths:
                mw, mh, _ = probe_image(m)
                if (mw, mh) != (w, h):
                    raise DatasetError(m, f"mask size {mw}x{mh} differs from its image {s.path} ({w}x{h})")
    return data


def verify_samples(samples, *, raise_first: bool = True) -> list[tuple[Path, str]]:
    """Fully decode every image and mask (finds truncated pixel data the header check misses).

    ``raise_first``: raise the first ``DatasetError``; else return [(file, problem)] so a
    batch flow can quarantine the files and go on.
    """
    problems = []
    for s in samples:
        try:
            load_image(s.path)
            if s.mask_paths:
                load_mask(s.mask_paths)
        except DatasetError as err:
            if raise_first:
                raise
            problems.append((err.path, err.problem))
    return problems


# --------------------------------------------------------------------------- decoding


def _to_rgb_uint8(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit scaled by 1/257, alpha dropped, gray replicated."""
    if im.mode in SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode in SIXTEEN_BIT_MODES:
            scale = 65535.0
        elif im.mode == "F" and arr.max(initial=0) <= 1.0:
            scale = 1.0
        else:  # 32-bit int or float: 8-bit range if it fits, else 16-bit
            scale = 255.0 if arr.max(initial=0) <= 255 else 65535.0
        im = Image.fromarray(np.rint(np.clip(arr / scale, 0, 1) * 255).astype(np.uint8))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def _decode(path: Path) -> Image.Image:
    """Decode ``path`` fully (after the header checks); DatasetError on any failure."""
    return _open_checked(path, decode=True)


def _load_rgb(path: Path) -> Image.Image:
    return _to_rgb_uint8(_decode(path))


def load_image(path: str | Path, size: int | tuple[int, int] | None = None, resize: str | None = None) -> np.ndarray:
    """RGB float32 HxWx3 in [0, 1]; with ``size`` (int: square, or (h, w)), at that size by ``transform.resize_image`` with
    mode ``resize`` (default: the enclosing ``transform.resize_mode`` block's, else squash)."""
    im = _load_rgb(Path(path))
    if size:
        im = resize_image(im, size, current_mode(resize))
    return np.asarray(im, dtype=np.float32) / 255.0


def _mask_array(path: Path) -> np.ndarray:
    """A mask file's raw values as a 2-D integer array (colour masks: max over channels)."""
    im = _decode(path)
    if im.mode == "P":
        im = im.convert("L")
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].max(-1)  # colour mask: a pixel is set if any colour channel is
    return arr


def load_mask(paths, size: int | tuple[int, int] | None = None, resize: str | None = None) -> np.ndarray:
    """Union of the mask files (nonzero = defect) as bool HxW; with ``size``, at that size (nearest,
    the geometry of ``load_image`` with the same ``resize`` mode)."""
    out, first = None, None
    for p in paths:
        p = Path(p)
        m = _mask_array(p) > 0
        if out is not None and m.shape != out.shape:
            raise DatasetError(p, f"mask size {m.shape[1]}x{m.shape[0]} differs from {first} "
                                  f"({out.shape[1]}x{out.shape[0]})")
        out, first = (m, p) if out is None else (out | m, first)
    if out is None:
        raise DatasetError(Path("."), "load_mask called without mask files")
    if size:
        out = resize_mask(out, size, current_mode(resize))
    return out


# --------------------------------------------------------------------------- MVTec LOCO defects


@dataclass(frozen=True)
class DefectConfig:
    """One entry of MVTec LOCO's defects_config.json: a defect type, the grey value its
    ground-truth PNGs use, and its sPRO saturation threshold (pixels, or a fraction of the
    defect's area when ``relative_saturation``)."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


def load_defects_config(category_dir: str | Path) -> dict[int, DefectConfig]:
    """``<category>/defects_config.json`` keyed by pixel value ({} when the file is absent)."""
    path = Path(category_dir) / "defects_config.json"
    if not path.exists():
        return {}
    raw = _read_json(path)
    try:
        configs = [
            DefectConfig(str(e["defect_name"]), int(e["pixel_value"]), float(e["saturation_threshold"]),
                         bool(e["relative_saturation"]))
            for e in raw
        ]
    except (TypeError, KeyError, ValueError) as err:
        raise DatasetError(path, f"expected a list of {{defect_name, pixel_value, saturation_threshold, "
                                 f"relative_saturation}} entries ({err!r})") from None
    return {c.pixel_value: c for c in configs}


def load_defect_masks(
    sample: Sample, config: dict[int, DefectConfig] | None = None, size: int | tuple[int, int] | None = None,
    resize: str | None = None,
) -> list[tuple[np.ndarray, float]]:
    """Per-defect masks of ``sample`` with their sPRO saturation areas (pixels), as
    ``defectlab.metrics.spro`` takes them.

    Each distinct nonzero grey value in each mask file is one defect. With a LOCO
    ``config`` the value must be listed there; saturation area = threshold x defect area
    truncated to whole pixels (relative) or threshold (absolute), capped at the defect's area
    (as the official evaluation's ``get_saturation_area``), measured at the
    original resolution and scaled by the area ratio when ``size`` resizes the mask (mode
    ``resize`` as in ``load_mask``). Without
    a config the saturation area is the whole defect (sPRO reduces to PRO).
    """
    out = []
    mode = current_mode(resize)
    for p in sample.mask_paths:
        arr = _mask_array(Path(p))
        h, w = arr.shape
        for value in np.unique(arr[arr > 0]):
            mask = arr == value
            area = float(mask.sum())
            if config:
                cfg = config.get(int(value))
                if cfg is None:
                    raise DatasetError(p, f"grey value {int(value)} is not in defects_config.json "
                                          f"(known: {sorted(config)})")
                # as the official evaluation: a relative area is truncated to whole pixels
                sat = float(int(cfg.saturation_threshold * area)) if cfg.relative_saturation \
                    else cfg.saturation_threshold
                sat = min(sat, area)
            else:
                sat = area
            if size:
                mask = resize_mask(mask, size, mode)
                sat *= area_scale(h, w, size, mode)
            out.append((mask, float(sat)))
    return out


# --------------------------------------------------------------------------- torch dataset


class ImageDataset(torch.utils.data.Dataset):
    """Samples as model inputs: ``image`` 3 x h x w (ImageNet-normalised; ``size``: int for a
    square input, or (h, w)), ``mask`` 1 x h x w (zeros when the sample has none; ``has_mask`` says which), ``orig_size`` (h, w)
    of the file. ``resize``: the mode (default: the ``transform.resize_mode`` in force when the
    dataset is built, so worker processes of a DataLoader use it too)."""

    def __init__(self, samples, size: int | tuple[int, int], normalize: bool = True, resize: str | None = None):
        self.samples, self.size, self.normalize = list(samples), size, normalize
        self.hw = hw(size)
        self.resize = current_mode(resize)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        im = _load_rgb(Path(s.path))
        orig_size = (im.height, im.width)
        img = torch.from_numpy(np.asarray(resize_image(im, self.size, self.resize), dtype=np.float32) / 255.0)
        img = img.permute(2, 0, 1)
        if self.normalize:
            img = (img - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        mask = torch.from_numpy(load_mask(s.mask_paths, self.size, self.resize).astype(np.float32))[None] \
            if s.mask_paths else torch.zeros(1, *self.hw)
        return {"image": img, "mask": mask, "label": s.label, "path": str(s.path), "kind": s.kind,
                "defect_type": s.defect_type, "orig_size": orig_size, "has_mask": bool(s.mask_paths)}
