"""DVC stage: fit one method on one category's normal images (memory bank / density / network)."""

import argparse

from defectlab import pipeline
from defectlab.stagekit import run_stage

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--method", required=True)
ap.add_argument("--dataset", required=True)
ap.add_argument("--category", required=True)
args = ap.parse_args()


def body(params, run):
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json")})
    _, stats = pipeline.fit(params, args.method, args.dataset, args.category)
    run.log_artifacts(pipeline.Layout().model(args.method, args.dataset, args.category), "model")
    run.register_model(f"{args.method}-{args.dataset}-{args.category}", "model",
                       tags={"profile": params.profile})
    return stats


run_stage("fit", body, dataset=args.dataset, method=args.method, category=args.category)
