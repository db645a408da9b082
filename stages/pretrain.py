"""DVC stage: dataset-level pretraining of a method (or freezing its configured backbone weights)."""

from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "method", "dataset")
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import pipeline


def body(params, run):
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json"), "image_size": params.dataset(args.dataset).image_size})
    stats = pipeline.pretrain(params, args.method, args.dataset)
    run.log_artifacts(pipeline.Layout().pretrain(args.method, args.dataset), "pretrain")
    return stats


run_stage("pretrain", body, dataset=args.dataset, method=args.method)
