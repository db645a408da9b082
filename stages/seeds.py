"""DVC stage: the extra seeds of `seeds` (every one but `seed`) for a dataset: each method of
run.methods trained, fitted and evaluated again from scratch per seed (nothing deployed or
registered); test metrics to metrics/seeds/<ds>/<method>/<category>/seed-<s>.json, which the report
turns into mean ± std over seeds."""

from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "dataset")
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import pipeline


def body(params, run):
    run.log_params({"seeds": params.seeds})

    def each(method, category, seed, metrics):
        keys = ("image_auroc", "pixel_auroc", "aupro", "spro")
        run.log_metrics({k: metrics[k] for k in keys if metrics.get(k) is not None}, prefix=f"{method}.{category}.seed{seed}.")

    results = pipeline.extra_seeds(params, args.dataset, each=each)
    return {"extra_seed_runs": sum(len(v) for v in results.values())}


run_stage("seeds", body, dataset=args.dataset)
