"""Flow ``inspect``: score a folder of new images with a category's current champion.

- The model is the registry version holding alias ``champion`` of ``<method>-<dataset>-<category>``
  (downloaded from its MLflow run), not whatever happens to be in models/.
- The decision threshold is the one stored with that version (tags ``threshold``,
  ``threshold.rule``, ``threshold.source``, set by the retrain flow from validation scores); a
  version without one gets it computed now with ``flows.threshold`` and stored.
- Every file of the folder becomes one CSV row ``path, score, label, threshold, error``:
  ``label`` is ``anomalous`` (score >= threshold), ``normal``, or ``error`` for a file that cannot
  be read (the reason is in ``error``; the rest of the batch is scored).
- A heatmap overlay per scored image goes to ``<out>/heatmaps/``; one MLflow run (stage
  ``inspect``) logs the counts, the CSV and the overlays.
"""

from __future__ import annotations

import csv
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task

from pipelines.common import flows_params, in_dir, setup_tracking


@task(name="load-champion")
def champion_threshold(root: str, method: str, dataset: str, category: str, model_dir: str, alias: str) -> dict:
    from defectlab import champion, pipeline
    from defectlab.backbones import resolve_device
    from defectlab.config import EvalParams, Params

    cfg = flows_params(Path(root)).threshold
    with in_dir(Path(root)):
        params = Params.load("params.yaml")
        model, mv, folder = champion.load_champion(method, dataset, category, Path(model_dir), resolve_device(params.device), alias)
        tags = dict(mv.tags or {})
        if "threshold" not in tags:
            ev = params.section("evaluation", "eval", EvalParams)
            data = pipeline.category_data(params, dataset, category)
            tags.update(champion.threshold_for_model(model, data, params.dataset(dataset).image_size, ev.batch_size,
                                                     cfg.rule, cfg.target_fpr))
            champion.tag_version(mv.name, mv.version, {k: tags[k] for k in tags if k.startswith("threshold")})
    return {"version": mv.version, "name": mv.name, "model_dir": str(folder), "threshold": float(tags["threshold"]),
            "rule": tags.get("threshold.rule", ""), "source": tags.get("threshold.source", ""),
            "image_size": params.dataset(dataset).image_size, "device": str(resolve_device(params.device))}


@task(name="score-folder")
def score_folder(folder: str, info: dict, out_dir: str, batch_size: int = 8) -> list[dict]:
    import torch
    from PIL import Image

    from defectlab.data.mvtec import IMAGENET_MEAN, IMAGENET_STD, load_image
    from defectlab.errors import DatasetError
    from defectlab.methods import get_method
    from defectlab.report import overlay

    logger = get_run_logger()
    import json

    model_dir = Path(info["model_dir"])
    method = json.loads((model_dir / "model.json").read_text())["method"]
    model = get_method(method).load(model_dir, info["device"])
    size, threshold = info["image_size"], info["threshold"]
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    rows: list[dict] = []
    good: list[tuple[int, np.ndarray]] = []
    for p in files:
        try:
            good.append((len(rows), load_image(p, size)))
            rows.append({"path": str(p), "score": "", "label": "", "threshold": threshold, "error": ""})
        except (DatasetError, OSError) as err:
            reason = err.problem if isinstance(err, DatasetError) else str(err)
            logger.warning("%s: %s", p.name, reason)
            rows.append({"path": str(p), "score": "", "label": "error", "threshold": threshold, "error": reason})
    heat_dir = Path(out_dir) / "heatmaps"
    heat_dir.mkdir(parents=True, exist_ok=True)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    all_maps, all_idx = [], []
    with torch.no_grad():
        for i in range(0, len(good), batch_size):
            chunk = good[i:i + batch_size]
            x = torch.stack([(torch.from_numpy(img).permute(2, 0, 1) - mean) / std for _, img in chunk])
            scores, maps = model.predict(x.to(model.device))
            for (row_i, _), s, m in zip(chunk, scores.float().cpu().numpy(), maps.float().cpu().numpy()):
                rows[row_i]["score"] = float(s)
                rows[row_i]["label"] = "anomalous" if s >= threshold else "normal"
                all_maps.append(m)
                all_idx.append(row_i)
    if all_maps:
        stack = np.stack(all_maps)
        lo, hi = float(np.percentile(stack, 1)), float(np.percentile(stack, 99.9))
        images = dict(good)
        for row_i, m in zip(all_idx, stack):
            png = overlay((images[row_i] * 255).astype(np.uint8), (m - lo) / max(hi - lo, 1e-12), None)
            Image.fromarray(png).save(heat_dir / f"{Path(rows[row_i]['path']).stem}.png")
    return rows


@flow(name="inspect", log_prints=True)
def inspect_flow(folder: str, dataset: str, category: str, method: str | None = None, root: str = ".",
                 out: str | None = None, alias: str = "champion") -> dict:
    """Score every file in ``folder``; write ``<out>/predictions.csv`` and ``<out>/heatmaps/``."""
    from defectlab import tracking
    from defectlab.config import Params

    logger = get_run_logger()
    root_p = Path(root).resolve()
    method = method or flows_params(root_p).retrain.method
    setup_tracking(root_p)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out_dir = Path(out).resolve() if out else root_p / "reports" / "inspect" / dataset / category / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as model_dir:
        info = champion_threshold(str(root_p), method, dataset, category, model_dir, alias)
        rows = score_folder(str(Path(folder).resolve()), info, str(out_dir))
    csv_path = out_dir / "predictions.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "score", "label", "threshold", "error"])
        w.writeheader()
        w.writerows(rows)
    counts = {k: sum(r["label"] == k for r in rows) for k in ("anomalous", "normal", "error")}
    logger.info("%s v%s, threshold %.4g (%s on %s): %s -> %s", info["name"], info["version"], info["threshold"],
                info["rule"], info["source"], counts, csv_path)
    with in_dir(root_p):
        params = Params.load("params.yaml")
        with tracking.stage_run("inspect", dataset=dataset, method=method, category=category, profile=params.profile,
                                seed=params.seed, config=params.tracking,
                                params={"folder": str(Path(folder).resolve()), "model.name": info["name"],
                                        "model.version": info["version"], "threshold": info["threshold"],
                                        "threshold.rule": info["rule"], "threshold.source": info["source"]}) as run:
            run.log_metrics({"n_images": len(rows), "n_anomalous": counts["anomalous"], "n_normal": counts["normal"],
                             "n_errors": counts["error"]})
            run.log_artifacts(csv_path)
            run.log_artifacts(out_dir / "heatmaps", "heatmaps")
    return {"csv": str(csv_path), "heatmaps": str(out_dir / "heatmaps"), "counts": counts, "model": info["name"],
            "version": info["version"], "threshold": info["threshold"], "rows": rows}
