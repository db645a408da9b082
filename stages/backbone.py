"""DVC stage: DS2 dense self-supervised pretraining of the shared backbone on one dataset's normal
images (params `backbone.ds2`); every method with `weights: ds2` starts from it."""

from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "dataset")
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import pipeline


def body(params, run):
    from defectlab.methods import get_method

    cfg = params.section("backbone", "ds2", get_method("ds2").Config)
    run.log_params({"backbone": cfg.model_dump(mode="json"), "image_size": params.dataset(args.dataset).image_size})
    stats = pipeline.train_backbone(params, args.dataset)
    run.log_artifacts(pipeline.Layout().backbone(args.dataset), "backbone")
    return stats


run_stage("backbone", body, dataset=args.dataset, method="ds2")
