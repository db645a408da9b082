"""The papers' datasets and protocols on small data the tests make: region metrics at the ground
truth's resolution, the KolektorSDD2 supervised split, non-square inputs, the resize-and-crop
preprocessing and the report's paper column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlab.config import EvalParams
from defectlab.data import scan_category
from defectlab.pipeline import metrics_for

# --------------------------------------------------------------------------- sPRO / PRO at GT resolution

GT = 64          # ground-truth (and image) side
MODEL = 16       # the model's map side: nearest-neighbour shrinking by 4 samples pixels 2, 6, 10, ...


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _tiny_defect_category(root: Path) -> Path:
    """One good and two defective test images: a 16 x 16 defect and a 1-pixel defect at (1, 1),
    which nearest-neighbour shrinking to 16 px erases."""
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (GT, GT, 3), dtype=np.uint8)   # noqa: E731
    cat = root / "parts"
    _write(cat / "train" / "good" / "t0.png", img())
    _write(cat / "test" / "good" / "g0.png", img())
    big, tiny = np.zeros((GT, GT), np.uint8), np.zeros((GT, GT), np.uint8)
    big[32:48, 32:48] = 255
    tiny[1, 1] = 255
    for stem, mask in (("a0", big), ("a1", tiny)):
        _write(cat / "test" / "bad" / f"{stem}.png", img())
        _write(cat / "ground_truth" / "bad" / f"{stem}_mask.png", mask)
    return root


def _out(samples, tiny_found: bool) -> dict:
    """What predict_loader returns at MODEL px: the big defect's cells score 1, the tiny defect's
    cell (0, 0) scores 1 only with ``tiny_found``; every other cell 0."""
    maps = np.zeros((len(samples), MODEL, MODEL), np.float32)
    masks = np.zeros((len(samples), MODEL, MODEL), bool)
    for i, s in enumerate(samples):
        if s.path.stem == "a0":
            maps[i, 8:12, 8:12] = 1.0
            masks[i, 8:12, 8:12] = True
        if s.path.stem == "a1" and tiny_found:
            maps[i, 0, 0] = 1.0
    labels = np.array([s.label for s in samples])
    return {"scores": maps.max(axis=(1, 2)), "maps": maps, "labels": labels, "masks": masks,
            "paths": [str(s.path) for s in samples], "kinds": [s.kind for s in samples],
            "defect_types": [s.defect_type for s in samples]}


def test_tiny_defect_counts_at_ground_truth_resolution(tmp_path):
    data = scan_category(_tiny_defect_category(tmp_path), "parts")
    ev = EvalParams()
    # the 1-pixel defect vanishes from the mask shrunk to the model's 16 px ...
    from defectlab.data import load_mask
    tiny = next(s for s in data.test if s.path.stem == "a1")
    assert load_mask(tiny.mask_paths).sum() == 1 and not load_mask(tiny.mask_paths, MODEL).any()
    # ... but counts as one of the two defects: missed, sPRO and AUPRO are about one half
    missed, _ = metrics_for(_out(data.test, tiny_found=False), ev, data.test, MODEL)
    assert 0.40 < missed["spro"] < 0.55, missed["spro"]
    assert 0.40 < missed["aupro"] < 0.60, missed["aupro"]      # (ties at 0 interpolate up to FPR 0.3)
    assert missed["aupro_bad"] == missed["aupro"]
    # found (its 16-px cell scores high, upsampled onto the pixel), both are near 1
    found, curves = metrics_for(_out(data.test, tiny_found=True), ev, data.test, MODEL)
    assert found["spro"] > 0.9 and found["aupro"] > 0.9, (found["spro"], found["aupro"])
    assert curves["pro"] and curves["pro"][-1]["fpr"] <= ev.max_fpr_pro


def test_overlap_curve_matches_spro_and_keeps_only_the_top_negatives():
    """The streaming curve equals metrics.spro / aupro on the same pixels, while keeping about
    max_fpr of the defect-free pixels."""
    from defectlab import metrics

    rng = np.random.default_rng(1)
    maps = rng.random((6, 40, 40)).astype(np.float32)
    maps[:, ::7] = 0.5                                   # ties
    masks = np.zeros((6, 40, 40), bool)
    masks[1, 5:9, 5:12] = True
    masks[2, 20:30, 3:6] = True
    masks[2, 1, 1] = True
    maps[masks] += 0.3
    defects = [[(masks[i], 5.0)] if masks[i].any() else [] for i in range(6)]
    acc = metrics.OverlapCurve(0.05, maps.size)
    pro_acc = metrics.OverlapCurve(0.3, maps.size)
    for i in range(6):
        acc.add(maps[i], defects[i])
        pro_acc.add(maps[i], metrics.regions(masks[i]))
    assert acc.area() == pytest.approx(metrics.spro(defects, maps, max_fpr=0.05), abs=1e-12)
    assert pro_acc.area() == pytest.approx(metrics.aupro(masks, maps, max_fpr=0.3), abs=1e-12)
    kept = sum(a.size for a in acc._neg)
    assert kept <= 2 * acc.cap + 40 * 40 and acc.cap < 0.06 * maps.size
