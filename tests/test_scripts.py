"""Every script under scripts/ runs as committed: --help, and a run on tiny generated data (a few
64 px images, one or two training steps) whose output files are checked. Each runs in a
subprocess on this checkout's sources; the tiny runs are marked slow (each is a fresh
interpreter importing torch and running a method end to end: 15-50 s on 2 busy cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TINY_DEMO = ["--n-train", "3", "--n-test-good", "2", "--n-test-per-defect", "1"]


def run(script: str, *args: str, cwd: Path | None = None, check: bool = True,
        timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DEFECTLAB_TRACKING="off",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = ["bash", str(SCRIPTS / script)] if script.endswith(".sh") else [sys.executable, str(SCRIPTS / script)]
    proc = subprocess.run([*cmd, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def tiny_demo(root: Path, categories: list[str], seed: int = 0) -> Path:
    from defectlab.data.demo import generate_demo

    generate_demo(root, seed=seed, image_size=64, n_train=3, n_test_good=2, n_test_per_defect=1,
                  categories=categories)
    return root


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_every_python_script_answers_help_without_running(script, tmp_path):
    proc = run(script, "--help", cwd=tmp_path)
    assert "usage" in proc.stdout.lower()
    assert not list(tmp_path.iterdir())                                   # --help wrote nothing


@pytest.mark.slow
def test_dsr_eval_runs_stages_1_to_3_from_params_yaml(tmp_path):
    tiny = ["n_procedural_textures=4", "hidden=16", "residual_hidden=8", "residual_layers=1", "embedding_dim=8",
            "codebook_size=32", "stage1_iters=2", "stage1_batch=2", "restriction_width=8", "decoder_width=8",
            "detection_width=4", "stage2_iters=2", "stage2_batch=2", "stage2_lr_drop_at=1", "upsampling_width=4",
            "stage3_iters=2", "stage3_batch=2"]
    out = tmp_path / "out"
    run("dsr_eval.py", "--out", str(out), "--size", "64", "--categories", "grain", "--device", "cpu", *TINY_DEMO,
        "--set", *tiny)
    res = json.loads((out / "results-smoke.json").read_text())
    assert res["config"]["stage2_iters"] == 2 and res["config"]["codebook_size"] == 32
    assert 0 <= res["categories"]["grain"]["image_auroc"] <= 1
    assert len(list(out.glob("pretrain-*/vq.safetensors"))) == 1
    bad = run("dsr_eval.py", "--out", str(out), "--set", "stage2_iters", check=False)
    assert bad.returncode != 0 and "KEY=VALUE" in bad.stderr


@pytest.mark.slow
def test_msp_compare_scores_the_data_folder_it_is_given(tmp_path):
    data = tiny_demo(tmp_path / "data", ["weave"], seed=3)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = tmp_path / "r.json"
    run("msp_compare.py", "--data", str(data), "--categories", "weave", "--image-size", "64", "--single", "[32]",
        "--set", "epochs=1", "--set", "patches_per_image=2", "--set", "n_clusters=2", "--set", "kmeans_samples=16",
        "--out", str(out))
    res = json.loads(out.read_text())
    assert res["data"] == str(data) and set(res["categories"]["weave"]) == {"multi", "single"}
    assert res["scales"] == {"multi": [64, 32, 16], "single": [32]}
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before    # read, not regenerated
    missing = run("msp_compare.py", "--data", str(tmp_path / "nothing"), "--categories", "weave", check=False)
    assert missing.returncode != 0 and "nothing" in missing.stderr


@pytest.mark.slow
def test_apc_compare_runs_both_methods_on_a_tiny_demo(tmp_path):
    out = tmp_path / "out"
    run("apc_compare.py", "--root", str(tmp_path / "demo"), "--out", str(out), "--categories", "grain",
        "--image-size", "64", "--n-train", "3", "--n-test-good", "2", "--n-test-per-defect", "3", "--device", "cpu",
        "--set", "epochs=1", "--set", "n_labelled=2", "--set", "embed_dim=32")
    from defectlab.data import scan_category

    res = json.loads((out / "apc_compare.json").read_text())
    row = res["rows"][0]
    n_test = len(scan_category(tmp_path / "demo", "grain").test)
    assert row["n_labelled"] == 2 and row["n_eval"] == n_test - 2           # labelled anomalies left out
    assert set(row) >= {"apc", "patchcore"} and (out / "apc_compare.md").exists()


@pytest.mark.slow
def test_ds2_compare_runs_every_variant_on_a_tiny_demo(tmp_path):
    out = tmp_path / "out"
    run("ds2_compare.py", "--out", str(out), "--categories", "grain", "--image-size", "64", *TINY_DEMO,
        "--device", "cpu", "--set", "max_steps=1", "--set", "batch_size=2", "--set", "crop_size=64",
        "--set", "proj_hidden=32", "--set", "proj_dim=16", "--set", "patch_stride=16")
    res = json.loads((out / "results.json").read_text())
    assert set(res["variants"]) == {"ds2", "pixpro", "random"}
    assert res["variants"]["ds2"]["pretrain"]["steps"] == 1
    assert (out / "pretrain" / "ds2" / "backbone.safetensors").exists()


@pytest.mark.slow
def test_slsg_eval_runs_on_a_tiny_demo(tmp_path):
    out = tmp_path / "out"
    run("slsg_eval.py", "--out", str(out), "--categories", "board", "--image-size", "64", *TINY_DEMO,
        "--synth-n", "4", "--set", "gpt_max_iters=1", "--set", "gpt_batch=2", "--set", "seg_iters=1",
        "--set", "n_normal=1", "--set", "n_anomalous=1", "--set", "decoder_channels=[16,16,16,16]",
        "--set", "head_channels=8", "--set", "disc_width=8", "--set", "sg_skip_channels=8")
    res = json.loads((out / "results.json").read_text())
    row = res["categories"]["board"]
    assert {"image_auroc", "spro", "structural", "logical"} <= set(row)


@pytest.mark.slow
def test_bench_search_times_every_index_against_exact_search(tmp_path):
    root = tiny_demo(tmp_path / "demo", ["weave"])
    out = tmp_path / "s.json"
    run("bench_search.py", "--root", str(root), "--category", "weave", "--image-size", "128", "--images", "2",
        "--repeat", "1", "--ivf", "4:2", "--hnsw", "8:16", "--gemm", "4:2,4:4,64:2", "--nearest", "4:4,4:1", "--out", str(out))
    res = json.loads(out.read_text())
    rows = {r["search"]: r for r in res["rows"]}
    assert res["bank_rows"] == round(0.1 * 3 * 32 * 32) and res["queries_per_image"] == 32 * 32
    assert rows["exact (chunked GEMM + minimum)"]["recall_at_1"] == 1.0
    assert rows["backbone forward (floor)"]["ratio_to_floor"] == 1.0
    assert not any("IVF64" in name for name in rows)                        # 64 lists > 307 rows / 39: skipped
    # probing all 4 lists is exact search; 2 of 4 finds most neighbours
    assert rows["gemm-IVF4, 4 probes"]["recall_at_1"] == 1.0
    assert 0.5 < rows["gemm-IVF4, 2 probes"]["recall_at_1"] <= 1.0
    assert 0.5 < rows["faiss IVF4,Flat, probes 2"]["recall_at_1"] <= 1.0
    assert rows["gemm-IVF4, 4 probes, distances only (`predict`)"]["recall_at_1"] == 1.0
    assert rows["gemm-IVF4, 4 probes, distances only (`predict`)"]["distance_overstated"] == pytest.approx(0, abs=1e-5)
    one = rows["gemm-IVF4, 1 probes, distances only (`predict`)"]
    assert 0.3 < one["recall_at_1"] < 1.0 and one["distance_overstated"] > 0


def test_bench_export_times_and_checks_parity_on_a_tiny_demo(tmp_path):
    out = tmp_path / "b.json"
    run("bench_export.py", "--out", str(out), "--image-size", "64", "--n", "4", "--repeats", "1", "--batch", "4")
    res = json.loads(out.read_text())
    for name, r in res["methods"].items():
        assert r["parity"]["score_rel_diff"] < 1e-3, name
        assert r["images_per_s"]["onnxruntime"] > 0 and r["images_per_s"]["torch"] > 0


@pytest.mark.slow
def test_compare_anomalib_runs_our_side_and_names_a_missing_anomalib(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import anomalib"], capture_output=True)
    if probe.returncode != 0:
        missing = run("compare_anomalib.py", "--demo", "--out", str(tmp_path / "x.json"), check=False)
        assert missing.returncode == 2 and "cannot import anomalib" in missing.stderr
        assert "--tools defectlab" in missing.stderr and not (tmp_path / "x.json").exists()
    out = tmp_path / "ours.json"
    run("compare_anomalib.py", "--demo", "--image-size", "64", "--demo-train", "4", "--tools", "defectlab",
        "--out", str(out))
    res = json.loads(out.read_text())
    assert {(r["tool"], r["method"]) for r in res["runs"]} == {("defectlab", "patchcore"), ("defectlab", "padim")}
    assert all("error" not in r and 0 <= r["image_auroc"] <= 1 for r in res["runs"])
    assert out.with_suffix(".md").exists()


def test_prune_dvc_lock_drops_only_entries_of_missing_stages(tmp_path):
    import yaml

    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  keep:\n    cmd: echo keep\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  keep:\n    cmd: echo keep\n"
                                       "  gone:\n    cmd: echo gone\n")
    proc = run("prune_dvc_lock.py", "--root", str(tmp_path))
    assert "removed 1 stale dvc.lock entries: gone" in proc.stdout
    assert list(yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]) == ["keep"]
    missing = run("prune_dvc_lock.py", "--root", str(tmp_path / "nothing"), check=False)
    assert missing.returncode == 2 and "dvc.lock" in missing.stderr


@pytest.mark.slow
def test_rss_1000_quick_path(tmp_path):
    """The peak-RSS script with 4 images at 64 px instead of 1000 at 256 (~40 s: WideResNet-50)."""
    proc = run("rss_1000.sh", str(tmp_path / "work"), "4", "64")
    assert "Maximum resident set size" in proc.stdout
    assert json.loads((tmp_path / "work" / "out" / "metrics.json").read_text())


def test_bench_retrain_builds_its_project_copy_with_the_overrides(tmp_path):
    """bench_retrain.py's full run is two `dvc repro`s of a project copy plus a Prefect flow
    (minutes); here: the copy it runs them in, with the profile, methods and --set overrides."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("bench_retrain", SCRIPTS / "bench_retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    params = mod.make_copy(tmp_path, "smoke", ["patchcore"], ["run.categories=[weave]", "datasets.demo.image_size=64"])
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert written == params
    assert params["run"]["methods"] == ["patchcore"] and params["run"]["train_methods"] == []
    assert params["run"]["categories"] == ["weave"] and params["datasets"]["demo"]["image_size"] == 64
    assert params["flows"]["retrain"]["margin"] == 1.0
    assert "train" not in yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]   # no empty matrix
    assert (tmp_path / "src" / "defectlab" / "pipeline.py").exists()


@pytest.mark.slow
def test_dsr_codebooks_reports_usage_with_and_without_restarts(tmp_path):
    proc = run("dsr_codebooks.py", "--root", str(tmp_path / "demo"), "--image-size", "64", "--n-train", "3",
               "--set", "n_procedural_textures=2", "--set", "hidden=16", "--set", "residual_hidden=8",
               "--set", "residual_layers=1", "--set", "embedding_dim=8", "--set", "codebook_size=16",
               "--set", "stage1_iters=3", "--set", "stage1_batch=2", "--set", "dead_code_threshold=0.01",
               cwd=ROOT)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "stage 1" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| restarts (0.01)", "| no restarts (Eq. 2 only)"]
    values = [float(v) for r in rows for v in r.strip(" |").split(" | ")[1:]]
    assert values and all(v >= 0 for v in values)
