"""DVC stage: materialise a dataset (generate the demo set or convert a public one) in MVTec layout."""

from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "dataset")
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import pipeline


def body(params, run):
    summary = pipeline.prepare(params, args.dataset)
    run.log_params({"dataset": params.dataset(args.dataset).model_dump()})
    run.log_artifacts(pipeline.Layout().prepared(args.dataset) / "manifest.csv")
    return {f"{cat}.{k}": v for cat, d in summary.items() for k, v in d.items()}


run_stage("prepare", body, dataset=args.dataset)
