"""Shared plumbing of the DVC stage scripts: argument parsing, params, MLflow run, clean errors."""

from __future__ import annotations

import sys
import time
from typing import Callable

from defectlab.config import Params
from defectlab.errors import DefectlabError


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
        with tracking.stage_run(stage, dataset=dataset, method=method, category=category, profile=params.profile,
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
