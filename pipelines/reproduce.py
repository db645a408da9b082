"""Flow ``reproduce``: the DVC pipeline as Prefect tasks, one task per stage / matrix entry.

The flow does not re-implement any stage: it asks DVC for the expanded stage graph of dvc.yaml
(``pipelines.common.stage_graph``) and runs ``dvc repro --single-item <stage>`` for each entry,
submitting a stage only after the stages it depends on (``wait_for``). So

- the cache, dvc.lock and "skip unchanged stages" are DVC's own: a second run skips everything;
- the Prefect UI shows one task run per stage with its log, duration and state;
- a failing stage is retried with exponential backoff (``flows.reproduce.retries``); when it
  still fails, only the stages downstream of it are not run, every other branch completes and
  keeps its outputs (DVC writes them atomically), and the next run resumes: finished stages
  are up to date in dvc.lock and are skipped;
- with ``dask_address`` (or ``dask_workers`` for a LocalCluster) the independent matrix entries
  run in parallel on Dask through prefect-dask's ``DaskTaskRunner``. DVC itself serialises its
  short repository-lock sections (``--wait-for-lock``) and locks per output path while stage
  commands run, so parallel stages on one checkout are safe. Workers on other machines need the
  same checkout and a shared DVC remote: set ``flows.reproduce.pull/push`` (README "Scale-out").
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect.tasks import exponential_backoff

from pipelines.common import flows_params, run_dvc, stage_graph


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_jitter_factor=0.2)
def dvc_stage(stage: str, root: str, force: bool = False, pull: bool = False, push: bool = False) -> dict:
    """Reproduce one stage (only it: its dependencies are separate tasks that ran before)."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    args = ["repro", "--single-item", stage] + (["--force"] if force else []) + (["--pull"] if pull else [])
    out = run_dvc(args, Path(root))
    ran = "Running stage" in out
    logger.info("%s: %s in %.1fs", stage, "ran" if ran else "up to date, skipped", time.perf_counter() - t0)
    if ran:
        logger.info(out[-2000:])
    if push and ran:
        run_dvc(["push", stage], Path(root))
    return {"stage": stage, "ran": ran, "seconds": time.perf_counter() - t0}


@flow(name="reproduce", log_prints=True)
def reproduce_flow(root: str = ".", stages: list[str] | None = None, force: bool = False) -> dict:
    """Run the DVC pipeline of ``root`` stage by stage (``stages``: only these addresses and
    their upstream, e.g. ``["evaluate@patchcore-demo"]``)."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    cfg = flows_params(root_path).reproduce
    graph = stage_graph(root_path)
    if stages:
        wanted, deps = set(), dict(graph)
        todo = list(stages)
        unknown = [s for s in todo if s not in deps]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; known: {', '.join(deps)}")
        while todo:
            s = todo.pop()
            if s not in wanted:
                wanted.add(s)
                todo += deps[s]
        graph = [(s, d) for s, d in graph if s in wanted]
    logger.info("%d stages: %s", len(graph), ", ".join(s for s, _ in graph))
    run = dvc_stage.with_options(retries=cfg.retries,
                                 retry_delay_seconds=exponential_backoff(backoff_factor=cfg.retry_delay_s)
                                 if cfg.retry_delay_s > 0 else 0)
    futures = {}
    for stage, deps in graph:
        futures[stage] = run.submit(stage, str(root_path), force=force, pull=cfg.pull, push=cfg.push,
                                    wait_for=[futures[d] for d in deps if d in futures])
    wait(list(futures.values()))
    summary: dict = {"ran": [], "skipped": [], "failed": [], "not_run": []}
    for stage, fut in futures.items():
        state = fut.state
        if state.is_completed():
            summary["ran" if fut.result()["ran"] else "skipped"].append(stage)
        elif state.is_failed() or state.is_crashed():
            summary["failed"].append(stage)
        else:  # upstream failed: never started
            summary["not_run"].append(stage)
    logger.info("ran %d, skipped %d, failed %d, not run %d", *(len(summary[k]) for k in ("ran", "skipped", "failed", "not_run")))
    if summary["failed"] or summary["not_run"]:
        raise RuntimeError(f"reproduce: failed stages {summary['failed']}; not run (upstream failed) "
                           f"{summary['not_run']}; completed stages keep their outputs, rerun to resume")
    return summary


def task_runner(dask_address: str | None = None, dask_workers: int | None = None):
    """prefect-dask task runner: an existing scheduler, or a LocalCluster of ``dask_workers`` processes."""
    if not dask_address and not dask_workers:
        return None
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def reproduce(root: str = ".", stages: list[str] | None = None, force: bool = False,
              dask_address: str | None = None, dask_workers: int | None = None) -> dict:
    """Entry point used by the CLI and tests: takes the lock of every dataset of ``run.datasets``
    (shared with the retrain flow and plain ``dvc repro``; held for the whole run, stages and local
    Dask workers inherit it), picks the task runner, then runs the flow."""
    from defectlab.config import Params
    from defectlab.stagekit import dataset_lock

    address = dask_address or flows_params(Path(root)).reproduce.dask_address
    with dataset_lock(Params.load(Path(root) / "params.yaml").run.datasets, root):
        runner = task_runner(address, dask_workers)
        fl = reproduce_flow.with_options(task_runner=runner) if runner else reproduce_flow
        return fl(root=str(root), stages=stages, force=force)


if __name__ == "__main__":  # python -m pipelines.reproduce [root]
    import sys

    print(reproduce(sys.argv[1] if len(sys.argv) > 1 else "."))
