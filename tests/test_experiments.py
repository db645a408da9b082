"""Comparing runs with DVC: an experiment round trip restores outputs instead of retraining; an
interrupted stage leaves its previous outputs; metrics and the overlaid charts diff between commits.

A tiny project of its own (patchcore on weave + board, the DS2 backbone stage as the training that
must not run twice), tracking off: these tests are about DVC's view of the outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import git_dvc_init, make_project, project_env, sh

pytestmark = pytest.mark.slow
CATS = ["weave", "board"]
ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def tree(path) -> dict:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def lock_outs(proj) -> dict:
    stages = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    return {name: [o.get("md5") for o in s.get("outs", [])] for name, s in stages.items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("expproj"), categories=CATS, methods=["patchcore"])
    env = dict(project_env(proj), DEFECTLAB_TRACKING="off")
    git_dvc_init(proj, env)
    sh(["dvc", "repro"], proj, env)
    sh(["git", "add", "-A"], proj, env)
    sh(["git", "commit", "-qm", "first run"], proj, env)
    return proj, env


def test_the_report_writes_a_summary_and_one_overlaid_chart_per_category_and_curve(project):
    proj, env = project
    summary = json.loads((proj / "metrics/summary.json").read_text())
    per_cat = [json.loads((proj / f"metrics/patchcore/demo/{c}.json").read_text()) for c in CATS]
    assert summary["demo"]["patchcore"]["image_auroc"] == pytest.approx(
        sum(m["image_auroc"] for m in per_cat) / 2, abs=1e-4)
    assert summary["demo"]["patchcore"]["n_categories"] == 2
    # `dvc plots show` draws the declared charts: 3 curves x 2 categories + 1 summary bar chart
    shown = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], cwd=proj, env=env, capture_output=True,
                                      text=True, check=True).stdout)["data"]
    charts = {k: v for k, v in shown.items() if k.startswith("plots/compare/")}
    assert len(charts) == 3 * len(CATS) + 1, sorted(shown)
    assert not any(k.startswith("plots/roc_pixel") for k in shown)      # the per-method files are data, not charts
    roc = json.loads((proj / "plots/compare/roc_image/demo/weave.json").read_text())
    assert {r["method"] for r in roc} == {"patchcore"} and roc == sorted(roc, key=lambda r: r["i"])
    assert roc[-1]["tpr"] == 1.0 and roc[-1]["fpr"] == 1.0


def render_dvc_plots(proj: Path, env: dict, work: Path, screenshot: Path | None = None, height: int = 1800) -> str:
    """`dvc plots show` into ``work``, rendered by headless Chromium; returns the DOM after the page's
    scripts ran. DVC's page loads vega / vega-lite / vega-embed from a CDN, which this machine cannot
    reach: the same versions come from the npm registry (`npm pack`) and are served next to the page."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None or shutil.which("npm") is None:
        pytest.skip("needs headless Chromium (`apt-get install chromium`) and npm")
    sh(["dvc", "plots", "show", "-o", str(work / "dvc_plots")], proj, env)
    page = work / "dvc_plots" / "index.html"
    html = page.read_text()
    for url, pkg, version in re.findall(r'<script src="(https://cdn\.jsdelivr\.net/npm/([\w-]+)@([\d.]+))"', html):
        r = subprocess.run(["npm", "pack", f"{pkg}@{version}", "--silent"], cwd=work, capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            pytest.skip(f"npm pack {pkg}@{version} failed (no registry?): {r.stderr[-300:]}")
        with tarfile.open(work / r.stdout.strip().splitlines()[-1]) as tar:
            member = tar.extractfile(f"package/build/{pkg}.min.js")
            (page.parent / f"{pkg}.min.js").write_bytes(member.read())
        html = html.replace(url, f"{pkg}.min.js")
    page.write_text(html)
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={work / 'chrome'}", f"--window-size=1400,{height}", "--virtual-time-budget=20000"]
    if screenshot is not None:
        subprocess.run(args + [f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=180)
    r = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_dvc_plots_show_is_a_page_of_overlaid_charts_a_browser_renders(project, tmp_path):
    proj, env = project
    dom = render_dvc_plots(proj, env, tmp_path, screenshot=ROOT / "reports" / "dvc_plots_tiny.png")
    embeds = re.findall(r'class="vega-embed[^"]*"', dom)
    assert len(embeds) == 3 * len(CATS) + 1, len(embeds)          # every chart drawn, none left unrendered
    assert dom.count("<canvas") >= len(embeds)
    assert "Error" not in re.sub(r"<script.*?</script>", "", dom, flags=re.S)


def test_metrics_diff_against_the_previous_commit_shows_what_changed(project):
    proj, env = project
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["patchcore"]["smoke"]["coreset_ratio"] = 0.01
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], proj, env)
    assert not any(s.startswith(("backbone@", "pretrain@", "prepare@")) for s in ran(out)), ran(out)
    diff = json.loads(subprocess.run(["dvc", "metrics", "diff", "HEAD", "--all", "--json"], cwd=proj, env=env,
                                     capture_output=True, text=True, check=True).stdout)["metrics/summary.json"]
    committed = json.loads(sh(["git", "show", "HEAD:metrics/summary.json"], proj, env))["demo"]["patchcore"]
    now = json.loads((proj / "metrics/summary.json").read_text())["demo"]["patchcore"]
    assert diff["demo.patchcore.image_auroc"]["old"] == committed["image_auroc"]
    assert diff["demo.patchcore.image_auroc"]["new"] == now["image_auroc"]
    assert now["aupro"] != committed["aupro"]              # a 10x smaller bank changes the maps
    plots = json.loads(subprocess.run(["dvc", "plots", "diff", "HEAD", "--json"], cwd=proj, env=env,
                                      capture_output=True, text=True, check=True).stdout)["data"]
    revs = {d.get("rev") for k, v in plots.items() if k.startswith("plots/compare/roc_image")
            for d in v[0]["content"]["data"]["values"]}
    assert revs == {"HEAD", "workspace"}, revs
    sh(["git", "checkout", "--", "params.yaml"], proj, env)
    sh(["dvc", "repro"], proj, env)     # back (from the run-cache) for the next tests


def test_an_experiment_round_trip_restores_outputs_instead_of_retraining(project):
    proj, env = project
    before = lock_outs(proj)
    models = tree(proj / "models/backbone/demo/ds2")
    other = sh(["dvc", "exp", "run", "-S", "backbone.ds2.smoke.epochs=2"], proj, env)
    assert "backbone@demo" in ran(other)                       # a different training: it runs
    assert lock_outs(proj)["backbone@demo"] != before["backbone@demo"]
    back = sh(["dvc", "exp", "run", "-S", "backbone.ds2.smoke.epochs=1"], proj, env)
    assert ran(back) == {"report"}, ran(back)                  # nothing trains, fits or evaluates again
    assert "Stage 'backbone@demo' is cached - skipping run" in back
    assert lock_outs(proj) == before
    assert tree(proj / "models/backbone/demo/ds2") == models


def test_an_interrupted_stage_leaves_its_previous_outputs(project):
    proj, env = project
    fit_lock = lambda: yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["fit@patchcore-demo"]  # noqa: E731
    models, lock = tree(proj / "models/patchcore/demo"), fit_lock()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["patchcore"]["smoke"]["coreset_ratio"] = 0.02
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run(["dvc", "repro", "fit@patchcore-demo"], cwd=proj, capture_output=True, text=True,
                       env=dict(env, DEFECTLAB_FAULT_AT="fit:write"))     # kill -9 just before the rename
    assert r.returncode != 0
    assert tree(proj / "models/patchcore/demo") == models      # DVC deleted them; the stage put them back first
    assert fit_lock() == lock                                    # still the previous run's record
    sh(["git", "checkout", "--", "params.yaml"], proj, env)
    out = sh(["dvc", "repro"], proj, env)                     # only `config` ran with the other setting
    assert ran(out) <= {"config"}, ran(out)
    status = sh(["dvc", "status"], proj, env)
    assert "Data and pipelines are up to date" in status, status


def test_restore_puts_back_what_dvc_lock_records(project, tmp_path):
    from defectlab.stagekit import restore_recorded_outputs

    proj, env = project
    models = tree(proj / "models/patchcore/demo")
    os.rename(proj / "models/patchcore/demo", tmp_path / "moved")
    restored = restore_recorded_outputs("fit@patchcore-demo", proj)
    assert [p.relative_to(proj).as_posix() for p in restored] == ["models/patchcore/demo"]
    assert tree(proj / "models/patchcore/demo") == models
    assert restore_recorded_outputs("fit@patchcore-demo", proj) == []          # present: left as it is
    assert restore_recorded_outputs("no-such-stage", proj) == []
