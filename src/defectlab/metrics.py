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

Both are defined at the ground truth's resolution: the evaluation (``pipeline.region_metrics_at_gt``)
brings each map back to its mask's size (bilinear, ``data.transform.map_to_original``) and feeds
``OverlapCurve`` image by image, which keeps only the ``max_fpr`` share of highest-scoring
defect-free pixels; ``pro_curve`` / ``spro_curve`` take maps and masks of one common size.

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


class OverlapCurve:
    """PRO or sPRO accumulated image by image, for maps at each ground truth's own resolution
    (images of different sizes; the official MVTec AD / LOCO evaluations score maps at the
    resolution of the ground-truth masks, not masks shrunk to the model's input).

    ``add(map, defects)`` takes one image's map and its defects as (bool mask, saturation area in
    pixels) pairs (``regions(mask)`` gives PRO's connected components, each saturating at its own
    area); a good image has no defects. Memory stays bounded: the curve only needs the
    ``max_fpr`` share of highest-scoring defect-free pixels, so at most about
    ``max_fpr · n_pixels`` of them are kept (``n_pixels``: an upper bound on the number of pixels
    that will be added, e.g. the sum of the images' areas). Ties at the cut are all kept, so the
    area equals ``spro`` / ``aupro`` on the same pixels exactly."""

    def __init__(self, max_fpr: float, n_pixels: int):
        self.max_fpr = float(max_fpr)
        self.cap = int(np.ceil(self.max_fpr * n_pixels)) + 1
        self.n_pixels = int(n_pixels)
        self._neg: list[np.ndarray] = []
        self._n_buf = 0
        self._floor = -np.inf
        self.n_neg = 0
        self.n_units = 0
        self.n_added = 0
        self._pos: list[np.ndarray] = []
        self._w: list[np.ndarray] = []

    def add(self, amap, defects) -> None:
        amap = np.asarray(amap, dtype=np.float32)
        anomalous = np.zeros(amap.shape, dtype=bool)
        for mask, saturation in defects:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != amap.shape:
                raise ValueError(f"defect mask {mask.shape} and map {amap.shape} differ in size")
            if not mask.any():
                continue
            anomalous |= mask
            s = np.sort(amap[mask])[::-1]
            sat = float(min(max(saturation, 1e-9), mask.sum()))
            k = int(np.ceil(sat))
            w = np.full(k, 1.0 / sat)
            w[-1] = (sat - (k - 1)) / sat
            self._pos.append(s[:k])
            self._w.append(w)
            self.n_units += 1
        self.n_added += amap.size
        if self.n_added > self.n_pixels:
            raise ValueError(f"OverlapCurve: {self.n_added} pixels added, more than the n_pixels={self.n_pixels} "
                             "it was sized for")
        neg = amap[~anomalous]
        self.n_neg += neg.size
        neg = neg[neg >= self._floor]
        self._neg.append(neg)
        self._n_buf += neg.size
        if self._n_buf > 2 * self.cap:
            self._compact()

    def _compact(self) -> None:
        buf = np.concatenate(self._neg)
        if buf.size > self.cap:
            kth = np.partition(buf, buf.size - self.cap)[buf.size - self.cap]
            buf = buf[buf >= kth]                  # the cap's largest, every tie of the smallest kept
            self._floor = kth
        self._neg, self._n_buf = [buf], buf.size

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, pro) from (0, 0), one point per distinct score, up to just beyond ``max_fpr``."""
        if self.n_units == 0 or self.n_neg == 0:
            raise ValueError("PRO / sPRO need at least one defect and one defect-free pixel")
        neg = np.concatenate(self._neg) if self._neg else np.zeros(0, np.float32)
        pos = np.concatenate(self._pos)
        scores = np.r_[neg, pos].astype(np.float64)
        w_fpr = np.r_[np.full(neg.size, 1.0 / self.n_neg), np.zeros(pos.size)]
        w_pro = np.r_[np.zeros(neg.size), np.concatenate(self._w) / self.n_units]
        fpr, pro = _cumulative_curve(scores, w_fpr, w_pro)
        return fpr, pro

    def area(self) -> float:
        """Normalised area under the curve up to ``max_fpr`` (as ``spro`` / ``aupro``)."""
        fpr, pro = self.curve()
        return _integrate(fpr, pro, self.max_fpr)


def regions(mask) -> list[tuple[np.ndarray, float]]:
    """PRO's units: the 8-connected components of ``mask``, each with its area as saturation."""
    labelled, n = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT)
    out = []
    for i in range(1, n + 1):
        comp = labelled == i
        out.append((comp, float(comp.sum())))
    return out


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
