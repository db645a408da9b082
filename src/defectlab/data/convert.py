"""Converters from each public dataset's own layout to the common MVTec layout.

Each converter is a pair ``locate(path) -> Path | None`` (find the dataset's tree inside
an extraction folder, or in a folder where the user unpacked it by hand) and
``convert(src, out, categories, link) -> dict`` (write ``out/<category>/...`` in MVTec
layout, plus ``defects.json``; return per-category image counts).

Images are hardlinked when ``link == "hardlink"`` (falls back to a copy across file
systems), else copied; they are never symlinked. Masks that need a change (other name,
other format, grey values other than 0/255) are rewritten as binary 0/255 PNGs named
``<stem>_mask.png``. ``categories`` (params ``datasets.<name>.categories``) selects what is
converted: the source tree (an archive or a folder unpacked by hand) needs to hold only those;
one listed but absent is one error naming the tree and the categories it holds. What each
converter does:

* ``mvtec_ad``: already MVTec layout; copied as is; defects.json marks every type structural.
* ``mvtec_loco``: MVTec layout plus ``validation/good`` and per-image mask *folders*
  (``ground_truth/<type>/<stem>/000.png ...``, one PNG per defect, grey value = the defect's
  ``pixel_value``) and ``defects_config.json``; all kept unchanged (the reader returns the
  folder's files as the sample's masks, ``mvtec.load_defect_masks`` gives per-defect masks
  and saturation areas). defects.json: logical_anomalies -> logical, structural -> structural.
* ``btad``: ``NN/train/ok``, ``NN/test/{ok,ko}``, ``NN/ground_truth/ko/<stem>.{png,bmp}`` ->
  train/good, test/good, test/ko, ground_truth/ko/<stem>_mask.png.
* ``ksdd2``: ``train|test/<id>.png`` with ``<id>_GT.png``; an image is defective when its
  GT has a nonzero pixel. One category ``ksdd2``: train/good = the defect-free training
  images, test/good and test/defect from the test split; the defective training images (246
  in the published split) go to ``labelled/defect/`` with their masks in
  ``labelled_ground_truth/defect/<id>_mask.png``: no method sees them unless it asks for
  labelled anomalies (DSR's ``n_supervised``, the supervised protocol of DSR's Table 2), and
  they are never scored.
* ``mtd`` (Magnetic Tile Defects): ``MT_<Type>/Imgs/<id>.jpg`` with mask ``<id>.png``. One
  category ``magnetic_tile``: defect-free ``MT_Free`` images are split deterministically by
  a hash of the file name (``train_fraction``, default 0.8, of them to train/good, the rest
  to test/good; the split does not depend on file order or platform); every image of
  the five defect folders goes to test/<type in lower case>.
* ``visa``: follows the official ``split_csv/1cls.csv`` (object, split, label, image, mask):
  train/good, test/good, test/bad, ground_truth/bad/<stem>_mask.png (masks binarised:
  VisA masks hold one grey value per defect instance).
"""

from __future__ import annotations

import csv
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
from PIL import Image

from defectlab.data.mvtec import IMAGE_EXTS, _mask_array, require_categories
from defectlab.errors import DatasetError
from defectlab.io import write_json

MVTEC_AD_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                       "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
BTAD_CATEGORIES = ("01", "02", "03")
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                   "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
MTD_DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")


# --------------------------------------------------------------------------- helpers


def place(src: Path, dst: Path, link: str = "hardlink") -> str:
    """Hardlink (or copy) ``src`` to ``dst``; a failed hardlink (another file system, a file
    system without links, a file the user may not link) falls back to a copy. A symlink ``src``
    is followed: ``dst`` is never a symlink. Returns what was done: "hardlink" or "copy"."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "hardlink":
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:
            pass
    shutil.copy2(src, dst)
    return "copy"


def write_binary_mask(src: Path, dst: Path) -> None:
    """``src`` (any mode; nonzero = defect) as a 0/255 8-bit PNG at ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((_mask_array(src) > 0).astype(np.uint8) * 255).save(dst)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _walk_dirs(root: Path, max_depth: int = 3):
    """Directories under ``root`` breadth-first (root first), at most ``max_depth`` levels deep,
    never following symlinks."""
    level = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for d in level:
            yield d
            try:
                nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink()
                              and not p.name.startswith("."))
            except OSError:
                continue
        level = nxt


def _locate(path: Path, test: Callable[[Path], bool], max_depth: int = 3) -> Path | None:
    if not path.is_dir():
        return None
    return next((d for d in _walk_dirs(path, max_depth) if test(d)), None)


def _pick(categories: list[str] | None, available: tuple[str, ...], dataset: str) -> list[str]:
    if categories is None:
        return list(available)
    unknown = sorted(set(categories) - set(available))
    if unknown:
        raise DatasetError(Path(dataset), f"unknown categories {unknown}; valid: {', '.join(available)}")
    return list(categories)


def _safe_rel(root: Path, rel: str, listed_in: Path) -> Path:
    """``root / rel`` for a path read from a file, refusing absolute paths and '..'."""
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise DatasetError(listed_in, f"path {rel!r} leaves the dataset folder")
    return root / pure


# --------------------------------------------------------------------------- MVTec AD / LOCO


def _has_categories(names: tuple[str, ...]) -> Callable[[Path], bool]:
    return lambda d: any((d / c / "train" / "good").is_dir() for c in names)


def _copy_tree(src: Path, dst: Path, link: str) -> Counter:
    counts: Counter = Counter()
    for p in sorted(src.rglob("*")):
        if p.is_symlink():
            raise DatasetError(p, "symlink inside the extracted dataset (refused)")
        if _is_image(p) or (p.is_file() and p.name == "defects_config.json"):
            rel = p.relative_to(src)
            place(p, dst / rel, link)
            if _is_image(p) and rel.parts[0] in ("train", "test", "validation"):
                counts[f"{rel.parts[0]}/{rel.parts[1]}"] += 1
    return counts


def locate_mvtec_ad(path: Path) -> Path | None:
    return _locate(path, _has_categories(MVTEC_AD_CATEGORIES))


def convert_mvtec_ad(src: Path, out: Path, categories: list[str] | None = None, link: str = "hardlink") -> dict:
    summary = {}
    wanted = _pick(categories, MVTEC_AD_CATEGORIES, "mvtec_ad")
    require_categories(src, wanted)         # an archive / folder holding a subset is fine if it has these
    for cat in wanted:
        summary[cat] = dict(_copy_tree(src / cat, out / cat, link))
        defects = sorted(p.name for p in (src / cat / "test").iterdir() if p.is_dir() and p.name != "good")
        write_json(out / cat / "defects.json", {d: "structural" for d in defects})
    return summary


def locate_mvtec_loco(path: Path) -> Path | None:
    return _locate(path, lambda d: any((d / c / "defects_config.json").is_file() or
                                       (d / c / "validation" / "good").is_dir()
                                       for c in MVTEC_LOCO_CATEGORIES) and _has_categories(MVTEC_LOCO_CATEGORIES)(d))


def convert_mvtec_loco(src: Path, out: Path, categories: list[str] | None = None, link: str = "hardlink") -> dict:
    summary = {}
    wanted = _pick(categories, MVTEC_LOCO_CATEGORIES, "mvtec_loco")
    require_categories(src, wanted)
    for cat in wanted:
        summary[cat] = dict(_copy_tree(src / cat, out / cat, link))
        write_json(out / cat / "defects.json", {"logical_anomalies": "logical", "structural_anomalies": "structural"})
    return summary


# --------------------------------------------------------------------------- BTAD


def locate_btad(path: Path) -> Path | None:
    return _locate(path, lambda d: any((d / c / "train" / "ok").is_dir() for c in BTAD_CATEGORIES))


def convert_btad(src: Path, out: Path, categories: list[str] | None = None, link: str = "hardlink") -> dict:
    summary = {}
    for cat in _pick(categories, BTAD_CATEGORIES, "btad"):
        base, dst, counts = src / cat, out / cat, Counter()
        if not base.is_dir():
            raise DatasetError(base, "category missing from the extracted BTAD archive")
        for split, label, new in (("train", "ok", "good"), ("test", "ok", "good"), ("test", "ko", "ko")):
            folder = base / split / label
            for p in sorted(q for q in folder.iterdir() if _is_image(q)) if folder.is_dir() else []:
                place(p, dst / split / new / p.name, link)
                counts[f"{split}/{new}"] += 1
                if label == "ko":
                    masks = [m for m in sorted((base / "ground_truth" / "ko").glob(f"{p.stem}.*")) if _is_image(m)]
                    if not masks:
                        raise DatasetError(p, f"no mask in {base / 'ground_truth' / 'ko'}")
                    write_binary_mask(masks[0], dst / "ground_truth" / "ko" / f"{p.stem}_mask.png")
        write_json(dst / "defects.json", {"ko": "structural"})
        summary[cat] = dict(counts)
    return summary


# --------------------------------------------------------------------------- KolektorSDD2


def locate_ksdd2(path: Path) -> Path | None:
    return _locate(path, lambda d: (d / "train").is_dir() and (d / "test").is_dir()
                   and any((d / "train").glob("*_GT.png")))


def convert_ksdd2(src: Path, out: Path, categories: list[str] | None = None, link: str = "hardlink") -> dict:
    cat = _pick(categories, ("ksdd2",), "ksdd2")[0]
    dst, counts = out / cat, Counter()
    for split in ("train", "test"):
        for p in sorted((src / split).iterdir()):
            if not _is_image(p) or p.stem.endswith("_GT"):
                continue
            gt = p.with_name(f"{p.stem}_GT.png")
            if not gt.is_file():
                raise DatasetError(p, f"no ground truth {gt.name} next to it")
            defective = bool((_mask_array(gt) > 0).any())
            if split == "train":
                if defective:
                    place(p, dst / "labelled" / "defect" / p.name, link)
                    write_binary_mask(gt, dst / "labelled_ground_truth" / "defect" / f"{p.stem}_mask.png")
                    counts["labelled/defect"] += 1
                    continue
                place(p, dst / "train" / "good" / p.name, link)
                counts["train/good"] += 1
            elif defective:
                place(p, dst / "test" / "defect" / p.name, link)
                write_binary_mask(gt, dst / "ground_truth" / "defect" / f"{p.stem}_mask.png")
                counts["test/defect"] += 1
            else:
                place(p, dst / "test" / "good" / p.name, link)
                counts["test/good"] += 1
    write_json(dst / "defects.json", {"defect": "structural"})
    return {cat: dict(counts)}


# --------------------------------------------------------------------------- Magnetic Tile Defects


def locate_mtd(path: Path) -> Path | None:
    return _locate(path, lambda d: (d / "MT_Free" / "Imgs").is_dir())


def convert_mtd(src: Path, out: Path, categories: list[str] | None = None, link: str = "hardlink",
                train_fraction: float = 0.8) -> dict:
    cat = _pick(categories, ("magnetic_tile",), "mtd")[0]
    dst, counts = out / cat, Counter()
    for p in sorted((src / "MT_Free" / "Imgs").iterdir()):
        if _is_image(p) and p.suffix.lower() == ".jpg":
            train = zlib.crc32(p.stem.encode()) % 1000 < round(train_fraction * 1000)
            split = "train" if train else "test"
            place(p, dst / split / "good" / p.name, link)
            counts[f"{split}/good"] += 1
    for defect in MTD_DEFECTS:
        folder = src / f"MT_{defect}" / "Imgs"
        if not folder.is_dir():
            raise DatasetError(folder, "defect folder missing from the Magnetic Tile Defects tree")
        name = defect.lower()
        for p in sorted(folder.iterdir()):
            if not (_is_image(p) and p.suffix.lower() == ".jpg"):
                continue
            mask = p.with_suffix(".png")
            if not mask.is_file():
                raise DatasetError(p, f"no mask {mask.name} next to it")
            place(p, dst / "test" / name / p.name, link)
            write_binary_mask(mask, dst / "ground_truth" / name / f"{p.stem}_mask.png")
            counts[f"test/{name}"] += 1
    write_json(dst / "defects.json", {d.lower(): "structural" for d in MTD_DEFECTS})
    return {cat: dict(counts)}


# --------------------------------------------------------------------------- VisA


def locate_visa(path: Path) -> Path | None:
    return _locate(path, lambda d: (d / "split_csv" / "1cls.csv").is_file())


def convert_visa(src: Path, out: Path, categories: list[str] | None = None, link: str = "hardlink") -> dict:
    wanted = set(_pick(categories, VISA_CATEGORIES, "visa"))
    split_file = src / "split_csv" / "1cls.csv"
    counts: dict[str, Counter] = {c: Counter() for c in sorted(wanted)}
    with open(split_file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"object", "split", "label", "image", "mask"} <= set(rows[0]):
        raise DatasetError(split_file, "expected columns object,split,label,image,mask")
    for row in rows:
        cat, split, label = row["object"], row["split"], row["label"]
        if cat not in wanted:
            continue
        if split not in ("train", "test"):
            raise DatasetError(split_file, f"unexpected split {split!r} for {row['image']}")
        if split == "train" and label != "normal":
            raise DatasetError(split_file, f"anomalous image {row['image']} listed in the train split")
        image = _safe_rel(src, row["image"], split_file)
        if not image.is_file():
            raise DatasetError(image, f"listed in {split_file} but missing")
        kind = "good" if label == "normal" else "bad"
        place(image, out / cat / split / kind / image.name, link)
        counts[cat][f"{split}/{kind}"] += 1
        if kind == "bad":
            if not row["mask"]:
                raise DatasetError(image, f"anomalous image without a mask in {split_file}")
            mask = _safe_rel(src, row["mask"], split_file)
            write_binary_mask(mask, out / cat / "ground_truth" / "bad" / f"{image.stem}_mask.png")
    for cat in wanted:
        write_json(out / cat / "defects.json", {"bad": "structural"})
    return {c: dict(v) for c, v in counts.items()}


Converter = tuple[Callable[[Path], "Path | None"], Callable[..., dict]]
CONVERTERS: dict[str, Converter] = {
    "mvtec_ad": (locate_mvtec_ad, convert_mvtec_ad),
    "mvtec_loco": (locate_mvtec_loco, convert_mvtec_loco),
    "btad": (locate_btad, convert_btad),
    "ksdd2": (locate_ksdd2, convert_ksdd2),
    "mtd": (locate_mtd, convert_mtd),
    "visa": (locate_visa, convert_visa),
}
