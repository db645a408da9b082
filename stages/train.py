"""DVC stage: train one training method's network on one category (MSP-SVDD encoders, SLSG SegNet,
DSR stage 2, APC fine-tuning); cached per category by DVC."""

from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "method", "dataset", "category")
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import pipeline


def body(params, run):
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json"), "image_size": params.dataset(args.dataset).image_size})
    stats = pipeline.train(params, args.method, args.dataset, args.category)
    run.log_artifacts(pipeline.Layout().trained(args.method, args.dataset, args.category), "trained")
    return stats


run_stage("train", body, dataset=args.dataset, method=args.method, category=args.category)
