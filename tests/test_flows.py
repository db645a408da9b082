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
from conftest import make_project  # noqa: E402


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
        for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                    ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
            sh(cmd, proj)
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
    assert res["promote"], res
    assert res["challenger_score"] > res["champion_score"] + 0.1, res
    assert str(get_alias(res["model"], CHAMPION).version) == res["challenger_version"]
    assert "changed" not in sh(["dvc", "status"], project)   # dvc.lock describes the new data version


def test_retrain_refuses_worse_challenger(project, first_run):
    from defectlab.champion import CHALLENGER, CHAMPION, get_alias
    from pipelines.retrain import retrain_flow

    champion_before = get_alias(f"patchcore-demo-{CAT}", CHAMPION)
    assert champion_before is not None, "run after the promotion test"
    incoming = project / "data/incoming/demo" / CAT
    incoming.mkdir(parents=True, exist_ok=True)
    for p in sorted((project / f"data/prepared/demo/{CAT}/test").glob("*/*.png")):
        if p.parent.name != "good":   # anomalous images passed off as normal: a worse model
            shutil.copy(p, incoming / f"{p.parent.name}_{p.name}")
    res = retrain_flow(dataset="demo", category=CAT, method="patchcore", root=str(project))
    assert not res["promote"], res
    assert res["challenger_score"] < res["champion_score"] - 0.02, res
    assert str(get_alias(res["model"], CHAMPION).version) == str(champion_before.version)
    challenger = get_alias(res["model"], CHALLENGER)
    assert str(challenger.version) == res["challenger_version"] and challenger.tags["decision"] == "refused"
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'retrain'")
    assert set(runs["tags.decision"]) == {"promoted", "refused"}
    assert runs["metrics.champion_score"].notna().all() and runs["metrics.challenger_score"].notna().all()


def test_retrain_waits_for_the_dataset_lock(project, first_run):
    from filelock import FileLock, Timeout

    from pipelines.retrain import retrain_flow

    lock = FileLock(str(project / ".dvc/tmp/defectlab-retrain-demo.lock"))
    with lock:   # another retrain of this dataset is running: this one waits (2 s here), then gives up
        with pytest.raises(Timeout):
            retrain_flow(dataset="demo", category=CAT, method="patchcore", root=str(project))


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
