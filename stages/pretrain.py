"""DVC stage: dataset-level pretraining of a method (or freezing its configured backbone weights)."""

import argparse

from defectlab import pipeline
from defectlab.stagekit import run_stage

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--method", required=True)
ap.add_argument("--dataset", required=True)
args = ap.parse_args()


def body(params, run):
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json")})
    stats = pipeline.pretrain(params, args.method, args.dataset)
    run.log_artifacts(pipeline.Layout().pretrain(args.method, args.dataset), "pretrain")
    return stats


run_stage("pretrain", body, dataset=args.dataset, method=args.method)
