"""DVC stage: build the cached synthetic-anomaly set of one category (seeded, deterministic)."""

from defectlab import pipeline
from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "dataset", "category")


def body(params, run):
    stats = pipeline.synthesize(params, args.dataset, args.category)
    run.log_params({"synthesis": params.profiled("synthesis", "cache")})
    run.log_artifacts(pipeline.Layout().synth(args.dataset, args.category) / "index.csv")
    return stats


run_stage("synthesize", body, dataset=args.dataset, category=args.category)
