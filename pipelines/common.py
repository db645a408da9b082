"""Helpers shared by the flows: the ``flows:`` params section, running DVC as a subprocess, the
pipeline's stage graph (read from dvc.yaml through DVC's own API) and the MLflow setup."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from defectlab.config import StrictModel, validate
from defectlab.errors import DefectlabError


class ReproduceParams(StrictModel):
    retries: int = Field(2, ge=0, description="retries per stage (transient failures, e.g. a download)")
    retry_delay_s: float = Field(10.0, ge=0, description="first retry delay; doubles on each retry")
    dask_address: str | None = Field(None, description="tcp://scheduler:8786 -> run stages on that Dask cluster")
    pull: bool = Field(False, description="dvc repro --pull: fetch missing cache from the DVC remote")
    push: bool = Field(False, description="dvc push each stage's outputs after it ran (workers sharing a remote)")


class RetrainParams(StrictModel):
    method: str = "patchcore"
    metric: str = Field("image_auroc", description="metrics/<m>/<ds>/<cat>.json key compared champion vs challenger")
    margin: float = Field(0.01, ge=0, description="challenger may be worse by at most this much")
    cron: str | None = Field("0 3 * * *", description="schedule for `defectlab retrain --serve`")
    incoming_dir: str = Field("data/incoming", description="new normal images: <dir>/<dataset>/<category>/*")
    accepted_dir: str = Field("data/accepted", description="archive of accepted images (same layout)")
    quarantine_dir: str = Field("data/quarantine", description="rejected files + quarantine.csv with reasons")
    review_dir: str = Field("data/review", description="batches of a refused challenger: <dir>/<ds>/<cat>/<batch>/")
    on_refuse: Literal["review", "keep"] = Field(
        "review", description="review: undo the batch (workspace back to the champion's data) and move it to "
                              "review_dir; keep: the batch stays in the training set")
    retrain_backbone: bool = Field(
        False, description="true: the batch also joins the dataset-level training set (pretrain_manifest.csv), so "
                           "the shared backbone and the methods' pretraining retrain; false: only the category's "
                           "trainings and the method's fit rerun")
    min_size: int = Field(32, ge=1, description="smallest accepted image side in pixels")
    lock_timeout_s: float = Field(3600, gt=0, description="wait this long for another retrain of the dataset")


class FlowsParams(StrictModel):
    retrain: RetrainParams = RetrainParams()
    reproduce: ReproduceParams = ReproduceParams()


def flows_params(root: Path) -> FlowsParams:
    from defectlab.io import load_yaml

    raw = load_yaml((Path(root) / "params.yaml").read_text()) or {}
    return validate(FlowsParams, raw.get("flows") or {}, "flows")


class StageFailed(DefectlabError, RuntimeError):
    """A DVC command failed; the message carries the tail of its output."""


def subprocess_env() -> dict:
    """The environment DVC and the stage scripts run in: this interpreter's bin/ first on PATH
    (stage commands call ``python``)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if not env.get("PATH", "").startswith(bindir):
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_dvc(args: list[str], root: Path, timeout: float | None = None) -> str:
    """``dvc --wait-for-lock <args>`` in ``root``; returns stdout+stderr, raises StageFailed."""
    cmd = ["dvc", "--wait-for-lock", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise StageFailed(f"`{' '.join(cmd)}` failed (exit {r.returncode}, {time.perf_counter() - t0:.0f}s):\n"
                          f"{out[-4000:]}")
    return out


def stage_graph(root: Path) -> list[tuple[str, list[str]]]:
    """[(stage address, [addresses it depends on])] in an order where every stage comes after
    its dependencies. Read from dvc.yaml by DVC itself (foreach/matrix expanded)."""
    import networkx as nx
    from dvc.repo import Repo

    with in_dir(Path(root)), Repo(str(root)) as repo:  # addresses are relative to the cwd
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        return [(s.addressing, sorted(d.addressing for d in graph.successors(s))) for s in order]


@contextlib.contextmanager
def in_dir(path: Path) -> Iterator[None]:
    """chdir for the library code that resolves paths (and the local MLflow store) from the cwd."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def setup_tracking(root: Path) -> str:
    """Point MLflow at the project's store (params ``tracking`` / MLFLOW_TRACKING_URI); flows need it on."""
    from defectlab import tracking
    from defectlab.config import Params

    params = Params.load(Path(root) / "params.yaml")
    with in_dir(root):
        uri = tracking.setup(params.tracking)
    if uri is None:
        raise DefectlabError("DEFECTLAB_TRACKING is off: the retrain and inspect flows need the MLflow registry")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        import mlflow

        uri = f"sqlite:///{(Path(root) / uri[len('sqlite:///'):]).resolve()}"
        mlflow.set_tracking_uri(uri)
    return uri
