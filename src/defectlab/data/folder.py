"""``source: folder``: a user's own MVTec-format tree as a prepared dataset.

``import_folder(root, out, categories)`` takes only the listed categories of ``root`` (any
MVTec-format folder, see defectlab.data.mvtec), validates every file the reader would use with
the reader's own rules (``scan_category``: layout, headers, mask sizes, symlinks leaving the
root; ``verify_samples``: every image and mask fully decoded) and only then places them under
``out/<category>/`` with the same relative paths: hard links when ``root`` and ``out`` are on
the same file system (no second copy of a large folder), else copies. Never symlinks: the
reader refuses links that leave the dataset root, and a link would let an edit of the user's
folder change a prepared data version behind DVC's back. What is placed per category: the
images and masks of train/good, validation/good, test/<kind>, ground_truth/<kind>, plus
``defects.json`` / ``defects_config.json``; any other file is left out.

A hard link shares the file with the user's folder: the prepared tree is never written through
(merged files replace a link, they do not write into it). An editor that rewrites an image in
place changes both names; one that saves a new file (most do) breaks the link, and `prepare`
links it again on its next run.
"""

from __future__ import annotations

from pathlib import Path

from defectlab.data.convert import place
from defectlab.data.mvtec import _check_inside, require_categories, scan_category, verify_samples

#: category-level files the reader uses besides images and masks
CATEGORY_FILES = ("defects.json", "defects_config.json")


def link_mode(modes: set[str]) -> str:
    """One word for how a category's files were placed: hardlink, copy, or hardlink+copy."""
    return "+".join(sorted(modes)) if modes else "none"


def import_folder(root: str | Path, out: str | Path, categories, *, masks_optional: bool = False,
                  link: str = "hardlink") -> dict[str, dict]:
    """Validate ``categories`` of ``root``, then place their files under ``out``.

    Nothing is written before every file of every listed category has passed (a bad file raises
    the reader's ``DatasetError`` naming the file in ``root``). Returns, per category,
    ``{"link_mode": ..., "files": n, "placed": [paths under out]}``.
    """
    root, out = Path(root), Path(out)
    require_categories(root, categories)
    files: dict[str, list[Path]] = {}
    for cat in categories:
        data = scan_category(root, cat, masks_optional=masks_optional)
        verify_samples([*data.train, *data.validation, *data.test])
        listed = [p for s in (*data.train, *data.validation, *data.test) for p in (s.path, *s.mask_paths)]
        listed += [root / cat / name for name in CATEGORY_FILES
                   if (root / cat / name).is_file() and _check_inside(root / cat / name, root)]
        files[cat] = list(dict.fromkeys(listed))          # a mask shared by two entries is placed once
    report = {}
    for cat, srcs in files.items():
        modes, placed = set(), []
        for src in srcs:
            dst = out / src.relative_to(root)
            modes.add(place(src, dst, link))
            placed.append(dst)
        report[cat] = {"link_mode": link_mode(modes), "files": len(placed), "placed": placed}
    return report
