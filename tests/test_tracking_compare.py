"""What makes two MLflow runs comparable: one store for the whole project (DVC experiment temp
workspaces included), MLflow's source tags, params and dataset inputs on per-category child runs,
and step-indexed loss curves from the training loops (``defectlab.steplog``)."""

import hashlib
import subprocess

import pytest
import torch

from defectlab import steplog, tracking


@pytest.fixture
def project(tracked_project):
    """A DVC-looking project with one prepared category, as the cwd, tracking on (conftest)."""
    return tracked_project


def test_store_of_a_dvc_exp_temp_workspace_is_the_projects(project, monkeypatch):
    """`dvc exp run --temp` / `--queue` run the stages in <root>/.dvc/tmp/exps/<tmp>/ (a full copy with
    its own .dvc/): their runs must go to <root>/mlflow.db, not to a store deleted with the copy."""
    import mlflow

    copy = project / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (copy / ".dvc").mkdir(parents=True)
    (copy / "src").mkdir()
    monkeypatch.chdir(copy)
    assert tracking.project_root() == project.resolve()
    assert tracking.project_root(copy / "src") == project.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{project.resolve()}/mlflow.db"
    assert tracking.setup() == f"sqlite:///{project.resolve()}/mlflow.db"
    assert (project / "mlflow.db").exists() and not (copy / "mlflow.db").exists()
    exp = mlflow.get_experiment(tracking._experiment("demo"))
    assert exp.artifact_location == (project.resolve() / "mlartifacts" / "demo").as_uri()
    # an explicit URI still wins, and so does the plain project root outside an experiment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.tracking_uri() == "sqlite:///elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(project / "data")
    assert tracking.tracking_uri() == f"sqlite:///{project.resolve()}/mlflow.db"


def test_child_runs_carry_params_and_the_category_dataset(project):
    import mlflow

    manifest = project / "data" / "prepared" / "demo" / "board" / "manifest.csv"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    from defectlab.stagekit import prepared_dir

    with tracking.stage_run("fit", dataset="demo", method="patchcore", profile="smoke", seed=3,
                            params={"profile": "smoke", "seed": 3}, data_dir=prepared_dir) as run:
        run.log_params({"method": {"coreset_ratio": 0.1}, "image_size": 64})
        with run.child("board") as child:
            child.log_metrics({"fit_seconds": 1.0})
    with tracking.stage_run("evaluate", dataset="demo", method="patchcore", profile="smoke", seed=3,
                            data_dir=prepared_dir) as ev:
        with ev.child("board") as ev_child:
            ev_child.log_metrics({"image_auroc": 0.5})

    r = mlflow.get_run(child.run_id)
    assert r.data.tags["mlflow.parentRunId"] == run.run_id
    for key, value in {"method": "patchcore", "dataset": "demo", "category": "board", "profile": "smoke",
                       "seed": "3", "method.coreset_ratio": "0.1", "image_size": "64"}.items():
        assert r.data.params.get(key) == value, key
    (inp,) = r.inputs.dataset_inputs
    assert inp.dataset.name == "demo/board"
    assert inp.dataset.digest == digest[:36]                       # MLflow keeps 36 characters
    assert str(project.resolve() / "data" / "prepared" / "demo" / "board") in inp.dataset.source
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "training" and tags["manifest.sha256"] == digest
    (ev_inp,) = mlflow.get_run(ev_child.run_id).inputs.dataset_inputs
    assert {t.key: t.value for t in ev_inp.tags}["mlflow.data.context"] == "evaluation"
    assert not mlflow.get_run(run.run_id).inputs.dataset_inputs   # the dataset-wide parent has no category


def test_source_tags_and_dvc_experiment_name(project, monkeypatch):
    import mlflow

    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                                        "--allow-empty", "-m", "init"]):
        subprocess.run(cmd, cwd=project, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("DVC_EXP_NAME", "lanky-bass")
    with tracking.stage_run("train", dataset="demo", method="dsr", category="board", profile="smoke", seed=0) as run:
        pass
    tags = mlflow.get_run(run.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == head == tags["git.commit"]
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert tags["dvc.exp_name"] == "lanky-bass"
    monkeypatch.delenv("DVC_EXP_NAME")
    with tracking.stage_run("train", dataset="demo", method="dsr", category="board") as plain:
        pass
    assert "dvc.exp_name" not in mlflow.get_run(plain.run_id).data.tags


def test_a_training_loop_logs_a_step_indexed_loss_curve(project):
    """DSR's generic Adam loop, 12 steps on a tiny linear model: 12 points at steps 0..11 in the stage's run;
    the training's own result is the same with and without the curve being logged."""
    from mlflow import MlflowClient

    from defectlab.methods.dsr import train_loop
    from defectlab.resume import Checkpoint

    def train():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        stats = train_loop(model, model.parameters(), lambda step, b: (((model(b[0]) - b[1]) ** 2).mean(), {}),
                           lambda start: ((x, y) for _ in range(start, 12)), iters=12, lr_at=lambda s: 0.05,
                           checkpoint=Checkpoint(None, "t"), every=100, desc="tiny", progress=False)
        return stats, model.weight.detach().clone()

    plain_stats, plain_w = train()
    with tracking.stage_run("train", dataset="demo", method="dsr", category="board") as run:
        stats, w = train()
    assert stats == plain_stats and torch.equal(w, plain_w)
    history = MlflowClient().get_metric_history(run.run_id, "loss/dsr_tiny")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(12))
    assert history[0].value != history[-1].value


def test_curves_are_thinned_and_msp_svdd_steps_are_global(monkeypatch):
    got: list[tuple[str, float, int]] = []
    with steplog.sink(lambda *a: got.append(a)):
        for step in range(5000):
            steplog.log_step("c", 1.0, step, total=5000)
    steps = [s for _, _, s in got]
    assert len(steps) <= steplog.MAX_POINTS + 1 and steps[0] == 0 and steps[-1] == 4999
    steplog.log_step("after", 1.0, 0)             # no sink installed: nothing recorded, no error
    assert all(name == "c" for name, _, _ in got)

    from defectlab.methods.msp_svdd import MSPSVDDConfig, MultiScalePatchSVDD

    cfg = MSPSVDDConfig(scales=[16], strides={16: 8}, jitters={16: 1}, width=0.0625, embed_dim=8, epochs=2,
                        patches_per_image=3, batch_size=4, n_clusters=2, kmeans_samples=16, kmeans_every=1)
    got.clear()
    with steplog.sink(lambda *a: got.append(a)):
        MultiScalePatchSVDD(cfg, torch.device("cpu")).train_encoders(torch.rand(3, 3, 32, 32), seed=0)
    # 3 images x 3 patches / batch 4 = 3 optimiser steps per epoch, numbered across epochs
    assert [(name, step) for name, _, step in got] == [("loss/msp_svdd", s) for s in range(6)]
