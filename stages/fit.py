"""DVC stage: fit one method on one category's normal images (memory bank / density / network)."""

from defectlab import pipeline
from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "method", "dataset", "category")


def body(params, run):
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json")})
    _, stats = pipeline.fit(params, args.method, args.dataset, args.category)
    run.log_artifacts(pipeline.Layout().model(args.method, args.dataset, args.category), "model")
    run.register_model(f"{args.method}-{args.dataset}-{args.category}", "model",
                       tags={"profile": params.profile})
    return stats


run_stage("fit", body, dataset=args.dataset, method=args.method, category=args.category)
