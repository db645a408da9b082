"""Shared plumbing of the DVC stage scripts: argument parsing, params, MLflow run, clean errors."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

from defectlab.config import Params
from defectlab.errors import DefectlabError


def stage_args(doc: str, *names: str):
    """Parse the stage's ``--<name>`` options (all required), e.g. ``stage_args(__doc__, "method", "dataset")``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    for name in names:
        ap.add_argument(f"--{name}", required=True)
    return ap.parse_args()


@contextlib.contextmanager
def stage_lock(name: str, lock_dir: str | Path = ".dvc/tmp/defectlab-locks"):
    """One process at a time per stage (e.g. a scheduled retrain and a manual `dvc repro`): the
    second one says what it waits for, then waits; outputs are atomic either way."""
    from filelock import FileLock, Timeout

    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{name.replace('/', '_')}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for {lock.lock_file}: another process is running stage {name}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def run_stage(stage: str, body: Callable[[Params, "object"], dict | None], *, dataset: str,
              method: str | None = None, category: str | None = None, params_file: str = "params.yaml",
              log_params: dict | None = None) -> None:
    """Load params, open one MLflow run for this stage execution, run ``body(params, run)``.

    A DefectlabError is printed as one line on stderr and exits with status 2 (no traceback):
    outputs are only ever renamed into place on success, so nothing partial is left behind.
    """
    from defectlab import tracking

    try:
        params = Params.load(params_file)
        dvc_stage = stage + "@" + "-".join(x for x in (method, dataset, category) if x)
        with stage_lock(dvc_stage), tracking.stage_run(stage, dataset=dataset, method=method, category=category, profile=params.profile,
                                seed=params.seed, params={"profile": params.profile, "seed": params.seed,
                                                          "device": params.device, **(log_params or {})},
                                config=params.tracking, dvc_stage=dvc_stage) as run:
            t0 = time.perf_counter()
            result = body(params, run) or {}
            run.log_metrics({"stage_seconds": time.perf_counter() - t0})
            run.log_metrics(result)
    except DefectlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
