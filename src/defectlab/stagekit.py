"""Shared plumbing of the DVC stage scripts: argument parsing, params, MLflow run, clean errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from defectlab.config import Params
from defectlab.errors import DefectlabError


def stage_args(doc: str, *names: str):
    """Parse the stage's ``--<name>`` options (all required), e.g. ``stage_args(__doc__, "method", "dataset")``,
    then put back the stage's outputs that DVC deleted before running it (``restore_recorded_outputs``).
    Stage scripts call it before their heavy imports: the outputs are back within about a second."""
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    for name in names:
        ap.add_argument(f"--{name}", required=True)
    args = ap.parse_args()
    stage = Path(sys.argv[0]).stem           # stages/<stage>.py
    dvc_stage = dvc_stage_name(stage, dataset=getattr(args, "dataset", "all"), method=getattr(args, "method", None),
                               category=getattr(args, "category", None))
    for path in restore_recorded_outputs(dvc_stage):
        print(f"restored {path} as dvc.lock records it (replaced only when this run succeeds)",
              file=sys.stderr, flush=True)
    return args


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


HELD_ENV = "DEFECTLAB_DATASET_LOCKS_HELD"   # datasets whose lock a parent process (a flow) holds


def dataset_lock_path(dataset: str, root: str | Path = ".") -> Path:
    return Path(root) / ".dvc" / "tmp" / "defectlab-locks" / f"dataset-{dataset}.lock"


@contextlib.contextmanager
def dataset_lock(datasets, root: str | Path = ".", timeout: float = -1, wait_message: bool = True):
    """Hold the lock of each dataset for the whole block: the one lock the retrain flow, the
    reproduce flow and every stage of plain ``dvc repro`` share. Processes started inside the block
    (``dvc`` and its stages) inherit ``DEFECTLAB_DATASET_LOCKS_HELD`` and do not take it again.
    ``timeout``: seconds to wait (-1: forever); ``filelock.Timeout`` when it runs out."""
    import os

    from filelock import FileLock, Timeout

    held = set(filter(None, os.environ.get(HELD_ENV, "").split(",")))
    locks = []
    try:
        for ds in sorted(set(datasets) - held):
            path = dataset_lock_path(ds, root)
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                if wait_message:
                    print(f"waiting for {path}: another retrain or reproduce of dataset {ds!r} is running",
                          file=sys.stderr, flush=True)
                lock.acquire(timeout=timeout)
            locks.append(lock)
        before = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = ",".join(sorted(held | set(datasets)))
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = before
    finally:
        for lock in reversed(locks):
            lock.release()


@contextlib.contextmanager
def stage_dataset_guard(dataset: str):
    """A stage of plain ``dvc repro`` holds its dataset's lock while it runs, and refuses to start
    (one line, exit 2) while a retrain or reproduce flow of that dataset holds it: a retrain's
    data and registry writes never interleave with a stage reading them."""
    from filelock import Timeout

    if dataset in ("all", ""):
        yield
        return
    try:
        with dataset_lock([dataset], timeout=0, wait_message=False):
            yield
    except Timeout:
        raise DefectlabError(f"dataset {dataset!r} is locked by a running retrain or reproduce flow "
                             f"({dataset_lock_path(dataset)}); run `dvc repro` again when it has finished") from None


def restore_recorded_outputs(dvc_stage: str, root: str | Path = ".") -> list[Path]:
    """Put back, from the DVC cache, the version ``dvc.lock`` records of each output of ``dvc_stage``
    that is missing from the workspace; returns the paths restored.

    Stage outputs are not ``persist``-ed, so DVC's run-cache restores them when an experiment comes
    back to inputs it has run before (``dvc exp run -S profile=...`` round trips), and DVC deletes
    them before it runs the stage. The stage restores them first thing, then replaces them
    atomically only when it succeeds: an interrupted run leaves the previous outputs in place, and
    the stage can keep what did not change (fit / evaluate reuse, prepare's recorded split).
    Outputs with ``cache: false`` are not in the cache (git holds them); an output whose objects are
    not in the cache (a fresh clone) is left to the stage to rebuild."""
    from defectlab.io import load_yaml

    root = Path(root)
    try:
        lock = load_yaml((root / "dvc.lock").read_text()) or {}
    except OSError:
        return []
    outs = [o for o in ((lock.get("stages") or {}).get(dvc_stage) or {}).get("outs", [])
            if o.get("md5") and not (root / o["path"]).exists()]
    if not outs:
        return []
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        obj = repo.cache.local.oid_to_path
        restored = []
        for out in outs:
            path, md5 = root / out["path"], out["md5"]
            try:
                entries = ([(e["relpath"], e["md5"]) for e in json.loads(Path(obj(md5)).read_text())]
                           if md5.endswith(".dir") else [(None, md5)])
            except OSError:
                continue
            if not all(Path(obj(h)).exists() for _, h in entries):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.restore.tmp")
            try:
                for rel, h in entries:   # copies: a hard link would let an in-place write change the cache
                    dst = tmp / rel if rel is not None else tmp
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(obj(h), dst)
                if path.exists():    # put back meanwhile by another process: keep that one
                    continue
                os.replace(tmp, path)
                restored.append(path)
            finally:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                elif tmp.exists():
                    tmp.unlink()
    return restored


def dvc_stage_name(stage: str, *, dataset: str, method: str | None = None, category: str | None = None) -> str:
    """The stage's name in dvc.yaml / dvc.lock: ``fit@patchcore-demo``; ``report`` (no matrix)."""
    if dataset in ("all", ""):
        return stage
    return stage + "@" + "-".join(x for x in (method, dataset, category) if x)


def prepared_dir(dataset: str, category: str) -> Path:
    from defectlab.pipeline import Layout

    return Layout().prepared(dataset) / category


def check_resources(params: Params, stage: str, *, dataset: str, method: str | None = None,
                    category: str | None = None) -> list[str]:
    """Before any work: every external resource of the whole run (``defectlab.resources``), so
    whichever stage DVC runs first stops with ONE error listing all that are missing. Returns the
    substitutions recorded for this stage's runs (MLflow tag ``substituted``): those concerning
    ``method`` (or this stage) and, for methods reading the synthesis cache, the categories' own
    records (the foreground heuristic falling back to the whole image)."""
    from defectlab import pipeline, resources

    configs = {m: params.profiled("methods", m) for m in params.run.methods}   # raw: no torch import here
    found = resources.check(params, configs)
    records = found.records(method=method, stage=stage) if (method or stage == "synthesize") else []
    if method in resources.READS_SYNTHESIS:     # the caches the synthesize stage wrote before this stage
        layout = pipeline.Layout()
        for ds in (params.run.datasets if dataset in ("all", "") else [dataset]):
            for cat in ([category] if category else params.run.categories):
                records = resources.merge(records, resources.synthesis_records(layout.synth(ds, cat)))
    return records


def run_stage(stage: str, body: Callable[[Params, "object"], dict | None], *, dataset: str,
              method: str | None = None, category: str | None = None, params_file: str = "params.yaml",
              log_params: dict | None = None) -> None:
    """Load params, check the run's external resources (``check_resources``: one error listing every
    missing one, before any work), open one MLflow run for this stage execution (tagged
    ``substituted`` when a substitute stands in), run ``body(params, run)`` (under
    ``resources.strict`` in the paper profile without ``allow_substitutes``).

    A DefectlabError is printed as one line on stderr and exits with status 2 (no traceback):
    outputs are only ever renamed into place on success, so nothing partial is left behind.
    """
    from defectlab import resources, tracking

    try:
        params = Params.load(params_file)
        substituted = check_resources(params, stage, dataset=dataset, method=method, category=category)
        dvc_stage = dvc_stage_name(stage, dataset=dataset, method=method, category=category)
        with stage_dataset_guard(dataset), stage_lock(dvc_stage), tracking.stage_run(stage, dataset=dataset, method=method, category=category, profile=params.profile,
                                seed=params.seed, params={"profile": params.profile, "seed": params.seed,
                                                          "device": params.device, **(log_params or {})},
                                config=params.tracking, dvc_stage=dvc_stage, data_dir=prepared_dir,
                                substituted=substituted) as run, resources.strict(resources.is_strict(params)):
            t0 = time.perf_counter()
            result = body(params, run) or {}
            run.log_metrics({"stage_seconds": time.perf_counter() - t0})
            run.log_metrics(result)
    except DefectlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
