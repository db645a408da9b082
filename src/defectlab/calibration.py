"""Decision thresholds and score normalisation, chosen on held-out validation images.

The `fit` stage scores the category's validation split (normal images never used for fitting:
``validation/good`` or a seeded share of ``train/good``, see ``defectlab.data.split``) and stores
the result in the model's own ``model.json``, so anything that scores images later reads it from
the model folder, never from params.yaml or the test set::

    "threshold":     {"image": t, "pixel": p, "rule": "fpr<=0.01", "source": "validation",
                      "n_normal": 6, "n_anomalous": 0}
    "normalization": {"image": {"low": l, "threshold": t}, "pixel": {"low": lp, "threshold": p}}

Rules (``calibration.rule`` in params.yaml):

* ``fpr``: the smallest threshold that flags at most ``target_fpr`` of the normal validation
  images (for pixels: ``pixel_target_fpr`` of the normal validation pixels);
* ``f1_max``: the cut point with the best F1, which needs anomalous validation images;
* ``auto`` (default): ``f1_max`` when the validation split holds both classes, else ``fpr``
  (the usual case: validation sets of real lines, and MVTec LOCO's, hold normal images only).

Normalisation is linear with the threshold at 0.5 and the reference low point at 0, clipped to
[0, 1]: ``n(s) = clip(0.5 + 0.5 (s - t) / (t - low), 0, 1)``. ``low`` is the lowest normal image
score (image scores) or the median normal pixel (maps). So for every method a normalised score of
0.5 means "at the threshold", and a heatmap's colours mean the same thing in every run.
"""

from __future__ import annotations

import numpy as np

from defectlab.errors import ConfigError

RULES = ("auto", "f1_max", "fpr")
#: at most this many pixel values enter the pixel quantiles (strided subsample beyond it)
MAX_PIXEL_SAMPLES = 4_000_000


def select_threshold(scores, labels, rule: str = "f1_max", target_fpr: float = 0.05) -> float:
    """Image-score threshold from validation scores: ``f1_max`` (best F1 over all cut points),
    ``fpr`` (smallest threshold whose false-positive rate on the normal images is <= target_fpr)
    or ``auto`` (f1_max with both classes, else fpr). A score ``>= threshold`` is anomalous."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if scores.size == 0:
        raise ConfigError("threshold selection: no validation scores")
    if rule == "auto":
        rule = "f1_max" if 0 < labels.sum() < labels.size else "fpr"
    if rule == "fpr":
        normal = np.sort(scores[labels == 0])
        if normal.size == 0:
            raise ConfigError("threshold rule 'fpr' needs normal validation images")
        # allow at most floor(target_fpr * n) normal images at or above the threshold
        k = int(np.floor(target_fpr * normal.size))
        return float(np.nextafter(normal[-k - 1], np.inf))
    if rule == "f1_max":
        if labels.sum() == 0 or labels.sum() == labels.size:
            raise ConfigError("threshold rule 'f1_max' needs normal and anomalous validation images "
                              "(use rule 'auto' or 'fpr' for a validation split of normal images only)")
        best_t, best_f1 = float(scores.max()), -1.0
        for t in np.unique(scores):
            pred = scores >= t
            tp = float(np.sum(pred & (labels == 1)))
            fp = float(np.sum(pred & (labels == 0)))
            fn = float(np.sum(~pred & (labels == 1)))
            f1 = 2 * tp / max(2 * tp + fp + fn, 1e-12)
            if f1 > best_f1:
                best_t, best_f1 = float(t), f1
        return best_t
    raise ConfigError(f"threshold rule: must be one of {', '.join(RULES)} (got {rule!r})")


def rule_name(rule: str, labels, target_fpr: float) -> str:
    """The rule as recorded (``auto`` resolved; ``fpr`` with its target)."""
    labels = np.asarray(labels).astype(int)
    if rule == "auto":
        rule = "f1_max" if 0 < labels.sum() < labels.size else "fpr"
    return f"fpr<={target_fpr}" if rule == "fpr" else rule


def _pixel_sample(maps: np.ndarray) -> np.ndarray:
    flat = np.asarray(maps, dtype=np.float32).reshape(-1)
    step = max(1, flat.size // MAX_PIXEL_SAMPLES)
    return flat[::step]


def calibrate(scores, labels, maps, *, rule: str = "auto", target_fpr: float = 0.01,
              pixel_target_fpr: float = 0.001, source: str = "validation") -> dict:
    """The ``threshold`` and ``normalization`` blocks of model.json from validation outputs:
    image ``scores`` (N,), ``labels`` (N,) 0 = normal, anomaly ``maps`` (N, H, W)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if scores.size == 0:
        raise ConfigError("calibration: the validation split is empty (set datasets.<name>.validation_fraction "
                          "> 0 or add <category>/validation/good images)")
    t = select_threshold(scores, labels, rule, target_fpr)
    normal = labels == 0
    if not normal.any():
        raise ConfigError("calibration: the validation split holds no normal images")
    pixels = _pixel_sample(np.asarray(maps)[normal])
    p = float(np.nextafter(np.quantile(pixels, 1.0 - pixel_target_fpr), np.inf))
    return {
        "threshold": {"image": t, "pixel": p, "rule": rule_name(rule, labels, target_fpr),
                      "pixel_rule": f"fpr<={pixel_target_fpr}", "source": source,
                      "n_normal": int(normal.sum()), "n_anomalous": int((~normal).sum())},
        "normalization": {"image": {"low": float(scores[normal].min()), "threshold": t},
                          "pixel": {"low": float(np.median(pixels)), "threshold": p}},
    }


def normalize(values, block: dict):
    """Apply one normalisation block ({low, threshold}): threshold -> 0.5, low -> 0, clipped to [0, 1]."""
    t, low = float(block["threshold"]), float(block["low"])
    scale = t - low if t > low else max(abs(t), 1e-12)
    return np.clip(0.5 + 0.5 * (np.asarray(values, dtype=np.float64) - t) / scale, 0.0, 1.0)
