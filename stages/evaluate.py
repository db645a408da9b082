"""DVC stage: score every category's test set of a dataset with the fitted models; write metrics,
curves and overlays (one MLflow child run per category)."""

from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "method", "dataset")
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import pipeline


def body(params, run):
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json"), "image_size": params.dataset(args.dataset).image_size})

    def each(category, metrics, dest):
        with run.child(category) as child:
            child.log_metrics(metrics)
            child.log_artifacts(dest["maps"] / category, "heatmaps")
            for curve in pipeline.CURVES:
                child.log_artifacts(dest["plots"][curve] / f"{category}.json", f"curves/{curve}")

    results = pipeline.evaluate_dataset(params, args.method, args.dataset, each=each)
    keys = ("image_auroc", "pixel_auroc", "aupro")
    return {f"mean_{k}": sum(m[k] for m in results.values() if m.get(k) is not None) /
            max(1, sum(1 for m in results.values() if m.get(k) is not None)) for k in keys}


run_stage("evaluate", body, dataset=args.dataset, method=args.method)
