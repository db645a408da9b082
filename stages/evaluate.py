"""DVC stage: score one category's test set with a fitted model; write metrics, curves and overlays."""

from defectlab import pipeline
from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "method", "dataset", "category")


def body(params, run):
    layout = pipeline.Layout()
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json")})
    metrics = pipeline.evaluate(params, args.method, args.dataset, args.category, layout)
    run.log_artifacts(layout.maps(args.method, args.dataset, args.category), "heatmaps")
    for curve in pipeline.CURVES:
        run.log_artifacts(layout.plot(curve, args.method, args.dataset, args.category), f"curves/{curve}")
    return metrics


run_stage("evaluate", body, dataset=args.dataset, method=args.method, category=args.category)
