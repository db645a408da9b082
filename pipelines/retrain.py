"""Flow ``retrain``: fold new normal images into a category, retrain, and promote the new model
only if it is not worse than the current champion. A refused challenger leaves no trace in the
training set.

Steps (one Prefect task each), under the dataset's lock (shared with the reproduce flow and every
stage of plain ``dvc repro``, ``defectlab.stagekit.dataset_lock``), with a journal of the step
reached (``pipelines.workspace``):

1. **recover**: a journal left by an interrupted retrain is finished (its decision was made) or
   undone (workspace restored from its snapshot, its batch back in the incoming folder, registry
   versions it made tagged ``decision=interrupted``) before anything else.
2. **validate** every file in ``<incoming_dir>/<dataset>/<category>/``: known image extension,
   decodes, not empty, both sides >= ``min_size``, not a duplicate of a training image or of
   another incoming file. Bad files are moved to ``<quarantine_dir>/<dataset>/<category>/`` with a
   row (time, file, reason, sha256) in its ``quarantine.csv``: never silently dropped.
3. **snapshot** dvc.lock and the outputs DVC does not cache; then **new data version**: the
   accepted images (one *batch*, id ``<UTC time>-<digest>``) are moved to
   ``<accepted_dir>/<ds>/<cat>/`` and copied into ``data/prepared/<ds>/<cat>/train/good/``, the
   category's manifests are rewritten and ``dvc commit`` records the new version of ``prepare``.
   The dataset-level training set (``pretrain_manifest.csv``) is left alone unless
   ``flows.retrain.retrain_backbone`` is true, so the shared backbone and pretraining do not rerun.
4. **rerun affected stages**: ``dvc repro evaluate@<m>-<ds>`` (DVC reruns what depends on the
   changed category: its synthesis cache and trainings, the method's fit and evaluate) and the
   report. The fit stage refits the changed category only (the others' models are reused) and
   registers a new model version for it.
5. **compare** on the held-out test set: the challenger's score is the evaluate stage's metric;
   the champion is re-scored now on the same test set.
6. **decide** (``defectlab.champion.decide``, or promotion forced by ``defectlab review accept``)
   and record it in the journal, then move the aliases (``challenger`` always, ``champion`` if
   promoted) and log a ``retrain`` MLflow run.
7. **promoted** (or refused with ``flows.retrain.on_refuse: keep``): the new data version is one git
   commit of ``dvc.lock`` (when the project is a git checkout; ``dvc push`` when a remote is set)
   whose hash goes on the model version. **Refused** (``on_refuse: review``, the default): the
   workspace goes back to the snapshot byte for byte (dvc.lock, data/prepared, models/,
   checkpoints/, metrics/...: ``dvc status`` is clean) and the batch moves to
   ``data/review/<ds>/<cat>/<batch>/`` with ``decision.json`` and the challenger's score of each
   of its images, worst first, for ``defectlab review accept|reject``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task

from defectlab.io import fault_point, sha256_file, write_json
from defectlab.stagekit import dataset_lock, dataset_lock_path
from pipelines.common import StageFailed, flows_params, in_dir, run_dvc, setup_tracking, stage_graph
from pipelines.workspace import clear_journal, read_journal, restore, snapshot, write_journal


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


def _quarantine(path: Path, quarantine: Path, reason: str, digest: str | None = None) -> Path:
    """Move ``path`` into the quarantine folder, with a row (time, file, name there, reason, sha256)
    in its quarantine.csv written first (a crash between the two leaves the file where it was)."""
    quarantine.mkdir(parents=True, exist_ok=True)
    target = quarantine / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}_{path.name}"
    log = quarantine / "quarantine.csv"
    new = not log.exists()
    with open(log, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "file", "quarantined_as", "reason", "sha256"])
        w.writerow([datetime.now(timezone.utc).isoformat(timespec="seconds"), path.name, target.name, reason,
                    digest or sha256_file(path)])
    shutil.move(str(path), target)
    return target


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
        _quarantine(path, quarantine, reason, digest)
        rejected.append({"file": path.name, "reason": reason})
        logger.warning("quarantined %s: %s", path.name, reason)
    logger.info("%d accepted, %d quarantined (%s)", len(accepted), len(rejected), quarantine)
    return {"accepted": accepted, "rejected": rejected}


@task(name="new-data-version")
def add_to_training_set(root: str, dataset: str, category: str, accepted: list[dict], batch: str) -> list[str]:
    """Move accepted images to the archive, copy them into the prepared training set, rewrite the
    category's manifests and record the new version with DVC. Returns the training file names."""
    from defectlab import pipeline
    from defectlab.config import Params

    root_p = Path(root)
    cfg = flows_params(root_p).retrain
    good = root_p / "data" / "prepared" / dataset / category / "train" / "good"
    archive = root_p / cfg.accepted_dir / dataset / category
    archive.mkdir(parents=True, exist_ok=True)
    names = [f"incoming_{item['sha256'][:16]}{Path(item['path']).suffix.lower()}" for item in accepted]
    journal = read_journal(root_p, dataset)
    write_journal(root_p, dataset, {**journal, "step": "adding-data", "files": names})   # before the first move
    for i, (item, name) in enumerate(zip(accepted, names)):
        src = Path(item["path"])
        shutil.copy2(src, good / name)
        shutil.move(str(src), archive / name)
        if i == 0:
            fault_point("retrain:adding")      # some of the batch moved, the rest not yet
    with in_dir(root_p):
        pipeline.update_manifests(Params.load("params.yaml"), dataset, category)
        if cfg.retrain_backbone:
            pipeline.refresh_pretrain_manifest(dataset)
    run_dvc(["commit", "--force", f"prepare@{dataset}"], root_p)
    write_journal(root_p, dataset, {**read_journal(root_p, dataset), "step": "data-added"})
    fault_point("retrain:data-added")
    return names


@task(name="rerun-affected-stages")
def rerun_stages(root: str, method: str, dataset: str, category: str) -> str:
    target = f"evaluate@{method}-{dataset}"
    # --no-run-cache: a changed stage really runs (fit registers the challenger, evaluate logs it),
    # also when DVC's run-cache holds the same inputs (the same batch again after an undo)
    repro = ["repro", "--no-run-cache"]
    # the synthesis cache belongs to the data version even when this method does not read it
    out = run_dvc([*repro, f"synthesize@{dataset}"], Path(root))
    out += run_dvc([*repro, target], Path(root))
    graph = stage_graph(Path(root))
    # the extra seeds (`seeds`) read the data version too: their metrics must describe it (a few
    # seconds with `seeds: [0]`; with extra seeds, the changed category of every method is rerun)
    if any(stage == f"seeds@{dataset}" for stage, _ in graph):
        out += run_dvc([*repro, f"seeds@{dataset}"], Path(root))
    for stage, deps in graph:                     # and what consumes the metrics (the report)
        if target in deps:
            out += run_dvc([*repro, "--single-item", stage], Path(root))
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]
    get_run_logger().info("stages rerun: %s", ", ".join(ran) or "none (up to date)")
    fault_point("retrain:stages-rerun")
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


def batch_scores(root: Path, method: str, dataset: str, category: str, names: list[str]) -> list[dict]:
    """The challenger's (models/ in the working tree) score of each image of the batch, worst first."""
    from defectlab import inference, pipeline

    with in_dir(root):
        det = inference.load(pipeline.Layout().model(method, dataset, category), device="cpu")
        good = pipeline.Layout().prepared(dataset) / category / "train" / "good"
        rows = [{"file": Path(p.path).name, "score": p.score, "normalized_score": p.normalized_score,
                 "label": p.label, "error": p.error} for p in det.predict_files([good / n for n in names])]
    return sorted(rows, key=lambda r: -(r["score"] if r["score"] is not None else float("inf")))


@task(name="decide")
def decide(root: str, method: str, dataset: str, category: str, champion_info: dict | None,
           force_reason: str | None) -> dict:
    """The decision (not yet applied), recorded in the journal so a crash after it is finished, not redone."""
    from defectlab import champion, pipeline

    rc = flows_params(Path(root)).retrain
    with in_dir(Path(root)):
        metrics = json.loads(pipeline.Layout().metrics(method, dataset, category).read_text())
    score = metrics.get(rc.metric)
    if score is None:
        raise KeyError(f"metric {rc.metric!r} not in metrics/{method}/{dataset}/{category}.json "
                       f"(has: {', '.join(sorted(metrics))})")
    decision = champion.decide(score, champion_info["score"] if champion_info else None, metric=rc.metric,
                               margin=rc.margin)
    if force_reason and not decision.promote:
        decision = champion.Decision(True, decision.metric, decision.challenger_score, decision.champion_score,
                                     decision.margin, f"{force_reason} (margin check skipped: {decision.reason})")
    return decision.as_dict()


@task(name="apply-decision")
def apply_decision(root: str, method: str, dataset: str, category: str, challenger_version: str,
                   champion_info: dict | None, validation: dict, stages_rerun: str, decision: dict,
                   trigger: str, batch: str | None) -> dict:
    from defectlab import champion, pipeline, tracking
    from defectlab.config import Params

    logger = get_run_logger()
    rc = flows_params(Path(root)).retrain
    name = champion.model_name(method, dataset, category)
    d = champion.Decision(**decision)
    with in_dir(Path(root)):
        params = Params.load("params.yaml")
        thr = champion.model_threshold(pipeline.Layout().model(method, dataset, category))
        fault_point("retrain:before-alias")
        champion.apply_decision(name, challenger_version, d,
                                extra_tags={**thr, "trigger": trigger, **({"batch": batch} if batch else {})})
        logger.info("%s v%s: %s (%s)", name, challenger_version, "PROMOTED" if d.promote else "REFUSED", d.reason)
        with tracking.stage_run("retrain", dataset=dataset, method=method, category=category, profile=params.profile,
                                seed=params.seed, config=params.tracking,
                                params={"retrain": rc.model_dump(mode="json"), "calibration": params.calibration.model_dump(),
                                        "challenger_version": challenger_version,
                                        "champion_version": champion_info["version"] if champion_info else "none",
                                        "stages_rerun": stages_rerun or "none", "batch": batch or "none",
                                        "trigger": trigger}) as run:
            run.log_metrics({"challenger_score": d.challenger_score, "promoted": float(d.promote),
                             "n_accepted": len(validation["accepted"]), "n_quarantined": len(validation["rejected"]),
                             "threshold": thr["threshold"],
                             **({"champion_score": d.champion_score} if d.champion_score is not None else {})})
            if run.active:
                import mlflow

                mlflow.set_tags({"decision": "promoted" if d.promote else "refused",
                                 "model.name": name, "model.version": challenger_version})
                mlflow.log_dict({"decision": d.as_dict(), "validation": validation, **thr}, "decision.json")
    fault_point("retrain:after-alias")
    return {**d.as_dict(), "model": name, "challenger_version": challenger_version,
            "champion_version": champion_info["version"] if champion_info else None, **thr}


# ---------------------------------------------------------------------------------------------
# after the decision: keep the data version (git commit) or undo it (batch to review)
# ---------------------------------------------------------------------------------------------
def commit_data_version(root: Path, dataset: str, category: str, message: str) -> str | None:
    """One git commit of dvc.lock and the outputs git holds (``cache: false``: the results table,
    ``metrics/summary.json``, ``plots/compare``, so ``dvc metrics diff HEAD~1`` shows what the
    retrain changed), only those paths (the user's other changes stay unstaged), when the project is
    a git checkout and dvc.lock changed; then ``dvc push`` when a remote is configured.
    Returns the commit hash (None: not a git checkout or nothing to commit)."""
    import subprocess

    from pipelines.workspace import uncached_outputs

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    if git("rev-parse", "--is-inside-work-tree").returncode != 0:
        return None
    paths = ["dvc.lock", *(p.as_posix() for p in uncached_outputs(root) if (root / p).exists())]
    git("add", "--", *paths)
    if git("diff", "--cached", "--quiet", "--", "dvc.lock").returncode == 0:
        return None
    r = git("commit", "-m", message, "--", *paths)
    if r.returncode != 0:
        raise StageFailed(f"git commit of the new data version failed: {r.stderr.strip() or r.stdout.strip()}")
    if run_dvc(["remote", "list"], root).strip():
        run_dvc(["push"], root)
    return git("rev-parse", "HEAD").stdout.strip()


def move_batch(root: Path, dataset: str, category: str, names: list[str], dst: Path) -> list[Path]:
    """Move the batch's files out of the accepted archive into ``dst`` (idempotent: a file already
    moved is not an error)."""
    archive = root / flows_params(root).retrain.accepted_dir / dataset / category
    dst.mkdir(parents=True, exist_ok=True)
    moved = []
    for n in names:
        if (archive / n).exists():
            shutil.move(str(archive / n), dst / n)
        if (dst / n).exists():
            moved.append(dst / n)
    return moved


def review_root(root: Path, dataset: str, category: str) -> Path:
    """The category's review folder: one sub-folder per batch, plus reviewed.csv."""
    return root / flows_params(root).retrain.review_dir / dataset / category


def review_dir(root: Path, dataset: str, category: str, batch: str) -> Path:
    return review_root(root, dataset, category) / batch


def keep_data_version(root: Path, dataset: str, category: str, name: str, version: str, message: str) -> str | None:
    """The batch stays: commit the data version (``commit_data_version``) and tag its hash on the version."""
    from defectlab import champion

    commit = commit_data_version(root, dataset, category, message)
    if commit:
        champion.tag_version(name, version, {"data.git_commit": commit})
    return commit


def undo_batch(root: Path, dataset: str, category: str, journal: dict, to_review: bool) -> Path | None:
    """Workspace back to the snapshot; the batch to its review folder (with the decision and its
    per-image scores) or, after an interruption, back to the incoming folder to be validated again.
    Safe to repeat after a crash half-way."""
    names, batch = journal.get("files", []), journal["batch"]
    folder = None
    if to_review:
        folder = review_dir(root, dataset, category, batch)
        if not folder.exists():
            tmp = folder.with_name(f".{batch}.tmp")
            move_batch(root, dataset, category, names, tmp / "images")
            write_json(tmp / "decision.json", {k: journal.get(k) for k in (
                "batch", "dataset", "category", "method", "decision", "challenger_version", "champion_version",
                "scores", "trigger", "time")})
            with open(tmp / "scores.csv", "w", newline="") as f:   # worst (highest score) first
                w = csv.DictWriter(f, fieldnames=["file", "score", "normalized_score", "label", "error"])
                w.writeheader()
                w.writerows(journal.get("scores") or [])
            tmp.rename(folder)
    else:
        move_batch(root, dataset, category, names, root / flows_params(root).retrain.incoming_dir / dataset / category)
    restore(root, dataset)
    return folder


def recover(root: Path, dataset: str, logger) -> dict | None:
    """Finish or undo a retrain of ``dataset`` that a crash interrupted (its journal is still there).

    Decided (the decision is in the journal): the decision is applied again (tags and aliases are
    idempotent), then finished as the flow would have (commit, or batch to review). Not decided:
    the workspace goes back to the snapshot, the batch back to the incoming folder, and registry
    versions the interrupted run registered are tagged ``decision=interrupted``."""
    from defectlab import champion

    journal = read_journal(root, dataset)
    if journal is None:
        return None
    category = journal["category"]
    name = champion.model_name(journal["method"], dataset, category)
    if journal.get("step") in ("decided", "applied"):
        d = champion.Decision(**journal["decision"])
        champion.apply_decision(name, journal["challenger_version"], d,
                                extra_tags={"trigger": journal.get("trigger", ""), "batch": journal["batch"]})
        if d.promote or journal.get("on_refuse") == "keep":
            keep_data_version(root, dataset, category, name, journal["challenger_version"], journal["commit_message"])
        else:
            undo_batch(root, dataset, category, journal, to_review=True)
        logger.warning("finished the interrupted retrain of batch %s (%s)", journal["batch"],
                       "promoted" if d.promote else "refused")
    else:
        before = int(journal.get("latest_version_before") or 0)
        latest = champion.latest_version(name)
        champ = champion.get_alias(name, champion.CHAMPION)
        for v in range(before + 1, int(latest.version) + 1 if latest else 0):
            if champ is None or str(v) != str(champ.version):
                champion.tag_version(name, v, {"decision": "interrupted",
                                               "decision.reason": f"retrain of batch {journal['batch']} was "
                                                                  f"interrupted at step {journal.get('step')}; undone"})
        undo_batch(root, dataset, category, journal, to_review=False)
        logger.warning("undid the retrain of batch %s interrupted at step %s: workspace restored, its %d images "
                       "are back in the incoming folder", journal["batch"], journal.get("step"),
                       len(journal.get("files", [])))
    clear_journal(root, dataset)
    return journal


@flow(name="retrain", log_prints=True)
def retrain_flow(dataset: str, category: str, method: str | None = None, root: str = ".",
                 force_reason: str | None = None, trigger: str = "retrain flow") -> dict:
    """Validate incoming images, retrain the category, promote the challenger if not worse
    (``force_reason``: promote anyway, the reason recorded; used by ``defectlab review accept``)."""
    from filelock import Timeout

    from defectlab.errors import DefectlabError

    logger = get_run_logger()
    root_p = Path(root).resolve()
    cfg = flows_params(root_p).retrain
    method = method or cfg.method
    setup_tracking(root_p)
    t0 = time.perf_counter()
    try:
        with dataset_lock([dataset], root_p, timeout=cfg.lock_timeout_s):
            logger.info("dataset lock acquired after %.1fs", time.perf_counter() - t0)
            return _retrain(root_p, dataset, category, method, cfg, force_reason, trigger, logger)
    except Timeout:
        raise DefectlabError(f"dataset {dataset!r} is locked by another retrain or reproduce "
                             f"({dataset_lock_path(dataset, root_p)}) for more than "
                             f"flows.retrain.lock_timeout_s={cfg.lock_timeout_s}s") from None


def _retrain(root_p: Path, dataset: str, category: str, method: str, cfg, force_reason, trigger, logger) -> dict:
    from defectlab import champion

    recover(root_p, dataset, logger)
    validation = validate_incoming(str(root_p), dataset, category)
    fault_point("retrain:validated")
    name = champion.model_name(method, dataset, category)
    current = champion.get_alias(name, champion.CHAMPION)
    latest_before = champion.latest_version(name)
    names, batch = [], None
    if validation["accepted"]:
        digest = hashlib.sha256("".join(sorted(a["sha256"] for a in validation["accepted"])).encode()).hexdigest()
        batch = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{digest[:8]}"
        snapshot(root_p, dataset)
        write_journal(root_p, dataset, {"step": "snapshot", "batch": batch, "dataset": dataset, "category": category,
                                        "method": method, "trigger": trigger, "on_refuse": cfg.on_refuse,
                                        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                        "latest_version_before": latest_before.version if latest_before else 0,
                                        "files": []})
    try:
        if validation["accepted"]:
            names = add_to_training_set(str(root_p), dataset, category, validation["accepted"], batch)
        # always: also finishes stages a params or code change left stale
        stages_rerun = rerun_stages(str(root_p), method, dataset, category)
        latest = champion.latest_version(name)
        if latest is None:
            raise RuntimeError(f"no registered version of {name}: is tracking on (DEFECTLAB_TRACKING) for the fit stage?")
        already_decided = current is not None and (str(latest.version) == str(current.version)
                                                   or "decision" in (latest.tags or {}))
        if already_decided and "fit@" not in stages_rerun:
            logger.info("nothing new (no accepted images, stages up to date); champion v%s stays", current.version)
            clear_journal(root_p, dataset)
            return {"promote": False, "reason": "nothing new to compare", "model": name,
                    "champion_version": str(current.version), "challenger_version": None,
                    "rejected": validation["rejected"], "accepted": len(validation["accepted"]), "batch": batch}
        champion_info = score_version(str(root_p), method, dataset, category, cfg.metric)
        decision = decide(str(root_p), method, dataset, category, champion_info, force_reason)
        scores = batch_scores(root_p, method, dataset, category, names) if names else []
        if batch:
            write_journal(root_p, dataset, {**read_journal(root_p, dataset), "step": "decided", "decision": decision,
                                            "challenger_version": str(latest.version), "scores": scores,
                                            "champion_version": champion_info["version"] if champion_info else None,
                                            "commit_message": f"retrain {dataset}/{category}: batch {batch}, "
                                                              f"{len(names)} images; {name} v{latest.version} "
                                                              f"{'promoted' if decision['promote'] else 'refused'}"})
        result = apply_decision(str(root_p), method, dataset, category, str(latest.version), champion_info,
                                validation, stages_rerun, decision, trigger, batch)
    except Exception:
        journal = read_journal(root_p, dataset)
        if journal is not None:   # undo now (decided: finish now); a kill -9 leaves it to the next run
            logger.error("retrain failed at step %s: recovering batch %s", journal.get("step"), journal.get("batch"))
            recover(root_p, dataset, logger)
        raise
    if batch:
        write_journal(root_p, dataset, {**read_journal(root_p, dataset), "step": "applied"})
    result.update(rejected=validation["rejected"], accepted=len(validation["accepted"]), batch=batch, scores=scores,
                  stages_rerun=stages_rerun)
    if batch and not result["promote"] and cfg.on_refuse == "review":
        folder = undo_batch(root_p, dataset, category, read_journal(root_p, dataset), to_review=True)
        result["review"] = str(folder)
        logger.warning("refused: workspace restored to the champion's data version; batch %s is in %s for "
                       "`defectlab review accept|reject`", batch, folder)
    elif batch:
        result["git_commit"] = keep_data_version(root_p, dataset, category, name, result["challenger_version"],
                                                 read_journal(root_p, dataset)["commit_message"])
    clear_journal(root_p, dataset)
    return result


# ---------------------------------------------------------------------------------------------
# review: a person decides on a refused batch
# ---------------------------------------------------------------------------------------------
def list_reviews(root: str, dataset: str, category: str) -> list[dict]:
    """The batches waiting in the review folder, oldest first, with their decision."""
    base = review_root(Path(root).resolve(), dataset, category)
    out = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []:
        info = json.loads((folder / "decision.json").read_text())
        out.append({"batch": folder.name, "images": len(list((folder / "images").iterdir())),
                    "reason": (info.get("decision") or {}).get("reason"), "folder": str(folder)})
    return out


def _log_review(root: Path, dataset: str, category: str, batch: str, verdict: str, reason: str) -> None:
    log = review_root(root, dataset, category) / "reviewed.csv"
    new = not log.exists()
    with open(log, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "batch", "verdict", "reason"])
        w.writerow([datetime.now(timezone.utc).isoformat(timespec="seconds"), batch, verdict, reason])


def _review_folder(root: Path, dataset: str, category: str, batch: str) -> Path:
    from defectlab.errors import ResourceMissingError

    folder = review_dir(root, dataset, category, batch)
    if not (folder / "decision.json").exists():
        waiting = ", ".join(r["batch"] for r in list_reviews(str(root), dataset, category)) or "none"
        raise ResourceMissingError(f"{folder}: no batch {batch!r} waiting for review (waiting: {waiting})")
    return folder


def review_accept(root: str, dataset: str, category: str, batch: str, method: str | None = None) -> dict:
    """A person vouches for a refused batch: its images go back to the incoming folder and are
    retrained with the margin check skipped (the reason recorded on the version and the run)."""
    root_p = Path(root).resolve()
    folder = _review_folder(root_p, dataset, category, batch)
    info = json.loads((folder / "decision.json").read_text())
    incoming = root_p / flows_params(root_p).retrain.incoming_dir / dataset / category
    incoming.mkdir(parents=True, exist_ok=True)
    with dataset_lock([dataset], root_p):
        for p in sorted((folder / "images").iterdir()):
            shutil.move(str(p), incoming / p.name)
        _log_review(root_p, dataset, category, batch, "accept", "accepted by a person: retrained without the margin check")
        shutil.rmtree(folder)
    return retrain_flow(dataset=dataset, category=category, method=method or info.get("method"), root=str(root_p),
                        force_reason=f"batch {batch} accepted in review", trigger=f"review accept {batch}")


def review_reject(root: str, dataset: str, category: str, batch: str, reason: str) -> dict:
    """A person confirms a refused batch is bad: its images go to the quarantine with the reason."""
    root_p = Path(root).resolve()
    folder = _review_folder(root_p, dataset, category, batch)
    quarantine = root_p / flows_params(root_p).retrain.quarantine_dir / dataset / category
    with dataset_lock([dataset], root_p):
        images = sorted((folder / "images").iterdir())
        for p in images:
            _quarantine(p, quarantine, f"rejected in review of batch {batch}: {reason}")
        _log_review(root_p, dataset, category, batch, "reject", reason)
        shutil.rmtree(folder)
    return {"batch": batch, "quarantined": len(images), "quarantine": str(quarantine)}


def serve(dataset: str, category: str, method: str | None = None, root: str = ".", cron: str | None = None) -> None:
    """Serve the flow on a cron schedule (params ``flows.retrain.cron`` unless ``cron`` is given)."""
    cron = cron or flows_params(Path(root)).retrain.cron
    if not cron:
        raise ValueError("no schedule: pass --cron or set flows.retrain.cron in params.yaml")
    retrain_flow.serve(name=f"retrain-{dataset}-{category}", cron=cron,
                       parameters={"dataset": dataset, "category": category, "method": method,
                                   "root": str(Path(root).resolve())})
