"""Flow ``retrain``: fold new normal images into a category, retrain, and promote the new model
only if it is not worse than the current champion.

Steps (one Prefect task each), under a per-dataset file lock so two retrains of the same
dataset (hence the same category) never interleave their writes to data/, dvc.lock or the registry:

1. **validate** every file in ``<incoming_dir>/<dataset>/<category>/``: known image extension,
   decodes, not empty, both sides >= ``min_size``, not a duplicate of a training image or of
   another incoming file. Bad files are moved to ``<quarantine_dir>/<dataset>/<category>/`` and
   a row (time, file, reason, sha256) is appended to its ``quarantine.csv``: never silently dropped.
2. **new data version**: accepted images are copied into the prepared training set
   ``data/prepared/<ds>/<cat>/train/good/incoming_<sha>.png`` (and archived in
   ``<accepted_dir>/<ds>/<cat>/``), the manifest gets their rows, and ``dvc commit`` records the
   new version of the prepare stage's output in dvc.lock.
3. **rerun affected stages**: ``dvc repro evaluate@<m>-<ds>``: DVC reruns what depends on the
   changed data: the synthesis cache (identical files for the other categories), the dataset's
   pretrain, this category's ``train@<m>-<ds>-<cat>`` only (other categories' trainings stay
   cached), the method's dataset-wide fit and evaluate, then the report; other methods are
   untouched. The fit stage registers a new model version for the changed category only (an
   unchanged model is not registered again).
4. **compare** on the held-out test set: the challenger's score is the evaluate stage's metric;
   the champion is re-scored now on the same test set (so both numbers see the same data).
5. **decide** (``defectlab.champion.decide``): promote unless worse by more than ``margin``; set
   aliases ``challenger`` (always) and ``champion`` (if promoted); store the image threshold chosen
   on validation data with the version; log a ``retrain`` MLflow run with both scores and the decision.

The registry, not the working tree, holds the champion: after a refusal, models/ holds the refused
challenger (it is what dvc.lock describes) while ``inspect`` keeps using the champion version.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task

from defectlab.io import sha256_file
from pipelines.common import flows_params, in_dir, run_dvc, setup_tracking, stage_graph


def check_image(path: Path, min_size: int) -> str | None:
    """None when ``path`` is a usable normal training image, else the reason it is not."""
    from PIL import Image

    from defectlab.data.mvtec import IMAGE_EXTS, load_image
    from defectlab.errors import DatasetError

    if path.suffix.lower() not in IMAGE_EXTS:
        return f"not an image file extension ({path.suffix or 'none'}); expected one of {sorted(IMAGE_EXTS)}"
    try:
        load_image(path)  # decodes fully: empty, truncated and oversized files fail here
    except DatasetError as err:
        return err.problem
    with Image.open(path) as im:
        if min(im.size) < min_size:
            return f"too small ({im.width}x{im.height} < {min_size} px)"
    return None


@task(name="validate-incoming")
def validate_incoming(root: str, dataset: str, category: str) -> dict:
    """Split the incoming folder into accepted files and quarantined ones (moved, with reasons)."""
    logger = get_run_logger()
    root_p = Path(root)
    cfg = flows_params(root_p).retrain
    incoming = root_p / cfg.incoming_dir / dataset / category
    quarantine = root_p / cfg.quarantine_dir / dataset / category
    prepared = root_p / "data" / "prepared" / dataset / category / "train" / "good"
    known = {sha256_file(p) for p in prepared.iterdir() if p.is_file()} if prepared.is_dir() else set()
    accepted, rejected = [], []
    files = sorted(p for p in incoming.iterdir() if p.is_file() and not p.name.startswith(".")) if incoming.is_dir() else []
    for path in files:
        digest = sha256_file(path)
        reason = check_image(path, cfg.min_size)
        if reason is None and digest in known:
            reason = "duplicate of an image already in the training set"
        if reason is None:
            known.add(digest)
            accepted.append({"path": str(path), "sha256": digest})
            continue
        quarantine.mkdir(parents=True, exist_ok=True)
        target = quarantine / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}_{path.name}"
        shutil.move(str(path), target)
        log = quarantine / "quarantine.csv"
        new = not log.exists()
        with open(log, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["time", "file", "quarantined_as", "reason", "sha256"])
            w.writerow([datetime.now(timezone.utc).isoformat(timespec="seconds"), path.name, target.name, reason, digest])
        rejected.append({"file": path.name, "reason": reason})
        logger.warning("quarantined %s: %s", path.name, reason)
    logger.info("%d accepted, %d quarantined (%s)", len(accepted), len(rejected), quarantine)
    return {"accepted": accepted, "rejected": rejected}


@task(name="new-data-version")
def add_to_training_set(root: str, dataset: str, category: str, accepted: list[dict]) -> int:
    """Copy accepted images into the prepared training set and record the new version with DVC."""
    root_p = Path(root)
    cfg = flows_params(root_p).retrain
    prepared = root_p / "data" / "prepared" / dataset
    good = prepared / category / "train" / "good"
    archive = root_p / cfg.accepted_dir / dataset / category
    archive.mkdir(parents=True, exist_ok=True)
    manifest = prepared / "manifest.csv"
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    for item in accepted:
        src = Path(item["path"])
        name = f"incoming_{item['sha256'][:16]}{src.suffix.lower()}"
        shutil.copy2(src, good / name)
        shutil.move(str(src), archive / name)
        rows.append({**{k: "" for k in fields}, "category": category, "split": "train", "label": "0",
                     "defect_type": "good", "kind": "good", "path": f"{category}/train/good/{name}",
                     "sha256": item["sha256"]})
    # replace (not edit) the manifest: the DVC cache may hold it as a link
    fd, tmp = tempfile.mkstemp(dir=prepared, prefix=".manifest.", suffix=".csv")
    with open(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    Path(tmp).replace(manifest)
    run_dvc(["commit", "--force", f"prepare@{dataset}"], root_p)
    return len(accepted)


@task(name="rerun-affected-stages")
def rerun_stages(root: str, method: str, dataset: str, category: str) -> str:
    target = f"evaluate@{method}-{dataset}"
    # the synthesis cache belongs to the data version even when this method does not read it
    out = run_dvc(["repro", f"synthesize@{dataset}"], Path(root))
    out += run_dvc(["repro", target], Path(root))
    for stage, deps in stage_graph(Path(root)):   # and what consumes the metrics (the report)
        if target in deps:
            out += run_dvc(["repro", "--single-item", stage], Path(root))
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]
    get_run_logger().info("stages rerun: %s", ", ".join(ran) or "none (up to date)")
    return ",".join(ran)


@task(name="score-champion")
def score_version(root: str, method: str, dataset: str, category: str, metric: str, alias: str = "champion"):
    """``metric`` of the version holding ``alias``, measured now on the category's test set (None if no alias)."""
    from defectlab import champion, pipeline
    from defectlab.backbones import resolve_device
    from defectlab.config import EvalParams, Params

    name = champion.model_name(method, dataset, category)
    if champion.get_alias(name, alias) is None:
        return None
    with in_dir(Path(root)), tempfile.TemporaryDirectory() as tmp:
        params = Params.load("params.yaml")
        ev = params.section("evaluation", "eval", EvalParams)
        model, mv, _ = champion.load_champion(method, dataset, category, Path(tmp), resolve_device(params.device), alias)
        data = pipeline.category_data(params, dataset, category)
        out, _ = pipeline.score_category(model, data, params.dataset(dataset).image_size, ev.batch_size)
        metrics, _ = pipeline.metrics_for(out, ev)
    return {"version": str(mv.version), "score": metrics.get(metric)}


@task(name="decide-and-promote")
def decide_and_promote(root: str, method: str, dataset: str, category: str, challenger_version: str,
                       champion_info: dict | None, validation: dict, stages_rerun: str) -> dict:
    from defectlab import champion, pipeline, tracking
    from defectlab.backbones import resolve_device
    from defectlab.config import Params
    from defectlab.methods import get_method

    logger = get_run_logger()
    cfg = flows_params(Path(root))
    rc = cfg.retrain
    name = champion.model_name(method, dataset, category)
    with in_dir(Path(root)):
        params = Params.load("params.yaml")
        metrics = json.loads(pipeline.Layout().metrics(method, dataset, category).read_text())
        score = metrics.get(rc.metric)
        if score is None:
            raise KeyError(f"metric {rc.metric!r} not in metrics/{method}/{dataset}/{category}.json "
                           f"(has: {', '.join(sorted(metrics))})")
        decision = champion.decide(score, champion_info["score"] if champion_info else None,
                                   metric=rc.metric, margin=rc.margin)
        model = get_method(method).load(pipeline.Layout().model(method, dataset, category), resolve_device(params.device))
        thr = champion.model_threshold(model)
        champion.apply_decision(name, challenger_version, decision, extra_tags=thr)
        logger.info("%s v%s: %s (%s)", name, challenger_version, "PROMOTED" if decision.promote else "REFUSED",
                    decision.reason)
        with tracking.stage_run("retrain", dataset=dataset, method=method, category=category, profile=params.profile,
                                seed=params.seed, config=params.tracking,
                                params={"retrain": rc.model_dump(mode="json"), "calibration": params.calibration.model_dump(),
                                        "challenger_version": challenger_version,
                                        "champion_version": champion_info["version"] if champion_info else "none",
                                        "stages_rerun": stages_rerun or "none"}) as run:
            run.log_metrics({"challenger_score": decision.challenger_score, "promoted": float(decision.promote),
                             "n_accepted": len(validation["accepted"]), "n_quarantined": len(validation["rejected"]),
                             "threshold": thr["threshold"],
                             **({"champion_score": decision.champion_score} if decision.champion_score is not None else {})})
            if run.active:
                import mlflow

                mlflow.set_tags({"decision": "promoted" if decision.promote else "refused",
                                 "model.name": name, "model.version": challenger_version})
                mlflow.log_dict({"decision": decision.as_dict(), "validation": validation, **thr}, "decision.json")
    return {**decision.as_dict(), "model": name, "challenger_version": challenger_version,
            "champion_version": champion_info["version"] if champion_info else None, **thr}


@flow(name="retrain", log_prints=True)
def retrain_flow(dataset: str, category: str, method: str | None = None, root: str = ".") -> dict:
    """Validate incoming images, retrain the category, promote the challenger if not worse."""
    from filelock import FileLock

    from defectlab import champion

    logger = get_run_logger()
    root_p = Path(root).resolve()
    cfg = flows_params(root_p).retrain
    method = method or cfg.method
    setup_tracking(root_p)
    lock_path = root_p / ".dvc" / "tmp" / f"defectlab-retrain-{dataset}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with FileLock(str(lock_path), timeout=cfg.lock_timeout_s):
        logger.info("lock %s acquired after %.1fs", lock_path.name, time.perf_counter() - t0)
        validation = validate_incoming(str(root_p), dataset, category)
        name = champion.model_name(method, dataset, category)
        current = champion.get_alias(name, champion.CHAMPION)
        if validation["accepted"]:
            add_to_training_set(str(root_p), dataset, category, validation["accepted"])
        # always: also finishes a previous retrain whose stages failed after its data was committed
        stages_rerun = rerun_stages(str(root_p), method, dataset, category)
        latest = champion.latest_version(name)
        if latest is None:
            raise RuntimeError(f"no registered version of {name}: is tracking on (DEFECTLAB_TRACKING) for the fit stage?")
        already_decided = current is not None and (str(latest.version) == str(current.version)
                                                   or "decision" in (latest.tags or {}))
        if already_decided and "fit@" not in stages_rerun:
            logger.info("nothing new (no accepted images, stages up to date); champion v%s stays", current.version)
            return {"promote": False, "reason": "nothing new to compare", "model": name,
                    "champion_version": str(current.version), "challenger_version": None,
                    "rejected": validation["rejected"], "accepted": len(validation["accepted"])}
        champion_info = score_version(str(root_p), method, dataset, category, cfg.metric)
        result = decide_and_promote(str(root_p), method, dataset, category, str(latest.version), champion_info,
                                    validation, stages_rerun)
        result["rejected"] = validation["rejected"]
        result["accepted"] = len(validation["accepted"])
        return result


def serve(dataset: str, category: str, method: str | None = None, root: str = ".", cron: str | None = None) -> None:
    """Serve the flow on a cron schedule (params ``flows.retrain.cron`` unless ``cron`` is given)."""
    cron = cron or flows_params(Path(root)).retrain.cron
    if not cron:
        raise ValueError("no schedule: pass --cron or set flows.retrain.cron in params.yaml")
    retrain_flow.serve(name=f"retrain-{dataset}-{category}", cron=cron,
                       parameters={"dataset": dataset, "category": category, "method": method,
                                   "root": str(Path(root).resolve())})
