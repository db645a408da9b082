"""Evaluation metrics for anomaly detection.

Image level (one score per image): AUROC, average precision, F1-max.
Pixel level (every pixel of every test image): AUROC, AP, F1-max.
Region level:

- **AUPRO** (MVTec AD, Bergmann et al. 2021): the ground-truth masks are split into connected
  components (8-connectivity, as the official ``pro_curve_util.py``); for a threshold t the PRO is
  the mean over all components of all images of |component ∩ {map ≥ t}| / |component|, so small
  defects count as much as large ones; the FPR is over all defect-free pixels. The PRO-vs-FPR curve
  is integrated (trapezoid) up to ``max_fpr`` (0.3), interpolating the point at exactly
  ``max_fpr``, and divided by ``max_fpr`` so that a perfect map scores 1.0.
- **sPRO** (MVTec LOCO, Bergmann et al. 2022): like PRO but per annotated defect with a
  saturation area s_d: the overlap counts min(1, |d ∩ {map ≥ t}| / s_d); integrated up to
  ``max_fpr`` (0.05) and normalised likewise.

A metric that cannot be computed is ``None`` with the reason in ``warnings`` (never NaN): one
class only, or, for every pixel-level metric, an anomalous image without a ground-truth mask
(``masks: optional`` folders; ``has_mask``).

Curves are computed with one sort of all pixel scores and cumulative sums (ties grouped into one
threshold step) — no loop over thresholds.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

_EIGHT = np.ones((3, 3), dtype=int)


def f1_max_threshold(labels, scores) -> tuple[float, float]:
    """(max F1 over all thresholds of the PR curve, the threshold that reaches it)."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(labels), np.asarray(scores))
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=(precision + recall) > 0)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("inf")


def _two_classes(labels) -> bool:
    return len(np.unique(labels)) == 2


def image_metrics(labels, scores) -> dict:
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    if not _two_classes(labels):
        return {"image_auroc": None, "image_ap": None, "image_f1_max": None, "image_f1_threshold": None}
    f1, thr = f1_max_threshold(labels, scores)
    return {"image_auroc": float(roc_auc_score(labels, scores)), "image_ap": float(average_precision_score(labels, scores)),
            "image_f1_max": f1, "image_f1_threshold": thr}


def pixel_metrics(masks, maps) -> dict:
    y = np.asarray(masks, dtype=bool).ravel()
    s = np.asarray(maps, dtype=np.float32).ravel()
    if not _two_classes(y):
        return {"pixel_auroc": None, "pixel_ap": None, "pixel_f1_max": None}
    f1, _ = f1_max_threshold(y, s)
    return {"pixel_auroc": float(roc_auc_score(y, s)), "pixel_ap": float(average_precision_score(y, s)), "pixel_f1_max": f1}


def _cumulative_curve(scores: np.ndarray, w_fpr: np.ndarray, w_pro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by score (descending), accumulate the weights; one point per distinct score, from (0, 0)."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    fpr = np.cumsum(w_fpr[order], dtype=np.float64)
    pro = np.cumsum(w_pro[order], dtype=np.float64)
    last_of_group = np.r_[s[1:] != s[:-1], True]
    return np.r_[0.0, fpr[last_of_group]], np.r_[0.0, pro[last_of_group]]


def _integrate(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under pro(fpr) on [0, max_fpr] (interpolated at max_fpr) / max_fpr."""
    fpr = np.clip(fpr, 0, 1)
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr and keep.sum() < len(fpr):
        j = int(np.argmax(~keep))          # first point beyond the limit
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0) if x1 > x0 else y1
        x, y = np.r_[x, max_fpr], np.r_[y, y_lim]
    return float(np.trapezoid(y, x) / max_fpr)


def pro_curve(masks, maps, max_fpr: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) arrays of the per-region overlap curve (all thresholds)."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float32)
    w_pro = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i in range(len(masks)):
        labelled, n = ndimage.label(masks[i], structure=_EIGHT)
        if n:
            areas = np.bincount(labelled.ravel(), minlength=n + 1).astype(np.float64)
            inv = np.where(areas > 0, 1.0 / np.maximum(areas, 1), 0.0)
            inv[0] = 0.0
            w_pro[i] = inv[labelled]
            n_regions += n
    negatives = ~masks
    if n_regions == 0 or not negatives.any():
        raise ValueError("PRO needs at least one defect region and one defect-free pixel")
    w_fpr = negatives.ravel() / float(negatives.sum())
    return _cumulative_curve(maps.ravel(), w_fpr, w_pro.ravel() / n_regions)


def aupro(masks, maps, max_fpr: float = 0.3) -> float:
    fpr, pro = pro_curve(masks, maps, max_fpr)
    return _integrate(fpr, pro, max_fpr)


def spro_curve(masks_by_defect, maps) -> tuple[np.ndarray, np.ndarray]:
    """sPRO curve. ``masks_by_defect``: one list per image of (bool mask HxW, saturation_area) pairs
    (empty for good images). A defect's pixels beyond its saturation area add nothing: only its
    ⌈s_d⌉ highest-scoring pixels count, each 1/s_d (the last one partially)."""
    maps = np.asarray(maps, dtype=np.float32)
    neg_scores, defect_scores, defect_weights = [], [], []
    n_defects = 0
    for i, defects in enumerate(masks_by_defect):
        anomalous = np.zeros(maps.shape[1:], dtype=bool)
        for mask, saturation in defects:
            mask = np.asarray(mask, dtype=bool)
            if not mask.any():
                continue
            anomalous |= mask
            n_defects += 1
            s = np.sort(maps[i][mask])[::-1]
            sat = float(min(max(saturation, 1e-9), mask.sum()))
            k = int(np.ceil(sat))
            w = np.full(k, 1.0 / sat)
            w[-1] = (sat - (k - 1)) / sat
            defect_scores.append(s[:k])
            defect_weights.append(w)
        neg_scores.append(maps[i][~anomalous])
    neg = np.concatenate(neg_scores) if neg_scores else np.zeros(0, np.float32)
    if n_defects == 0 or neg.size == 0:
        raise ValueError("sPRO needs at least one defect and one defect-free pixel")
    pos = np.concatenate(defect_scores)
    scores = np.r_[neg, pos].astype(np.float64)
    w_fpr = np.r_[np.full(neg.size, 1.0 / neg.size), np.zeros(pos.size)]
    w_pro = np.r_[np.zeros(neg.size), np.concatenate(defect_weights) / n_defects]
    return _cumulative_curve(scores, w_fpr, w_pro)


def spro(masks_by_defect, maps, max_fpr: float = 0.05) -> float:
    fpr, pro = spro_curve(masks_by_defect, maps)
    return _integrate(fpr, pro, max_fpr)


def missing_masks(labels, has_mask) -> int:
    """How many anomalous images have no ground-truth mask (``has_mask`` False; None: none)."""
    if has_mask is None:
        return 0
    return int(np.sum((np.asarray(labels).astype(int) == 1) & ~np.asarray(has_mask, dtype=bool)))


def compute_all(labels, scores, masks, maps, *, max_fpr_pro: float = 0.3, has_mask=None) -> dict:
    """Every metric; those that cannot be computed are None with the reason in ``warnings``:
    image and pixel metrics need both classes; pixel metrics also need the mask of every anomalous
    image (``has_mask``: per image, False for an anomalous image without ground truth, as a
    folder with ``masks: optional`` has; its all-zero mask would count its defect as normal)."""
    out = image_metrics(labels, scores)
    warnings = []
    if out["image_auroc"] is None:
        warnings.append("image metrics need normal and anomalous test images; only one class present")
    missing = missing_masks(labels, has_mask)
    if missing:
        n_anomalous = int(np.sum(np.asarray(labels).astype(int) == 1))
        warnings.append(f"pixel metrics need a ground-truth mask for every anomalous test image; {missing} of "
                        f"{n_anomalous} have none (masks: optional)")
        out.update({"pixel_auroc": None, "pixel_ap": None, "pixel_f1_max": None, "aupro": None})
        out["warnings"] = warnings
        return out
    out.update(pixel_metrics(masks, maps))
    masks = np.asarray(masks, dtype=bool)
    if out["pixel_auroc"] is None:
        warnings.append("pixel metrics need defect and defect-free pixels; only one class present")
        out["aupro"] = None
    else:
        out["aupro"] = aupro(masks, maps, max_fpr_pro)
    out["warnings"] = warnings
    return out


def _thin(rows: list[dict], n: int = 200) -> list[dict]:
    if len(rows) <= n:
        return rows
    idx = np.unique(np.linspace(0, len(rows) - 1, n).round().astype(int))
    return [rows[i] for i in idx]


def curves(labels, scores, masks, maps, max_fpr_pro: float = 0.3, has_mask=None) -> dict[str, list[dict]]:
    """ROC / PR (image and pixel) and PRO curves, ≤ 200 points each, for DVC plots (pixel curves
    only when every anomalous image has its mask, see ``compute_all``)."""
    out: dict[str, list[dict]] = {}
    labels = np.asarray(labels).astype(int)
    pixels = not missing_masks(labels, has_mask)
    y = np.asarray(masks, dtype=bool).ravel()
    s = np.asarray(maps, dtype=np.float32).ravel()
    for level, (yy, ss) in {"image": (labels, np.asarray(scores)), "pixel": (y, s)}.items():
        if not _two_classes(yy) or (level == "pixel" and not pixels):
            continue
        fpr, tpr, _ = roc_curve(yy, ss)
        out[f"roc_{level}"] = _thin([{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr)])
        p, r, _ = precision_recall_curve(yy, ss)
        out[f"pr_{level}"] = _thin([{"recall": float(a), "precision": float(b)} for a, b in zip(r, p)])
    if pixels and _two_classes(y):
        fpr, pro = pro_curve(masks, maps, max_fpr_pro)
        keep = fpr <= max_fpr_pro
        out["pro"] = _thin([{"fpr": float(a), "pro": float(b)} for a, b in zip(fpr[keep], pro[keep])])
    return out
