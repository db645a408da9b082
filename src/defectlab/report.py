"""Heatmap overlays, the results table (Markdown + CSV, with the papers' numbers where the
dataset is the paper's) and a PNG gallery of example heatmaps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from defectlab.io import atomic_path, write_text

METRIC_COLUMNS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro",
                  "spro", "image_auroc_structural", "image_auroc_logical"]
COST_COLUMNS = ["train_seconds", "fit_seconds", "images_per_second", "peak_rss_mb"]

#: Published figures for the report's "paper" column, keyed (method, dataset) or, for a supervised
#: protocol, (method, dataset, N labelled anomalies): the paper's own mean over the dataset's
#: categories, in our metric names (image_ap / pixel_ap are the papers' AP_det / AP_loc). Only
#: filled where the method's paper reports the dataset; "source" names the paper and table.
PAPER_NUMBERS: dict[tuple, dict] = {
    # PatchCore-10% (WRN-50, 224 px): Roth et al., CVPR 2022, Table 1 (image AUROC), Table 2 (pixel
    # AUROC), Table 3 (PRO); the same three in Table 5
    ("patchcore", "mvtec_ad"): {"image_auroc": 0.990, "pixel_auroc": 0.981, "aupro": 0.935,
                                "source": "Roth et al. 2022, Tab. 1-3 (PatchCore-10%)"},
    # PaDiM-WR50-Rd550: Defard et al., ICPR 2021 (arXiv:2011.08785), localisation table (pixel AUROC
    # 97.5, PRO 92.1, all classes) and detection table (image AUROC 95.3)
    ("padim", "mvtec_ad"): {"image_auroc": 0.953, "pixel_auroc": 0.975, "aupro": 0.921,
                            "source": "Defard et al. 2021, localisation + detection tables (WR50-Rd550)"},
    # DS2 + GDE (one-for-all): He et al., WACV 2024, Table 1 (MVTec AD localisation AUC, overall) and
    # Table 3 (transfer without fine-tuning; LOCO: mean of the five category rows, the printed
    # "overall" row lost DS2's cell in the text)
    ("ds2", "mvtec_ad"): {"pixel_auroc": 0.946, "source": "He et al. 2024, Tab. 1"},
    ("ds2", "mvtec_loco"): {"pixel_auroc": 0.894, "source": "He et al. 2024, Tab. 3 (mean of 5 categories)"},
    ("ds2", "ksdd2"): {"pixel_auroc": 0.813, "source": "He et al. 2024, Tab. 3"},
    ("ds2", "mtd"): {"pixel_auroc": 0.607, "source": "He et al. 2024, Tab. 3"},
    # Multi-scale patch SVDD: Tsai, Wu & Lai, WACV 2022, Table 1 (image AUROC), Table 2 (pixel AUROC),
    # Table 3 (PRO), all classes; BTAD at 512 px: Table 4 (image), Table 5 (pixel), all products
    ("msp_svdd", "mvtec_ad"): {"image_auroc": 0.981, "pixel_auroc": 0.981, "aupro": 0.955,
                               "source": "Tsai et al. 2022, Tab. 1-3"},
    ("msp_svdd", "btad"): {"image_auroc": 0.951, "pixel_auroc": 0.977, "source": "Tsai et al. 2022, Tab. 4-5"},
    # SLSG: Yang et al., Pattern Recognition 2024, Table 1 (BTAD mean), Table 3 (LOCO mean: image
    # AUROC, sPRO); MVTec AD from Table 2's texture / object averages weighted 5 / 10 (the printed
    # "Mean" row lost SLSG's cell in the text)
    ("slsg", "btad"): {"image_auroc": 0.949, "pixel_auroc": 0.973, "source": "Yang et al. 2024, Tab. 1"},
    ("slsg", "mvtec_ad"): {"image_auroc": 0.984, "pixel_auroc": 0.975,
                           "source": "Yang et al. 2024, Tab. 2 (5 texture + 10 object averages)"},
    ("slsg", "mvtec_loco"): {"image_auroc": 0.903, "spro": 0.673, "source": "Yang et al. 2024, Tab. 3"},
    # DSR: Zavrtanik et al., ECCV 2022, Table 3 (MVTec AD image AUROC), Table 4 / Sec. 4.3 (pixel AP
    # 70.2), Table 1 (KSDD2 unsupervised AP_det / AP_loc), Table 2 (KSDD2 with N segmented anomalous
    # training images: DSR's n_supervised)
    ("dsr", "mvtec_ad"): {"image_auroc": 0.982, "pixel_ap": 0.702, "source": "Zavrtanik et al. 2022, Tab. 3-4"},
    ("dsr", "ksdd2"): {"image_ap": 0.872, "pixel_ap": 0.614, "source": "Zavrtanik et al. 2022, Tab. 1"},
    ("dsr", "ksdd2", 16): {"image_ap": 0.914, "pixel_ap": 0.712, "source": "Zavrtanik et al. 2022, Tab. 2 (N = 16)"},
    ("dsr", "ksdd2", 53): {"image_ap": 0.946, "pixel_ap": 0.816, "source": "Zavrtanik et al. 2022, Tab. 2 (N = 53)"},
    ("dsr", "ksdd2", 246): {"image_ap": 0.952, "pixel_ap": 0.855,
                            "source": "Zavrtanik et al. 2022, Tab. 2 (N = 246)"},
    # APC (N = 10 labelled anomalies): Koshil et al. 2024, Table 1 (AUROC_im, F1_im, AUROC_px, F1_px)
    ("apc", "mvtec_ad"): {"image_auroc": 0.9883, "image_f1_max": 0.9787, "pixel_auroc": 0.9445,
                          "pixel_f1_max": 0.3904, "source": "Koshil et al. 2024, Tab. 1"},
}


def paper_figures(method: str, dataset: str, n_supervised: int = 0) -> dict | None:
    """The published figures for ``method`` on ``dataset`` (with ``n_supervised`` > 0: the
    supervised protocol's entry for that N, None when the paper has none for it)."""
    return PAPER_NUMBERS.get((method, dataset, n_supervised) if n_supervised else (method, dataset))


def format_paper(figures: dict | None) -> str:
    if not figures:
        return "—"
    values = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if k != "source")
    return f"{values} ({figures['source']})" if "source" in figures else values


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map [0,1] values to RGB with matplotlib's 'jet' (imported lazily)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def _mask_edges(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m & ~inner


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None, alpha: float = 0.5) -> np.ndarray:
    """image uint8 HxWx3, heat in [0,1] HxW -> side-by-side [image | overlay with mask outline]."""
    over = (image * (1 - alpha) + _colormap(heat) * alpha).astype(np.uint8)
    if mask is not None and mask.any():
        over[_mask_edges(mask)] = 255
    return np.concatenate([image, over], axis=1)


def pick_examples(labels: np.ndarray, kinds: list[str], n: int) -> list[int]:
    """Deterministic selection: anomalous images of each kind in turn, then good ones."""
    anomalous = [i for i in range(len(labels)) if labels[i] == 1]
    good = [i for i in range(len(labels)) if labels[i] == 0]
    by_kind: dict[str, list[int]] = {}
    for i in anomalous:
        by_kind.setdefault(kinds[i], []).append(i)
    chosen: list[int] = []
    n_anom = max(n - max(n // 4, 1), 0) if good else n
    while len(chosen) < min(n_anom, len(anomalous)):
        for kind in sorted(by_kind):
            if by_kind[kind] and len(chosen) < n_anom:
                chosen.append(by_kind[kind].pop(0))
    chosen += good[: n - len(chosen)]
    return chosen


def write_overlays(out: dict, out_dir: Path, n: int, image_size: int) -> list[Path]:
    """Write up to ``n`` heatmap overlays (name: <defect_type>_<stem>.png) into ``out_dir``."""
    from defectlab.data import load_image

    maps = out["maps"]
    lo, hi = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    written = []
    for i in pick_examples(out["labels"], out["kinds"], n):
        path = Path(out["paths"][i])
        image = (load_image(path, image_size) * 255).astype(np.uint8)
        heat = (maps[i] - lo) / max(hi - lo, 1e-12)
        png = overlay(image, heat, out["masks"][i])
        target = out_dir / f"{out['defect_types'][i]}_{path.stem}.png"
        Image.fromarray(png).save(target)
        written.append(target)
    return written


#: in reports/maps/<m>/<ds>/<cat>/: the category's metrics.json and one <curve>.json per curve,
#: next to its overlays (the DVC-cached copy the report and an unchanged re-evaluation read)
KEPT = "results"


def collect(root: Path) -> list[dict]:
    """Rows {method, dataset, category, **metrics} from reports/maps/<m>/<ds>/<cat>/results/metrics.json
    (or, for outputs made before those copies existed, metrics/<m>/<ds>/<cat>.json)."""
    rows = []
    kept = sorted((root / "reports" / "maps").glob(f"*/*/*/{KEPT}/metrics.json"))
    for path in kept or sorted((root / "metrics").glob("*/*/*.json")):
        method, dataset, category = (path.parts[-5:-2] if kept else (*path.parts[-3:-1], path.stem))
        rows.append({"method": method, "dataset": dataset, "category": category, **json.loads(path.read_text())})
    return rows


#: what `metrics/summary.json` holds per method and dataset (what `dvc exp show` lists): the mean
#: over categories of the accuracy metrics and images/s, the sum of the fit and train seconds
SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "spro", "image_auroc_logical")
SUMMARY = {**{m: (np.mean, 4) for m in (*SUMMARY_METRICS, "images_per_second")},
           "train_seconds": (np.sum, 2), "fit_seconds": (np.sum, 2)}   # name: (aggregate, decimals)
#: the curves drawn per category with every method overlaid: (curve, x field, y field)
COMPARE_CURVES = (("roc_image", "fpr", "tpr"), ("pr_image", "recall", "precision"), ("pro", "fpr", "pro"))
#: the bars of the per-dataset summary chart
COMPARE_BARS = ("image_auroc", "pixel_auroc", "aupro")


def summary(rows: list[dict]) -> dict:
    """{dataset: {method: {metric: mean over categories}, "n_categories": n}}: one number per
    method, dataset and metric (AUROCs, AUPRO, sPRO where measured; costs summed / averaged)."""
    out: dict = {}
    for (method, dataset) in sorted({(r["method"], r["dataset"]) for r in rows}):
        sel = [r for r in rows if r["method"] == method and r["dataset"] == dataset]
        entry = {}
        for c, (aggregate, decimals) in SUMMARY.items():
            vals = [r[c] for r in sel if isinstance(r.get(c), (int, float))]
            if vals:
                entry[c] = round(float(aggregate(vals)), decimals)
        entry["n_categories"] = len(sel)
        out.setdefault(dataset, {})[method] = entry
    return out


def compare_plots(root: Path, rows: list[dict], out_dir: Path) -> int:
    """The overlaid charts: ``<out_dir>/<curve>/<ds>/<cat>.json`` (rows of every method's curve,
    tagged ``method``, ``chart`` and point index ``i``) and ``<out_dir>/summary/<ds>.json`` (one row
    per method and metric). Replaces ``out_dir`` as a whole; returns the number of charts."""
    from defectlab.io import atomic_dir

    maps = root / "reports" / "maps"
    n = 0
    with atomic_dir(out_dir) as tmp:
        for dataset, category in sorted({(r["dataset"], r["category"]) for r in rows}):
            methods = sorted({r["method"] for r in rows if r["dataset"] == dataset and r["category"] == category})
            for curve, x, y in COMPARE_CURVES:
                points = []
                for method in methods:
                    path = maps / method / dataset / category / KEPT / f"{curve}.json"
                    data = json.loads(path.read_text()) if path.exists() else []
                    points += [{"method": method, "chart": f"{dataset} / {category}: {curve.replace('_', ' ')}",
                                "i": i, x: p[x], y: p[y]} for i, p in enumerate(data)]
                if points:
                    _write_rows(tmp / curve / dataset / f"{category}.json", points)
                    n += 1
        for dataset, methods in summary(rows).items():
            bars = [{"method": method, "chart": f"{dataset}: mean {metric}", "metric": metric,
                     "value": entry[metric]}
                    for metric in COMPARE_BARS for method, entry in methods.items() if metric in entry]
            if bars:
                _write_rows(tmp / "summary" / f"{dataset}.json", bars)
                n += 1
    return n


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, separators=(",", ":")) + "\n")


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


#: keys of a run's metrics.json that describe the run, not a result (never averaged over seeds)
RUN_KEYS = ("seed", "image_size")


def mean_std(values) -> dict:
    """{"mean", "std", "n"} of the numbers in ``values`` (None skipped). ``std`` is the sample
    standard deviation (n − 1 in the denominator: with 3 – 5 seeds the population one understates
    the spread); None when fewer than two values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "n": len(vals)}


def seed_summary(per_seed: dict[int, dict]) -> dict:
    """{metric: {"mean", "std", "n", "values"}} over the runs in ``per_seed`` ({seed: metrics}):
    every key holding a number (not a bool) in at least one run, except ``RUN_KEYS``. ``values``
    lists each seed's value in ``per_seed``'s order (None where that run has none)."""
    keys: list[str] = []
    for m in per_seed.values():
        keys += [k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and k not in RUN_KEYS and k not in keys]
    out = {}
    for k in keys:
        values = [m.get(k) if isinstance(m.get(k), (int, float)) else None for m in per_seed.values()]
        out[k] = {**mean_std(values), "values": values}
    return out


def fmt_mean_std(entry: dict | None, decimals: int = 3) -> str:
    """"0.912 ± 0.021" (std over seeds), "0.912" for one value, "—" for none."""
    if not entry or entry.get("mean") is None:
        return "—"
    mean, std = entry["mean"], entry.get("std")
    if abs(mean) >= 100:
        decimals = 0
    return f"{mean:.{decimals}f}" + ("" if std is None else f" ± {std:.{decimals}f}")


def collect_seeds(root: Path, rows: list[dict]) -> dict:
    """{(method, dataset, category): {seed: metrics}}: the `seeds` stage's extra-seed runs
    (metrics/seeds/<ds>/<m>/<cat>/seed-<s>.json) with the pipeline's own run (``rows``) as its seed.
    Empty when no extra seed ran."""
    extra = sorted((root / "metrics" / "seeds").glob("*/*/*/seed-*.json"))
    if not extra:
        return {}
    out: dict = {}
    main = {}                                   # each dataset's pipeline seed, as the seeds stage saw it
    for info in (root / "metrics" / "seeds").glob("*/seeds.json"):
        main[info.parent.name] = json.loads(info.read_text()).get("seed", 0)
    for r in rows:
        seed = r.get("seed", main.get(r["dataset"], 0))
        out.setdefault((r["method"], r["dataset"], r["category"]), {})[seed] = r
    for path in extra:
        dataset, method, category = path.parts[-4:-1]
        m = json.loads(path.read_text())
        out.setdefault((method, dataset, category), {})[int(m.get("seed", path.stem.split("-", 1)[1]))] = m
    return out


#: the columns of the mean ± std table
SEED_COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "spro", "image_auroc_logical")


def seeds_table(per_cell: dict) -> tuple[str, dict]:
    """Markdown table of mean ± std over seeds per method × category, and per method × dataset the
    mean over categories computed per seed, then mean ± std over the seeds that cover every
    category (as the papers report: std over seeds, not over categories); and that summary as
    {dataset: {method: {metric: {"mean", "std", "n", "values"}, "seeds": [...]}}}."""
    cols = [c for c in SEED_COLUMNS if any(m.get(c) is not None for runs in per_cell.values() for m in runs.values())]
    header = ["method", "dataset", "category", *cols, "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary_out: dict = {}
    for (method, dataset) in sorted({(m, d) for m, d, _ in per_cell}, key=lambda x: (x[1], x[0])):
        cats = sorted(c for m, d, c in per_cell if (m, d) == (method, dataset))
        for cat in cats:
            runs = per_cell[(method, dataset, cat)]
            stats = seed_summary(dict(sorted(runs.items())))
            lines.append("| " + " | ".join([method, dataset, cat, *(fmt_mean_std(stats.get(c)) for c in cols),
                                            ",".join(map(str, sorted(runs)))]) + " |")
        common = sorted(set.intersection(*(set(per_cell[(method, dataset, c)]) for c in cats)))
        per_seed = {s: {c: float(np.mean(vals)) for c in cols
                        if (vals := [per_cell[(method, dataset, k)][s][c] for k in cats
                                     if per_cell[(method, dataset, k)][s].get(c) is not None])}
                    for s in common}
        stats = seed_summary(per_seed)
        summary_out.setdefault(dataset, {})[method] = {**stats, "seeds": common}
        lines.append("| " + " | ".join([method, dataset, "**mean**", *(fmt_mean_std(stats.get(c)) for c in cols),
                                        ",".join(map(str, common))]) + " |")
    return "\n".join(lines), summary_out


def results_table(rows: list[dict]) -> tuple[str, list[dict]]:
    """Markdown table (one row per method × category, plus per-method means) and CSV rows."""
    cols = [c for c in METRIC_COLUMNS if any(r.get(c) is not None for r in rows)] + COST_COLUMNS
    subst = any(r.get("substitutions") for r in rows)
    csv_rows = []
    for r in rows:
        csv_rows.append({k: r.get(k) for k in ("method", "dataset", "category", *cols)})
        if subst:     # what stood in for a missing external resource (defectlab.resources)
            csv_rows[-1]["substituted"] = substituted_keys(r)
    means = []
    for (method, dataset) in sorted({(r["method"], r["dataset"]) for r in rows}):
        sel = [r for r in rows if r["method"] == method and r["dataset"] == dataset]
        mean = {"method": method, "dataset": dataset, "category": "**mean**"}
        for c in cols:
            vals = [r[c] for r in sel if r.get(c) is not None]
            mean[c] = float(np.mean(vals)) if vals else None
        n_supervised = max((int(r.get("n_supervised") or 0) for r in sel), default=0)
        mean["paper"] = format_paper(paper_figures(method, dataset, n_supervised))
        means.append(mean)
    header = ["method", "dataset", "category", *cols, "paper", *(["substituted"] if subst else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(csv_rows, key=lambda r: (r["dataset"], r["method"], r["category"])) + means:
        lines.append("| " + " | ".join(_fmt(r.get(h)) if h != "paper" else r.get("paper", "") for h in header) + " |")
    return "\n".join(lines), csv_rows


def substituted_keys(row: dict) -> str:
    """The keys of a metrics row's substitutions (``dsr.general_images, synthesis.dtd_dir``); "" for none."""
    return ", ".join(dict.fromkeys(s.split(":", 1)[0].strip() for s in row.get("substitutions") or []))


def substitution_notes(rows: list[dict]) -> list[str]:
    """The report's note under the table: every substitution once, with the rows it applies to."""
    where: dict[str, list[str]] = {}
    for r in rows:
        for s in r.get("substitutions") or []:
            where.setdefault(s, []).append(f"{r['method']}/{r['dataset']}/{r['category']}")
    if not where:
        return []
    lines = ["**Substituted** (an external resource was missing; the column `substituted` names it per row; "
             "see README, Paper profile: external resources):", ""]
    for s, at in where.items():
        key, _, instead = s.partition(":")
        lines.append(f"- `{key.strip()}`: {instead.strip()} ({len(at)} rows: {', '.join(at[:6])}"
                     f"{', …' if len(at) > 6 else ''})")
    return lines + [""]


def gallery(maps_root: Path, out_png: Path, per_row: int = 4, tile: int = 96) -> None:
    """One row per method/dataset/category with its first ``per_row`` overlays."""
    rows = []
    for cat_dir in sorted(p for p in maps_root.glob("*/*/*") if p.is_dir()):
        files = sorted(cat_dir.glob("*.png"))[:per_row]
        if not files:
            continue
        tiles = [np.asarray(Image.open(f).convert("RGB").resize((2 * tile, tile))) for f in files]
        tiles += [np.zeros_like(tiles[0])] * (per_row - len(tiles))
        label = np.full((tile, tile // 2, 3), 32, np.uint8)
        rows.append((cat_dir.relative_to(maps_root).as_posix(), np.concatenate([label, *tiles], axis=1)))
    if not rows:
        return
    from PIL import ImageDraw

    img = Image.fromarray(np.concatenate([r for _, r in rows], axis=0))
    draw = ImageDraw.Draw(img)
    for k, (name, _) in enumerate(rows):
        for j, part in enumerate(name.split("/")):
            draw.text((2, k * tile + 4 + 12 * j), part[:10], fill=(255, 255, 255))
    with atomic_path(out_png) as tmp:
        img.quantize(256).save(tmp, format="PNG", optimize=True)   # palette PNG: small enough to keep in git


def build_report(root: Path = Path("."), out_dir: Path = Path("reports")) -> Path:
    """results.md / .csv / .png under ``out_dir``; ``<root>/metrics/summary.json`` and the overlaid
    charts under ``<root>/plots/compare`` when written into the project (``out_dir`` = its reports/)."""
    from defectlab.io import write_json

    rows = collect(root)
    seeds_md, seeds_summary = seeds_table(per_cell) if (per_cell := collect_seeds(root, rows)) else ("", {})
    if Path(out_dir).resolve() == (root / "reports").resolve():
        summ = summary(rows)
        for dataset, methods in seeds_summary.items():        # mean and std over seeds, beside seed's figures
            for method, stats in methods.items():
                entry = summ.setdefault(dataset, {}).setdefault(method, {})
                entry["seeds"] = len(stats["seeds"])
                for c in SUMMARY_METRICS:
                    if (stats.get(c) or {}).get("mean") is not None:
                        entry[f"{c}_seeds_mean"] = round(stats[c]["mean"], 4)
                        entry[f"{c}_seeds_std"] = None if stats[c]["std"] is None else round(stats[c]["std"], 4)
        write_json(root / "metrics" / "summary.json", summ)
        compare_plots(root, rows, root / "plots" / "compare")
    table, csv_rows = results_table(rows)
    md = ["# defectlab results", "",
          "One row per method × category (test split), then per-method means with the paper's figure where the "
          "dataset is the paper's. Costs: train_seconds (the per-category `train` stage, 0 when the method has none), "
          "fit_seconds (feature extraction + fit), images_per_second (inference), "
          "peak_rss_mb (evaluate process).", "", table, "", *substitution_notes(rows),
          *(["## Over seeds", "",
             "Mean ± sample standard deviation over the seeds of `seeds` (the pipeline's `seed` and the extra "
             "seeds the `seeds` stage trained from scratch on the same data and split). The **mean** rows average "
             "the categories per seed first, then over the seeds that cover every category.", "",
             seeds_md, ""] if seeds_md else []),
          "![heatmaps](results.png)", ""]
    write_text(out_dir / "results.md", "\n".join(md))
    with atomic_path(out_dir / "results.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            if csv_rows:
                w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
                w.writeheader()
                w.writerows(csv_rows)
    gallery(root / "reports" / "maps", out_dir / "results.png")
    return out_dir / "results.md"
