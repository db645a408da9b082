"""The DVC pipeline end to end on a tiny copy of the project: every stage runs and logs one MLflow
run; a second `dvc repro` runs nothing; a method's param change dirties only that method's stages;
a dataset param change dirties the dataset's stage (and so everything downstream)."""

import json

import pytest
import yaml

from conftest import build_repro_project, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Its own project: these tests change params and data and rerun, so they cannot share the
    session's read-only ``repro_project`` (test_deploy reads its first models and registry)."""
    return build_repro_project(tmp_path_factory)


def test_first_repro_writes_every_output_and_one_mlflow_run_per_stage(project):
    proj, env, first = project
    for method in ("patchcore", "padim"):
        for cat in ("weave", "board"):
            m = json.loads((proj / f"metrics/{method}/demo/{cat}.json").read_text())
            for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro",
                        "fit_seconds", "images_per_second", "peak_rss_mb"):
                assert key in m, key
            assert list((proj / f"reports/maps/{method}/demo/{cat}").glob("*.png"))
    assert "| patchcore | demo | weave |" in (proj / "reports/results.md").read_text()
    assert (proj / "reports/results.png").exists()
    n_stages = first.count("Running stage")
    assert n_stages == 1 + 1 + 1 + 1 + 2 + 2 + 2 + 1 + 1  # prepare, synthesize, backbone, config, pretrain, fit, evaluate, seeds, report
    assert (proj / "models/backbone/demo/ds2/backbone.safetensors").exists()
    for curve in ("roc_image", "pr_image", "roc_pixel", "pr_pixel", "pro"):
        assert json.loads((proj / f"plots/{curve}/patchcore/demo/weave.json").read_text())
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == n_stages                   # one run per stage execution
    children = runs[runs["tags.mlflow.parentRunId"].notna()]    # + one per category of dataset-wide stages
    assert sorted(children["tags.stage"]) == ["evaluate"] * 4 + ["fit"] * 4 + ["synthesize"] * 2
    fit_runs = children[children["tags.stage"] == "fit"]
    assert set(zip(fit_runs["tags.method"], fit_runs["tags.category"])) == {
        (m, c) for m in ("patchcore", "padim") for c in ("weave", "board")}
    assert "params.method.coreset_ratio" in runs.columns
    ev = children[children["tags.stage"] == "evaluate"]
    assert ev["metrics.image_auroc"].notna().all()
    assert set(ev["tags.mlflow.parentRunId"]) <= set(parents["run_id"])
    parent_exp = dict(zip(parents["run_id"], parents["experiment_id"]))
    assert all(parent_exp[p] == e for p, e in zip(children["tags.mlflow.parentRunId"], children["experiment_id"]))
    assert set(children["experiment_id"]) == {mlflow.get_experiment_by_name("demo").experiment_id}
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions("name='patchcore-demo-weave'")
    assert len(versions) == 1 and versions[0].tags.get("content.sha256")
    # the DS2 backbone's training curve: one point per step, logged in batches by the stage's run
    (backbone_run,) = parents[parents["tags.stage"] == "backbone"]["run_id"]
    history = MlflowClient().get_metric_history(backbone_run, "loss/ds2")
    assert len(history) > 1 and [m.step for m in history] == sorted(m.step for m in history)


def test_second_repro_runs_nothing(project):
    proj, env, _ = project
    out = sh(["dvc", "repro"], proj, env)
    assert "Running stage" not in out
    assert "didn't change" in out or "skipping" in out.lower()


def _dirty_stages(proj, env):
    status = json.loads(sh(["dvc", "status", "--json"], proj, env).strip().splitlines()[-1])
    return {name.split(":")[-1] for name in status}


def test_param_changes_dirty_only_what_they_feed(project):
    proj, env, _ = project
    original = (proj / "params.yaml").read_text()
    try:
        params = yaml.safe_load(original)
        params["methods"]["padim"]["smoke"]["n_features"] = 50
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        dirty = _dirty_stages(proj, env)
        assert "config" in dirty and "fit@padim-demo" in dirty
        # seeds@demo reads every method's params (with `seeds: [0]` it only writes seeds.json)
        assert all("padim" in s for s in dirty - {"config", "seeds@demo"}), dirty
        assert not any("patchcore" in s for s in dirty)
        # a fit-only setting: once `config` has rewritten the phase files (identical for pretrain),
        # pretraining is still up to date; only fit (and what follows) reruns
        sh(["dvc", "repro", "--single-item", "config"], proj, env)
        dirty = _dirty_stages(proj, env)
        assert "fit@padim-demo" in dirty and not any(s.startswith("pretrain@") for s in dirty), dirty
        # a setting pretraining reads (the backbone weights) dirties it
        params["methods"]["padim"]["smoke"]["weights"] = "ds2"
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        sh(["dvc", "repro", "--single-item", "config"], proj, env)
        assert "pretrain@padim-demo" in _dirty_stages(proj, env)
        assert not any("patchcore" in s for s in _dirty_stages(proj, env))

        params = yaml.safe_load(original)
        params["datasets"]["demo"]["generator"]["n_train"] = 10
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert "prepare@demo" in _dirty_stages(proj, env)
    finally:
        (proj / "params.yaml").write_text(original)
        sh(["dvc", "repro", "--single-item", "config"], proj, env)     # back to the original phase files
    assert _dirty_stages(proj, env) == set()


def test_killed_stage_leaves_previous_output_and_next_repro_finishes_it(project):
    import os
    import signal
    import subprocess
    import time

    proj, env, _ = project
    model = proj / "models/padim/demo/weave/model.safetensors"
    before = model.read_bytes()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["padim"]["smoke"]["n_features"] = 40           # dirty padim's stages
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen(["dvc", "repro", "--single-item", "fit@padim-demo"], cwd=proj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:                                          # wait until the stage is running
        if "Running stage" in line:
            break
    time.sleep(4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert model.read_bytes() == before                               # the previous model is intact
    sh(["dvc", "repro"], proj, env)                                   # the next run finishes the job
    assert model.read_bytes() != before
    assert _dirty_stages(proj, env) == set()


def test_new_images_in_one_category_rerun_only_that_category(project):
    """What a retrain does to the data (images added to one category's train/good, manifests
    rewritten, `dvc commit`): the shared backbone and the pretraining stay up to date, `fit`
    refits (PatchCore: extends) that category and copies the other's model byte for byte,
    registering nothing new for it, and `evaluate` keeps the other's metrics and overlays."""
    import shutil

    from defectlab import pipeline
    from defectlab.config import Params
    from defectlab.data.demo import generate_demo
    from mlflow import MlflowClient

    proj, env, _ = project

    def files(rel):
        root = proj / rel
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def versions(name):
        client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
        return sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))

    before = {rel: files(rel) for rel in ("models/patchcore/demo/board", "models/padim/demo/board",
                                          "models/backbone/demo", "checkpoints", "reports/maps/patchcore/demo/board")}
    board_metrics = (proj / "metrics/patchcore/demo/board.json").read_bytes()   # timings differ if rescored
    board_versions = versions("patchcore-demo-board")
    weave_before = json.loads((proj / "models/patchcore/demo/weave/model.json").read_text())["data"]
    extra = proj.parent / "extra_images"
    generate_demo(extra, seed=5, image_size=64, n_train=2, n_test_good=0, n_test_per_defect=0, categories=["weave"])
    good = proj / "data/prepared/demo/weave/train/good"
    for p in sorted((extra / "weave/train/good").glob("*.png")):
        shutil.copy(p, good / f"incoming_{p.name}")
    params = Params.load(proj / "params.yaml")
    pipeline.update_manifests(params, "demo", "weave", pipeline.Layout(proj))
    sh(["dvc", "commit", "--force", "prepare@demo"], proj, env)

    dirty = _dirty_stages(proj, env)
    assert {"fit@patchcore-demo", "fit@padim-demo"} <= dirty, dirty
    assert not any(s.startswith(("backbone@", "pretrain@", "prepare@")) for s in dirty), dirty
    out = sh(["dvc", "repro"], proj, env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert not any(s.startswith(("backbone@", "pretrain@")) for s in ran), ran
    assert {rel: files(rel) for rel in before} == before        # board's models, backbone, checkpoints as they were
    new_m, old_m = json.loads((proj / "metrics/patchcore/demo/board.json").read_text()), json.loads(board_metrics)
    assert new_m == old_m, {k: (old_m.get(k), new_m.get(k)) for k in new_m if new_m.get(k) != old_m.get(k)}
    assert versions("patchcore-demo-board") == board_versions
    weave_info = json.loads((proj / "models/patchcore/demo/weave/model.json").read_text())
    weave = weave_info["data"]
    assert weave["n_train"] == len(pipeline.category_data(params, "demo", "weave", pipeline.Layout(proj)).train)
    assert weave["n_train"] > weave_before["n_train"] and weave["fit_inputs_sha256"] != weave_before["fit_inputs_sha256"]
    # PatchCore's bank was extended with the new images only; PaDiM (no exact update) refitted
    fit_stats = weave_info["meta"]["fit"]
    assert fit_stats["incremental"] == 1 and fit_stats["n_new_images"] == weave["n_train"] - weave_before["n_train"]
    assert fit_stats["extended_from"] == weave_before["fit_inputs_sha256"]
    padim = json.loads((proj / "models/padim/demo/weave/model.json").read_text())
    assert "incremental" not in padim["meta"]["fit"] and padim["data"]["n_train"] == weave["n_train"]
    assert _dirty_stages(proj, env) == set()
