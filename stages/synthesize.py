"""DVC stage: build the cached synthetic-anomaly set of one category (seeded, deterministic)."""

import argparse

from defectlab import pipeline
from defectlab.stagekit import run_stage

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--dataset", required=True)
ap.add_argument("--category", required=True)
args = ap.parse_args()


def body(params, run):
    stats = pipeline.synthesize(params, args.dataset, args.category)
    run.log_params({"synthesis": params.profiled("synthesis", "cache")})
    run.log_artifacts(pipeline.Layout().synth(args.dataset, args.category) / "index.csv")
    return stats


run_stage("synthesize", body, dataset=args.dataset, category=args.category)
