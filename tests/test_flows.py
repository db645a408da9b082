"""The Prefect flows on a tiny copy of the project (demo `board`, patchcore, 64 px), with a temporary
Prefect API (prefect_test_harness, i.e. no server configured) and a local MLflow store:

- reproduce runs every DVC stage as its own task; a second run skips them all;
- the same flow on a Dask LocalCluster (prefect-dask) gives the same metrics;
- retrain quarantines bad files with reasons, promotes a better challenger over a deliberately
  bad champion (fitted on anomalous images), refuses a deliberately worse one (trained on
  anomalies dropped into the incoming folder), and waits on the dataset lock;
- inspect writes one CSV row per file, including a corrupt one, with labels at the stored threshold.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import git_dvc_init, make_project  # noqa: E402


def sh(cmd, cwd):
    from conftest import sh as run

    return run(cmd, cwd)

pytestmark = pytest.mark.slow
QUALITY = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro")
CAT = "board"


# ------------------------------------------------------------------------------------------- unit
def test_decide_margin_and_direction():
    from defectlab.champion import decide

    assert decide(0.80, None, metric="image_auroc", margin=0.0).promote
    assert decide(0.80, 0.80, metric="image_auroc", margin=0.0).promote
    assert decide(0.79, 0.80, metric="image_auroc", margin=0.02).promote
    worse = decide(0.70, 0.80, metric="image_auroc", margin=0.05)
    assert not worse.promote and "worse" in worse.reason
    assert not decide(12.0, 10.0, metric="fit_seconds", margin=1.0).promote   # lower is better
    assert not decide(float("nan"), 0.5, metric="image_auroc", margin=0.1).promote


def test_select_threshold_rules():
    from defectlab.champion import select_threshold

    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
    labels = np.array([0, 0, 0, 0, 1, 1])
    t = select_threshold(scores, labels, "f1_max")
    assert 0.4 < t <= 0.8 and ((scores >= t) == labels.astype(bool)).all()
    normals = np.linspace(0, 1, 100)
    t = select_threshold(np.r_[normals, 2.0], np.r_[np.zeros(100), 1], "fpr", target_fpr=0.05)
    assert (normals >= t).mean() <= 0.05 and (normals >= t).mean() >= 0.04


def test_malformed_flows_params_are_one_line_not_a_traceback(tmp_path):
    import yaml
    from typer.testing import CliRunner

    import pipelines.retrain  # noqa: F401  Prefect sets its log handlers up on import: not on CliRunner's
                              # stderr, which is closed after invoke (later flows would log into it)
    from defectlab.cli import app

    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["flows"]["retrain"]["margin"] = -0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["retrain", "--dataset", "demo", "--category", "weave", "--root", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert "invalid params: flows.retrain.margin" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------ the project
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    # patchcore with random weights: the DS2 backbone stage is not needed here
    proj = make_project(tmp_path_factory.mktemp("flowproj"), categories=[CAT], methods=["patchcore"], n_test_good=6,
                        backbone=False,
                        extra={"flows": {"retrain": {"method": "patchcore", "metric": "image_auroc", "margin": 0.02,
                                                     "lock_timeout_s": 2},
                                         "reproduce": {"retries": 1, "retry_delay_s": 1}}})
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("PYTHONPATH", f"{proj / 'src'}{os.pathsep}{ROOT}")   # stages use the copy; Dask workers import pipelines
        mp.setenv("DEFECTLAB_TRACKING", "on")
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        git_dvc_init(proj, None)
        with prefect_test_harness(server_startup_timeout=300):
            from prefect.settings import PREFECT_API_URL

            mp.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # for Dask worker processes
            yield proj


def quality(proj):
    m = json.loads((proj / f"metrics/patchcore/demo/{CAT}.json").read_text())
    return {k: m[k] for k in QUALITY}


@pytest.fixture(scope="module")
def first_run(project):
    from pipelines.reproduce import reproduce

    return reproduce(str(project))


def test_reproduce_runs_every_stage_then_skips_all(project, first_run):
    from pipelines.common import stage_graph
    from pipelines.reproduce import reproduce

    stages = [s for s, _ in stage_graph(project)]
    assert stages[0] in ("prepare@demo", "config") and stages.index("report") > stages.index("evaluate@patchcore-demo")
    assert stages.index("prepare@demo") < stages.index("synthesize@demo")
    assert stages.index("config") < stages.index("pretrain@patchcore-demo")
    assert sorted(first_run["ran"]) == sorted(stages) and not first_run["skipped"]
    assert all(0.0 <= v <= 1.0 for v in quality(project).values())
    second = reproduce(str(project))
    assert second["ran"] == [] and sorted(second["skipped"]) == sorted(stages)
    status = sh(["dvc", "status"], project)
    assert "changed" not in status, status


def test_reproduce_on_dask_local_cluster_gives_same_metrics(project, first_run):
    from pipelines.reproduce import reproduce

    local = quality(project)
    shutil.rmtree(project / "metrics")
    out = reproduce(str(project), force=True, dask_workers=2)
    assert set(out["ran"]) == set(first_run["ran"])
    dask_metrics = quality(project)
    for k in QUALITY:
        assert dask_metrics[k] == pytest.approx(local[k], abs=1e-9), (k, local, dask_metrics)


def _register_bad_champion(proj):
    """A deliberately bad champion: patchcore fitted on the normal images *plus* every anomalous
    test image, so the anomalies sit in its memory bank (image AUROC collapses)."""
    from dataclasses import replace

    import mlflow
    import torch
    from mlflow import MlflowClient

    from defectlab import pipeline
    from defectlab.champion import CHAMPION, model_name
    from defectlab.config import Params
    from defectlab.data.mvtec import Sample
    from defectlab.methods.base import FitContext

    params = Params.load(proj / "params.yaml")
    cls, cfg = pipeline.load_method_config(params, "patchcore")
    data = pipeline.category_data(params, "demo", CAT, pipeline.Layout(proj))
    poisoned = replace(data, train=data.train + [Sample(s.path, 0, "good") for s in data.test if s.label == 1])
    model = cls(cfg, torch.device("cpu"))
    model.fit(FitContext(dataset="demo", category=CAT, data=poisoned, image_size=64, seed=0, device=torch.device("cpu"),
                         pretrain_dir=proj / "checkpoints/patchcore/demo/pretrain", progress=False))
    model.save(proj / "bad_model")
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("demo")
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="bad-champion") as run:
        mlflow.log_artifacts(str(proj / "bad_model"), "model")
    client = MlflowClient()
    mv = client.create_model_version(model_name("patchcore", "demo", CAT), f"{run.info.artifact_uri}/model",
                                     run_id=run.info.run_id)
    client.set_registered_model_alias(mv.name, CHAMPION, mv.version)
    return str(mv.version)


def test_retrain_promotes_better_challenger_and_quarantines_bad_files(project, first_run):
    from PIL import Image

    from defectlab.champion import CHAMPION, get_alias
    from defectlab.data.demo import generate_demo
    from pipelines.retrain import retrain_flow

    bad_version = _register_bad_champion(project)
    extra = project.parent / "extra"
    generate_demo(extra, seed=0, image_size=64, n_train=16, n_test_good=0, n_test_per_defect=0, categories=[CAT])
    incoming = project / "data/incoming/demo" / CAT
    incoming.mkdir(parents=True)
    for p in sorted((extra / CAT / "train/good").glob("*.png"))[12:]:   # 4 new normal images
        shutil.copy(p, incoming / f"new_{p.name}")
    (incoming / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.new("RGB", (8, 8)).save(incoming / "tiny.png")
    shutil.copy(project / f"data/prepared/demo/{CAT}/train/good/000.png", incoming / "dup.png")

    res = retrain_flow(dataset="demo", category=CAT, method="patchcore", root=str(project))
    assert res["accepted"] == 4
    reasons = {r["file"]: r["reason"] for r in res["rejected"]}
    assert set(reasons) == {"corrupt.png", "tiny.png", "dup.png"}
    assert "too small" in reasons["tiny.png"] and "duplicate" in reasons["dup.png"]
    rows = list(csv.DictReader(open(project / "data/quarantine/demo" / CAT / "quarantine.csv")))
    assert {r["file"] for r in rows} == set(reasons) and all(r["reason"] for r in rows)
    assert not any(incoming.iterdir())
    assert len(list((project / f"data/prepared/demo/{CAT}/train/good").glob("incoming_*.png"))) == 4
    assert res["champion_version"] == bad_version
    assert "fit@patchcore-demo" in res["stages_rerun"] and "pretrain@" not in res["stages_rerun"], res
    assert res["promote"], res
    assert res["challenger_score"] > res["champion_score"] + 0.1, res
    assert str(get_alias(res["model"], CHAMPION).version) == res["challenger_version"]
    assert "changed" not in sh(["dvc", "status"], project)   # dvc.lock describes the new data version
    # the data version's commit holds dvc.lock and the results git keeps (the summary metric among them)
    committed = set(sh(["git", "show", "--name-only", "--format=", "HEAD"], project).split())
    assert {"dvc.lock", "metrics/summary.json", "reports/results.md"} <= committed, committed
    assert not sh(["git", "status", "--porcelain", "--", "dvc.lock", "metrics/summary.json", "plots/compare"], project)


def tree_digest(root: Path, *parts: str) -> dict:
    """{relative path: sha256} of every file under the given parts of ``root`` (what "byte-identical" means)."""
    from defectlab.io import sha256_file

    out = {}
    for part in parts:
        base = root / part
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []
        out.update({str(p.relative_to(root)): sha256_file(p) for p in files})
    return out


WORKSPACE = ("dvc.lock", "data/prepared/demo", "data/accepted", "data/synth/demo", "models/patchcore/demo",
             "checkpoints/patchcore/demo", "metrics", "plots", "reports/results.md", "reports/maps")


def test_retrain_refuses_worse_challenger_and_undoes_its_batch(project, first_run):
    from defectlab.champion import CHALLENGER, CHAMPION, get_alias
    from pipelines.retrain import retrain_flow

    champion_before = get_alias(f"patchcore-demo-{CAT}", CHAMPION)
    assert champion_before is not None, "run after the promotion test"
    before = tree_digest(project, *WORKSPACE)
    head = sh(["git", "rev-parse", "HEAD"], project).strip()
    incoming = project / "data/incoming/demo" / CAT
    incoming.mkdir(parents=True, exist_ok=True)
    planted = []
    for p in sorted((project / f"data/prepared/demo/{CAT}/test").glob("*/*.png")):
        if p.parent.name != "good":   # anomalous images passed off as normal: a worse model
            shutil.copy(p, incoming / f"{p.parent.name}_{p.name}")
            planted.append(p)
    res = retrain_flow(dataset="demo", category=CAT, method="patchcore", root=str(project))
    assert not res["promote"], res
    assert res["challenger_score"] < res["champion_score"] - 0.02, res
    assert str(get_alias(res["model"], CHAMPION).version) == str(champion_before.version)
    challenger = get_alias(res["model"], CHALLENGER)
    assert str(challenger.version) == res["challenger_version"] and challenger.tags["decision"] == "refused"
    # no trace: dvc.lock, the training set, the archive, models/, metrics/ ... byte-identical; DVC agrees
    assert tree_digest(project, *WORKSPACE) == before
    assert "changed" not in sh(["dvc", "status"], project)
    assert sh(["git", "rev-parse", "HEAD"], project).strip() == head   # nothing to commit
    # the batch waits for review: every image, the decision, per-image scores worst first
    review = Path(res["review"])
    assert review.parent == project / "data/review/demo" / CAT and review.name == res["batch"]
    assert len(list((review / "images").iterdir())) == len(planted) and not any(incoming.iterdir())
    info = json.loads((review / "decision.json").read_text())
    assert info["decision"]["promote"] is False and info["champion_version"] == str(champion_before.version)
    scores = [r["score"] for r in info["scores"]]
    assert len(scores) == len(planted) and scores == sorted(scores, reverse=True)
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'retrain'")
    assert set(runs["tags.decision"]) == {"promoted", "refused"}
    assert runs["metrics.champion_score"].notna().all() and runs["metrics.challenger_score"].notna().all()


def test_review_reject_quarantines_the_batch_with_the_reason(project, first_run):
    from defectlab.errors import ResourceMissingError
    from pipelines.retrain import list_reviews, review_accept, review_reject

    waiting = list_reviews(str(project), "demo", CAT)
    assert len(waiting) == 1
    batch = Path(waiting[0]["folder"])
    n = waiting[0]["images"]
    res = review_reject(str(project), "demo", CAT, batch.name, "scratches on every part")
    assert res["quarantined"] == n and not batch.exists()
    rows = list(csv.DictReader(open(project / "data/quarantine/demo" / CAT / "quarantine.csv")))
    rejected = [row for row in rows if "scratches on every part" in row["reason"]]
    assert len(rejected) == n and all(batch.name in row["reason"] for row in rejected)
    assert all((project / "data/quarantine/demo" / CAT / row["quarantined_as"]).exists() for row in rejected)
    with pytest.raises(ResourceMissingError, match="no batch"):
        review_accept(str(project), "demo", CAT, batch.name)


def _retrain_killed_at(project, fault: str):
    """The retrain in its own process, killed (SIGKILL) at ``fault``."""
    import subprocess

    code = ("from pipelines.retrain import retrain_flow; "
            f"retrain_flow(dataset='demo', category='{CAT}', method='patchcore', root='{project}')")
    r = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DEFECTLAB_FAULT_AT": fault})
    assert r.returncode == -9, (fault, r.returncode, r.stdout[-2000:], r.stderr[-2000:])


def test_retrain_interrupted_at_any_step_loses_nothing(project, first_run, monkeypatch):
    """kill -9 after the challenger is registered, a full disk while the model is written, kill -9
    after the decision before the alias moves: each rerun finishes or undoes the previous one."""
    from defectlab import champion
    from defectlab.data.demo import generate_demo
    from defectlab.inference import load
    from pipelines.retrain import retrain_flow
    from pipelines.common import setup_tracking
    from pipelines.workspace import read_journal

    setup_tracking(project)
    name = f"patchcore-demo-{CAT}"
    extra = project.parent / "extra_faults"
    generate_demo(extra, seed=3, image_size=64, n_train=4, n_test_good=0, n_test_per_defect=0, categories=[CAT])
    incoming = project / "data/incoming/demo" / CAT
    incoming.mkdir(parents=True, exist_ok=True)
    for p in sorted((extra / CAT / "train/good").glob("*.png")):
        shutil.copy(p, incoming / f"late_{p.name}")
    from defectlab.io import sha256_file

    def contents():   # names change (the archive names files by digest); contents must not
        return sorted(sha256_file(p) for p in incoming.iterdir())

    batch_files = contents()
    before = tree_digest(project, *WORKSPACE)
    champ0 = champion.get_alias(name, champion.CHAMPION)
    n_versions = int(champion.latest_version(name).version)

    def champion_loads():
        mv = champion.get_alias(name, champion.CHAMPION)
        det = load(f"models:/{name}/{mv.version}", device="cpu", cache_dir=project.parent / f"dl_{mv.version}")
        assert det.threshold["image"] is not None
        return mv

    # 1. killed after the stages reran (a challenger version is registered, nothing decided)
    _retrain_killed_at(project, "retrain:stages-rerun")
    j = read_journal(project, "demo")
    assert j["step"] == "data-added" and sorted(j["files"]) and not any(incoming.iterdir())
    assert str(champion_loads().version) == str(champ0.version)
    # 2. the rerun undoes it first; then its own model write fails (disk full): undone at once
    monkeypatch.setenv("DEFECTLAB_FAULT_AT", "fit:write:enospc")
    with pytest.raises(Exception, match="No space left"):
        retrain_flow(dataset="demo", category=CAT, method="patchcore", root=str(project))
    monkeypatch.delenv("DEFECTLAB_FAULT_AT")
    assert read_journal(project, "demo") is None
    assert tree_digest(project, *WORKSPACE) == before
    assert contents() == batch_files                                          # back where they came from
    assert str(champion_loads().version) == str(champ0.version)
    interrupted = [v for v in range(n_versions + 1, int(champion.latest_version(name).version) + 1)
                   if (champion._client().get_model_version(name, str(v)).tags or {}).get("decision") == "interrupted"]
    assert len(interrupted) >= 1
    # 3. killed after the decision, before the alias moved; 4. the rerun applies it and finishes
    _retrain_killed_at(project, "retrain:before-alias")
    j = read_journal(project, "demo")
    assert j["step"] == "decided"
    res = retrain_flow(dataset="demo", category=CAT, method="patchcore", root=str(project))
    assert read_journal(project, "demo") is None and res["promote"] is False and res["reason"] == "nothing new to compare"
    decided = champion._client().get_model_version(name, j["challenger_version"])
    assert decided.tags["decision"] == ("promoted" if j["decision"]["promote"] else "refused")
    good = project / f"data/prepared/demo/{CAT}/train/good"
    kept = sorted(good.glob("incoming_*.png"))
    if j["decision"]["promote"]:   # the batch is in the training set exactly once, committed to git
        assert str(champion.get_alias(name, champion.CHAMPION).version) == j["challenger_version"]
        assert len(kept) == sum("train/good/incoming_" in k for k in before) + 4
        assert "retrain demo/" + CAT in sh(["git", "log", "-1", "--format=%s"], project)
        assert decided.tags.get("data.git_commit")
    else:                          # refused: in review, not in the training set
        assert len(list((project / "data/review/demo" / CAT / j["batch"] / "images").iterdir())) == 4
        assert tree_digest(project, *WORKSPACE) == before
    assert not any(incoming.iterdir())
    champion_loads()
    assert "changed" not in sh(["dvc", "status"], project)


def test_retrain_killed_after_validation_mid_copy_or_after_the_alias_loses_nothing(project, first_run):
    """kill -9 right after validation (the bad file already quarantined), after the first image of
    the batch moved, and after the alias moved: the next run undoes or finishes each; the batch ends
    in the training set exactly once (or in review), the bad file in the quarantine exactly once."""
    from defectlab import champion
    from defectlab.data.demo import generate_demo
    from defectlab.io import sha256_file
    from pipelines.common import setup_tracking
    from pipelines.retrain import retrain_flow
    from pipelines.workspace import read_journal

    setup_tracking(project)
    name = f"patchcore-demo-{CAT}"
    extra = project.parent / "extra_faults2"
    generate_demo(extra, seed=9, image_size=64, n_train=3, n_test_good=0, n_test_per_defect=0, categories=[CAT])
    incoming = project / "data/incoming/demo" / CAT
    incoming.mkdir(parents=True, exist_ok=True)
    for p in sorted((extra / CAT / "train/good").glob("*.png")):
        shutil.copy(p, incoming / f"kill_{p.name}")
    batch = sorted(sha256_file(p) for p in incoming.iterdir())
    (incoming / "broken.png").write_bytes(b"not a png")
    quarantine_log = project / "data/quarantine/demo" / CAT / "quarantine.csv"

    def quarantined_broken():
        return [r for r in csv.DictReader(open(quarantine_log)) if r["file"] == "broken.png"]

    before = tree_digest(project, *WORKSPACE)
    champ0 = champion.get_alias(name, champion.CHAMPION)
    # 1. after validation: nothing of the batch moved, no journal; the bad file is in the quarantine
    _retrain_killed_at(project, "retrain:validated")
    assert read_journal(project, "demo") is None and tree_digest(project, *WORKSPACE) == before
    assert sorted(sha256_file(p) for p in incoming.iterdir()) == batch and len(quarantined_broken()) == 1
    # 2. mid-copy: one image in the archive and the training set, the others still incoming
    _retrain_killed_at(project, "retrain:adding")
    j = read_journal(project, "demo")
    assert j["step"] == "adding-data" and len(list(incoming.iterdir())) == 2
    # 3. the next run undoes that, retrains, moves the alias and is killed before it records it
    _retrain_killed_at(project, "retrain:after-alias")
    j = read_journal(project, "demo")
    assert j["step"] == "decided" and not any(incoming.iterdir())
    moved = str(champion.get_alias(name, champion.CHAMPION).version)
    assert moved == (j["challenger_version"] if j["decision"]["promote"] else str(champ0.version))
    # 4. the next run finishes it
    retrain_flow(dataset="demo", category=CAT, method="patchcore", root=str(project))
    assert read_journal(project, "demo") is None and not any(incoming.iterdir())
    good = project / f"data/prepared/demo/{CAT}/train/good"
    in_training = sorted(sha256_file(p) for p in good.iterdir() if sha256_file(p) in batch)
    reviewed = project / "data/review/demo" / CAT / j["batch"] / "images"
    if j["decision"]["promote"]:
        assert in_training == batch and str(champion.get_alias(name, champion.CHAMPION).version) == moved
    else:
        assert in_training == [] and sorted(sha256_file(p) for p in reviewed.iterdir()) == batch
    assert len(quarantined_broken()) == 1
    assert "changed" not in sh(["dvc", "status"], project)


def test_history_lists_versions_data_and_decisions(project, first_run):
    from defectlab.champion import history

    rows = history("demo", CAT)
    assert [row["version"] for row in rows] == sorted(row["version"] for row in rows)
    decisions = {row["decision"] for row in rows}
    # ("interrupted" tags get overwritten when a later retrain refits the same content: that version is reused)
    assert {"first version", "promoted", "refused"} <= decisions, decisions
    fitted = [row for row in rows if row["decision"] in ("first version", "promoted", "refused")]
    assert all(row["data_manifest"] and row["n_train"] for row in fitted)        # which data each was fitted on
    assert {row["trigger"] for row in fitted} >= {"dvc repro", "retrain flow"}
    assert any(row["data_commit"] for row in rows if row["decision"] == "promoted")
    assert sum("champion" in row["aliases"].split(",") for row in rows) == 1


def test_retrain_waits_for_the_dataset_lock(project, first_run):
    from filelock import FileLock

    from defectlab.errors import DefectlabError
    from defectlab.stagekit import dataset_lock_path
    from pipelines.retrain import retrain_flow

    lock = FileLock(str(dataset_lock_path("demo", project)))
    with lock:   # another retrain / reproduce of this dataset is running: this one waits (2 s here), then gives up
        with pytest.raises(DefectlabError, match="locked by another retrain or reproduce"):
            retrain_flow(dataset="demo", category=CAT, method="patchcore", root=str(project))
        # and a stage of plain `dvc repro` refuses to start (one line, no traceback)
        r = __import__("subprocess").run(["dvc", "repro", "--force", "--single-item", "prepare@demo"], cwd=project,
                                         capture_output=True, text=True, env={**os.environ})
        assert r.returncode != 0 and "is locked by a running retrain or reproduce flow" in r.stdout + r.stderr


def test_inspect_scores_a_folder_with_a_corrupt_file(project, first_run):
    from defectlab.champion import CHAMPION, get_alias
    from pipelines.inspect import inspect_flow

    if get_alias(f"patchcore-demo-{CAT}", CHAMPION) is None:
        pytest.skip("needs the champion from the retrain tests")
    folder = project.parent / "batch"
    folder.mkdir()
    test_dir = project / f"data/prepared/demo/{CAT}/test"
    shutil.copy(sorted((test_dir / "good").glob("*.png"))[0], folder / "a_good.png")
    anomalous = sorted(p for p in test_dir.glob("*/*.png") if p.parent.name != "good")[:2]
    for i, p in enumerate(anomalous):
        shutil.copy(p, folder / f"b_anomalous_{i}.png")
    (folder / "c_corrupt.png").write_bytes(b"not an image at all")
    res = inspect_flow(folder=str(folder), dataset="demo", category=CAT, method="patchcore", root=str(project),
                       out=str(project.parent / "inspect_out"))
    rows = list(csv.DictReader(open(res["csv"])))
    assert [Path(r["path"]).name for r in rows] == ["a_good.png", "b_anomalous_0.png", "b_anomalous_1.png",
                                                   "c_corrupt.png"]
    bad = rows[-1]
    assert bad["label"] == "error" and bad["error"] and bad["score"] == ""
    thr = float(rows[0]["threshold"])
    assert thr == pytest.approx(float(get_alias(f"patchcore-demo-{CAT}", CHAMPION).tags["threshold"]))
    for r in rows[:3]:
        assert r["label"] == ("anomalous" if float(r["score"]) >= thr else "normal")
    assert len(list(Path(res["heatmaps"]).glob("*.png"))) == 3
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'inspect'")
    assert len(runs) == 1 and runs["metrics.n_errors"].iloc[0] == 1 and runs["metrics.n_images"].iloc[0] == 4
