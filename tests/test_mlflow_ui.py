"""The MLflow UI, in a real headless browser, shows the runs of a smoke pipeline run.

The tiny project of tests/conftest.py (demo weave + board, patchcore + padim, 64 px) ran `dvc repro`;
`mlflow server` serves its store on a loopback port; headless Chromium (Debian's
``chromium-headless-shell`` or ``chromium``) renders the experiment's run list and one evaluate
run. The test checks the rendered DOM (after the page's JavaScript ran) for the experiment, the
run names and a metric, and saves a screenshot to reports/mlflow_ui.png. A second test logs two
runs of different profiles with the project's own ``tracking.stage_run`` (no pipeline run) and
checks MLflow's run comparison page shows their metric and ``profile`` param side by side
(reports/mlflow_compare.png). Without a browser the tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(exe: str, url: str, *, screenshot: Path | None = None, window: str = "1400,1000") -> str:
    """The DOM after the page's scripts ran (``--virtual-time-budget`` lets the SPA fetch and render)."""
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--window-size={window}", "--virtual-time-budget=30000"]
    if screenshot is not None:
        r = subprocess.run(args + [f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=180)
        assert screenshot.exists(), r.stderr[-2000:]
    r = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def need_browser() -> None:
    if browser() is None:
        pytest.skip(f"no headless browser on this machine (looked for {', '.join(BROWSERS)}; "
                    f"`apt-get install chromium-headless-shell` provides one)")


@contextlib.contextmanager
def mlflow_server(proj: Path, env: dict):
    """`mlflow server` on ``proj``/mlflow.db on a loopback port; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{proj / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=proj, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not answer /health in 180 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # the server and its worker processes (own session)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def store(repro_project):
    """The MLflow store of the tiny project's full `dvc repro` (tests/conftest.py)."""
    need_browser()
    proj, env, _ = repro_project
    return proj, env


@pytest.fixture(scope="module")
def server(store):
    proj, env = store
    with mlflow_server(proj, env) as url:
        yield url, proj


def test_mlflow_ui_shows_experiment_runs_and_metric(server):
    import mlflow

    url, proj = server
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("demo")
    runs = mlflow.search_runs([exp.experiment_id])
    ev = runs[(runs["tags.stage"] == "evaluate") & (runs["tags.method"] == "patchcore")
              & (runs["tags.category"] == "board")].iloc[0]
    exe = browser()
    shot = ROOT / "reports" / "mlflow_ui.png"
    shot.parent.mkdir(exist_ok=True)
    listing = render(exe, f"{url}/#/experiments/{exp.experiment_id}/runs", screenshot=shot)
    assert "demo" in listing
    # one run per stage execution; a dataset-wide stage's per-category runs are nested under it
    for name in ("prepare", "fit/patchcore", "evaluate/patchcore"):
        assert name in listing, f"run {name} not shown in the run list"
    detail = render(exe, f"{url}/#/experiments/{exp.experiment_id}/runs/{ev['run_id']}",
                    screenshot=shot.with_name("mlflow_ui_run.png"))
    assert "evaluate/patchcore/board" in detail
    assert "image_auroc" in detail and "pixel_auroc" in detail, "metrics not shown on the run page"
    assert f"{ev['metrics.image_auroc']:.4g}"[:4] in detail   # the value, not just the name
    assert shot.stat().st_size > 20_000


def texts(dom: str) -> list[str]:
    """The page's visible text pieces in document order."""
    dom = re.sub(r"<(style|script)\b.*?</\1>", "", dom, flags=re.S)
    return [t for t in (html.unescape(x).strip() for x in re.split(r"<[^>]+>", dom)) if t]


def compare_row(tokens: list[str], section: str, key: str, n: int = 2) -> list[str]:
    """The ``n`` values shown right after ``key`` in the compare page's ``section`` ("Parameters",
    "Metrics", "Tags": a heading followed by its "Show diff only" switch, then key, one value per run)."""
    start = next(i for i in range(len(tokens) - 1) if tokens[i] == section and tokens[i + 1] == "Show diff only")
    at = tokens.index(key, start)
    return tokens[at + 1:at + 1 + n]


def test_mlflow_compare_page_shows_two_profiles_side_by_side(tracked_project):
    """Two evaluate runs of the same category at profiles smoke and default, logged as the stages log
    them (parent + per-category child: the child inherits params); MLflow's compare-runs page
    (``#/compare-runs?runs=[...]&experiments=[...]``) lists profile, a config param and the metric
    with one column per run."""
    need_browser()
    import mlflow

    from defectlab import tracking

    tmp_path = tracked_project
    runs = {}
    for profile, auroc, ratio in (("smoke", 0.6125, 0.01), ("default", 0.8731, 0.1)):
        with tracking.stage_run("evaluate", dataset="demo", method="patchcore", profile=profile, seed=0,
                                params={"profile": profile, "seed": 0, "device": "cpu"}) as run:
            run.log_params({"method": {"coreset_ratio": ratio}, "image_size": 64})
            with run.child("board") as child:
                child.log_metrics({"image_auroc": auroc})
        runs[profile] = child.run_id
    exp_id = mlflow.get_run(runs["smoke"]).info.experiment_id
    ids = [runs["smoke"], runs["default"]]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with mlflow_server(tmp_path, env) as url:
        page = f"{url}/#/compare-runs?runs={json.dumps(ids, separators=(',', ':'))}&experiments={json.dumps([exp_id])}"
        shot = ROOT / "reports" / "mlflow_compare.png"
        shot.parent.mkdir(exist_ok=True)
        dom = render(browser(), page, screenshot=shot, window="1400,2000")   # tall: the tables below the plot
    tokens = texts(dom)
    assert "Comparing 2 Runs from 1 Experiment" in tokens
    assert compare_row(tokens, "Parameters", "profile") == ["smoke", "default"], "profile not side by side"
    assert compare_row(tokens, "Parameters", "method.coreset_ratio") == ["0.01", "0.1"]
    assert compare_row(tokens, "Parameters", "category") == ["board", "board"]
    assert compare_row(tokens, "Metrics", "image_auroc") == ["0.613", "0.873"], "metric not side by side"
    # the params row of a differing value is highlighted as a diff
    assert re.search(r'<tr class="diff-row"><th[^>]*>profile</th>', dom)
    assert shot.stat().st_size > 20_000
