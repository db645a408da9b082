"""Flow ``inspect``: score a folder of new images with a category's current champion.

- The model is the registry version holding alias ``champion`` of ``<method>-<dataset>-<category>``
  (downloaded from its MLflow run), not whatever happens to be in models/.
- Scoring is ``defectlab.inference`` (the path behind `defectlab predict`): the threshold, the
  preprocessing and the heatmap colours come from that version's own model.json, and the folder
  is streamed (one batch in memory).
- Every file of the folder becomes one CSV row ``path, score, normalized_score, label, threshold,
  error, heatmap, mask``: ``label`` is ``anomalous`` (score >= threshold), ``normal``, or ``error``
  for a file that cannot be read (the reason is in ``error``; the rest of the batch is scored).
- A heatmap overlay and a binary defect mask per scored image go to ``<out>/heatmaps/`` and
  ``<out>/masks/``; one MLflow run (stage ``inspect``) logs the counts, the CSV and the overlays.
"""

from __future__ import annotations

import csv
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task

from pipelines.common import flows_params, in_dir, setup_tracking


@task(name="load-champion")
def load_champion_folder(root: str, method: str, dataset: str, category: str, model_dir: str, alias: str) -> dict:
    """Download the version holding ``alias`` into ``model_dir``; its threshold is the one in its model.json."""
    from defectlab import champion

    name = champion.model_name(method, dataset, category)
    with in_dir(Path(root)):
        mv = champion.get_alias(name, alias)
        if mv is None:
            from defectlab.errors import ResourceMissingError

            raise ResourceMissingError(f"registered model {name!r} has no {alias!r} alias; run `dvc repro` (the first "
                                       f"version becomes champion) or the retrain flow")
        folder = champion.download_model(mv, Path(model_dir))
    return {"name": name, "version": str(mv.version), "model_dir": str(folder)}


@task(name="score-folder")
def score_folder(folder: str, info: dict, out_dir: str, device: str = "auto", batch_size: int = 8) -> dict:
    """Stream the folder through the model (defectlab.inference): predictions.csv, heatmaps/, masks/."""
    from defectlab.inference import Detector, OutputWriter, expand_inputs

    logger = get_run_logger()
    det = Detector(info["model_dir"], device)
    with OutputWriter(out_dir, det) as writer:
        for pred in det.predict_files(expand_inputs([folder]), batch_size=batch_size, keep_images=True):
            writer.write(pred)
            if pred.error:
                logger.warning("%s: %s", Path(pred.path).name, pred.error)
    thr = det.threshold
    return {"counts": writer.counts, "threshold": thr.get("image"), "rule": thr.get("rule", ""),
            "source": thr.get("source", "")}


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
    with in_dir(root_p):
        device = Params.load("params.yaml").device
    with tempfile.TemporaryDirectory() as model_dir:
        info = load_champion_folder(str(root_p), method, dataset, category, model_dir, alias)
        info.update(score_folder(str(Path(folder).resolve()), info, str(out_dir), device))
    csv_path = out_dir / "predictions.csv"
    counts = info["counts"]
    logger.info("%s v%s, threshold %s (%s on %s): %s -> %s", info["name"], info["version"], info["threshold"],
                info["rule"], info["source"], counts, csv_path)
    with in_dir(root_p):
        params = Params.load("params.yaml")
        with tracking.stage_run("inspect", dataset=dataset, method=method, category=category, profile=params.profile,
                                seed=params.seed, config=params.tracking,
                                params={"folder": str(Path(folder).resolve()), "model.name": info["name"],
                                        "model.version": info["version"], "threshold": info["threshold"],
                                        "threshold.rule": info["rule"], "threshold.source": info["source"]}) as run:
            run.log_metrics({"n_images": sum(counts.values()), "n_anomalous": counts["anomalous"],
                             "n_normal": counts["normal"], "n_errors": counts["error"]})
            run.log_artifacts(csv_path)
            run.log_artifacts(out_dir / "heatmaps", "heatmaps")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {"csv": str(csv_path), "heatmaps": str(out_dir / "heatmaps"), "counts": counts, "model": info["name"],
            "version": info["version"], "threshold": info["threshold"], "rows": rows}
