"""DVC stage: fit one method on every category of a dataset (memory bank / density / the last step
on a trained network); each changed model is registered in MLflow as <method>-<dataset>-<category>."""

from defectlab import pipeline
from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "method", "dataset")


def body(params, run):
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json")})

    def each(category, model_dir, stats):
        with run.child(category) as child:
            child.log_metrics(stats)
            child.log_artifacts(model_dir, "model")
            child.register_model(f"{args.method}-{args.dataset}-{category}", "model",
                                 tags={"profile": params.profile}, content_sha256=pipeline.model_sha256(model_dir))

    pipeline.fit_dataset(params, args.method, args.dataset, each=each)


run_stage("fit", body, dataset=args.dataset, method=args.method)
