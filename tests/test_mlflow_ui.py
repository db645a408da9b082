"""The MLflow UI, in a real headless browser, shows the runs of a smoke pipeline run.

The tiny project of tests/conftest.py (demo weave + board, patchcore + padim, 64 px) ran `dvc repro`;
`mlflow server` serves its store on a loopback port; headless Chromium (Debian's
``chromium-headless-shell`` or ``chromium``) renders the experiment's run list and one evaluate
run. The test checks the rendered DOM (after the page's JavaScript ran) for the experiment, the
run names and a metric, and saves a screenshot to reports/mlflow_ui.png. Without a browser the
test skips with the reason.
"""

from __future__ import annotations

import os
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


def render(exe: str, url: str, *, screenshot: Path | None = None) -> str:
    """The DOM after the page's scripts ran (``--virtual-time-budget`` lets the SPA fetch and render)."""
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--window-size=1400,1000", "--virtual-time-budget=30000"]
    if screenshot is not None:
        r = subprocess.run(args + [f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=180)
        assert screenshot.exists(), r.stderr[-2000:]
    r = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def store(repro_project):
    """The MLflow store of the tiny project's full `dvc repro` (tests/conftest.py)."""
    if browser() is None:
        pytest.skip(f"no headless browser on this machine (looked for {', '.join(BROWSERS)}; "
                    f"`apt-get install chromium-headless-shell` provides one)")
    proj, env, _ = repro_project
    return proj, env


@pytest.fixture(scope="module")
def server(store):
    proj, env = store
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
        yield url, proj
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # the server and its worker processes (own session)
        proc.wait(timeout=30)


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
