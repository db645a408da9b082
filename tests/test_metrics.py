"""Metrics against hand-computed values and against a slow, obviously-correct reference."""

import numpy as np
import pytest
from scipy import ndimage

from defectlab import metrics


def test_image_metrics_hand_computed():
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    m = metrics.image_metrics(labels, scores)
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4
    assert m["image_auroc"] == pytest.approx(0.75)
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5 * 1 + 0.5 * 2/3
    assert m["image_ap"] == pytest.approx(0.5 + 1 / 3)
    # threshold 0.35: P = 2/3, R = 1 -> F1 = 0.8 (better than P = 1, R = 0.5 -> 2/3)
    assert m["image_f1_max"] == pytest.approx(0.8)
    assert m["image_f1_threshold"] == pytest.approx(0.35)


def test_one_class_gives_none_with_reason_not_nan():
    out = metrics.compute_all(np.zeros(3, int), np.arange(3.0), np.zeros((3, 4, 4), bool), np.random.rand(3, 4, 4))
    assert out["image_auroc"] is None and out["pixel_auroc"] is None and out["aupro"] is None
    assert len(out["warnings"]) == 2


def _hand_case():
    mask = np.array([[1, 0, 0, 0, 0],
                     [0, 0, 0, 1, 1]], dtype=bool)      # region A: 1 px, region B: 2 px (not 8-connected)
    amap = np.array([[0.9, 0.7, 0.5, 0.3, 0.1],
                     [0.05, 0.04, 0.03, 0.8, 0.2]], dtype=np.float32)
    return mask[None], amap[None]


def test_aupro_hand_computed():
    masks, maps = _hand_case()
    # thresholds descending: 0.9 -> A covered: PRO 0.5, FPR 0; 0.8 -> B half: PRO 0.75; then negatives 0.7, 0.5, 0.3
    # raise the FPR in steps of 1/7 while PRO stays 0.75; at 0.2 B is complete (PRO 1.0, FPR 3/7); 0.1 -> FPR 4/7.
    # up to FPR 0.5: 0.75 * 3/7 + 1.0 * (0.5 - 3/7), normalised by 0.5
    assert metrics.aupro(masks, maps, max_fpr=0.5) == pytest.approx((0.75 * 3 / 7 + (0.5 - 3 / 7)) / 0.5)
    assert metrics.aupro(masks, maps, max_fpr=0.3) == pytest.approx(0.75)


def _reference_aupro(masks, maps, max_fpr):
    """Loop over every distinct threshold (slow, as in the definition)."""
    fprs, pros = [0.0], [0.0]
    comps = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        comps += [(i, lab == k) for k in range(1, n + 1)]
    neg = ~masks
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & neg).sum() / neg.sum())
        pros.append(np.mean([(pred[i] & c).sum() / c.sum() for i, c in comps]))
    fprs, pros = np.array(fprs), np.array(pros)
    grid = np.linspace(0, max_fpr, 20001)
    # step-free interpolation of the piecewise-linear curve (take the highest PRO at a repeated FPR)
    order = np.lexsort((pros, fprs))
    xs, ys = fprs[order], pros[order]
    uniq, idx = np.unique(xs, return_index=True)
    last = np.r_[idx[1:] - 1, len(xs) - 1]
    first_y, last_y = ys[idx], ys[last]
    # area = integral of the curve; vertical jumps add nothing; integrate with the trapezoid on the points
    area = 0.0
    px, py = 0.0, first_y[0]
    for x, y0, y1 in zip(uniq, first_y, last_y):
        if x > max_fpr:
            area += (max_fpr - px) * (py + py + (y0 - py) * (max_fpr - px) / (x - px)) / 2
            px = max_fpr
            break
        area += (x - px) * (py + y0) / 2
        px, py = x, y1
    del grid
    return area / max_fpr


def test_aupro_matches_reference_on_random_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:6, 3:9] = True
    masks[0, 15:20, 15:17] = True
    masks[1, 10:14, 10:14] = True
    maps = rng.random((3, 24, 24)).astype(np.float32) + 0.6 * masks
    maps = np.round(maps, 2)   # ties between pixels are grouped into one threshold step
    for max_fpr in (0.05, 0.3, 1.0):
        assert metrics.aupro(masks, maps, max_fpr) == pytest.approx(_reference_aupro(masks, maps, max_fpr), abs=1e-9)


def test_aupro_perfect_and_inverted_maps():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    assert metrics.aupro(masks, masks.astype(float), 0.3) == pytest.approx(1.0)
    assert metrics.aupro(masks, (~masks).astype(float), 0.3) == pytest.approx(0.0)


def test_spro_saturation_hand_computed():
    amap = np.zeros((1, 4, 4), np.float32)
    mask = np.zeros((4, 4), bool)
    mask[0, :4] = True                                  # one defect of 4 px
    amap[0, 0, :4] = [0.9, 0.8, 0.1, 0.05]
    amap[0, 3, :] = [0.7, 0.6, 0.5, 0.4]                 # the highest negatives
    fpr, pro = metrics.spro_curve([[(mask, 2.0)]], amap)
    # saturation 2: 0.9 -> 1/2 overlap, 0.8 -> saturated (1.0); more pixels add nothing
    assert pro.max() == pytest.approx(1.0)
    assert pro[1] == pytest.approx(0.5) and pro[2] == pytest.approx(1.0) and fpr[2] == 0.0
    assert metrics.spro([[(mask, 2.0)]], amap, max_fpr=0.05) == pytest.approx(1.0)
    # saturation = the defect's area: sPRO equals PRO of that single region
    fpr_s, pro_s = metrics.spro_curve([[(mask, 4.0)]], amap)
    fpr_p, pro_p = metrics.pro_curve(mask[None], amap)
    assert np.allclose(np.interp(np.linspace(0, 1, 50), fpr_s, pro_s), np.interp(np.linspace(0, 1, 50), fpr_p, pro_p))


def test_spro_fpr_counts_defect_free_pixels_of_every_image():
    """As the MVTec LOCO evaluation does, the FPR is taken over the defect-free pixels of all test
    images, anomalous ones included, not over the good images only (nor over defect pixels).
    Hand-computed: 16 good + 12 defect-free pixels of the anomalous image = 28 negatives; the one
    false positive (0.95) sits in the anomalous image, above its defect (0.9)."""
    amap = np.zeros((2, 4, 4), np.float32)               # image 0 good, image 1 anomalous
    mask = np.zeros((4, 4), bool)
    mask[0, :] = True
    amap[1, 0, :] = 0.9
    amap[1, 3, 3] = 0.95
    defects = [[], [(mask, 4.0)]]
    fpr, pro = metrics.spro_curve(defects, amap)
    assert np.allclose(fpr, [0.0, 1 / 28, 1 / 28, 1.0]) and np.allclose(pro, [0.0, 0.0, 1.0, 1.0])
    # area up to FPR 0.05: sPRO 0 until 1/28, then 1 -> (0.05 - 1/28) / 0.05
    assert metrics.spro(defects, amap, max_fpr=0.05) == pytest.approx(1 - 20 / 28)
    # good images only would see no false positive at all (sPRO 1.0)


def _loco_evaluation_spro(defects, maps, max_fpr=0.05, max_distance=1e-3, max_steps=10):
    """sPRO as the official MVTec LOCO evaluation samples it, written from its definitions: (sPRO,
    FPR) at a finite set of thresholds (the maximum, 48 equal-height quantiles of all scores, the
    minimum), refined step by step between adjacent thresholds whose points lie more than
    ``max_distance`` apart (at most 100 intervals per step, at least 20 new thresholds), then the
    trapezoid up to ``max_fpr``. Per defect min(1, TP area / saturation area); the FPR over the
    defect-free pixels of every image. Slow: one pass over all pixels per threshold."""
    maps = np.asarray(maps, np.float64)
    negative = np.ones(maps.shape, bool)
    for i, image_defects in enumerate(defects):
        for mask, _ in image_defects:
            negative[i] &= ~mask
    units = [(i, mask, sat) for i, image_defects in enumerate(defects) for mask, sat in image_defects]

    def point(t):
        above = maps >= t
        spro = np.mean([min((above[i] & mask).sum() / sat, 1.0) for i, mask, sat in units])
        return np.array([spro, (above & negative).sum() / negative.sum()])

    s = np.sort(maps.ravel())
    quantiles = s[np.linspace(0, s.size - 1, 50).astype(int)[1:-1]][::-1]
    thresholds = list(dict.fromkeys([s[-1] + 1e-6, *quantiles, s[0] - 1e-6]))
    values = [point(t) for t in thresholds]
    for _ in range(max_steps):
        gaps = sorted(((np.linalg.norm(values[k] - values[k + 1]), k) for k in range(len(values) - 1)), reverse=True)
        gaps = [(g, k) for g, k in gaps if g > max_distance][:100]
        if not gaps:
            break
        remaining, total, new = max(20 - len(gaps), 0), sum(g for g, _ in gaps), []
        for g, k in gaps:
            extra = int(round(g / total * remaining))
            new += list(np.linspace(thresholds[k], thresholds[k + 1], 3 + extra)[1:-1])
            remaining, total = remaining - extra, total - g
        merged = np.r_[thresholds, new]
        order = np.argsort(-merged)
        merged_values = values + [point(t) for t in new]
        values = [merged_values[o] for o in order]
        thresholds = list(merged[order])
    v = np.array(values)
    return metrics._integrate(v[:, 1], v[:, 0], max_fpr)


def test_spro_equals_the_loco_evaluations_threshold_sampling():
    """The official evaluation samples thresholds and refines them until adjacent curve points lie
    within 0.001; ``spro`` takes every distinct score, the limit of that refinement. On maps with
    overlapping defects, saturation areas below (a fractional one too), at and above the defect's area (capped at the
    area, as the official ``get_saturation_area``) and good images, the two agree to 1e-4 (the
    sampled curve's chords). Not capping the saturation moves it by 0.06; an FPR over the good
    images only moves it too."""
    rng = np.random.default_rng(0)
    n, h = 12, 96
    maps = ndimage.gaussian_filter(rng.normal(size=(n, h, h)), (0, 3, 3))
    defects = []
    for i in range(n):
        image_defects = []
        for _ in range(int(rng.integers(1, 3)) if i >= 5 else 0):
            mask = np.zeros((h, h), bool)
            y, x, r = rng.integers(10, 80), rng.integers(10, 80), int(rng.integers(2, 12))
            mask[y:y + r, x:x + 2 * r] = True
            maps[i][mask] += rng.uniform(0.05, 0.6)
            area = float(mask.sum())
            image_defects.append((mask, min(float(rng.choice([area, area / 2, 40.0, 17.5])), area)))
        defects.append(image_defects)
    official = _loco_evaluation_spro(defects, maps)
    assert metrics.spro(defects, maps, 0.05) == pytest.approx(official, abs=1e-4)
    assert abs(metrics.spro(defects, maps, 0.05) - 0.79) < 0.01      # far from chance (0.025) and from 1


def test_curves_for_dvc_plots_are_small_and_monotone():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(20), np.ones(20)].astype(int)
    scores = rng.random(40) + labels
    masks = np.zeros((40, 32, 32), bool)
    masks[20:, 8:16, 8:16] = True
    maps = rng.random((40, 32, 32)) + masks
    c = metrics.curves(labels, scores, masks, maps)
    assert set(c) == {"roc_image", "pr_image", "roc_pixel", "pr_pixel", "pro"}
    assert all(len(v) <= 200 for v in c.values())
    fpr = [p["fpr"] for p in c["pro"]]
    assert fpr == sorted(fpr) and fpr[-1] <= 0.3
