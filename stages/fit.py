"""DVC stage: fit one method on every category of a dataset (memory bank / density / the last step
on a trained network); each changed model is logged as an MLflow pyfunc model and registered as
<method>-<dataset>-<category> (its first version becomes `champion`)."""

from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "method", "dataset")
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import champion, pipeline
from defectlab.data.mvtec import IMAGE_EXTS


def body(params, run):
    _, cfg = pipeline.load_method_config(params, args.method)
    run.log_params({"method": cfg.model_dump(mode="json"), "image_size": params.dataset(args.dataset).image_size})

    def each(category, model_dir, stats):
        with run.child(category) as child:
            child.log_metrics(stats)
            name = champion.model_name(args.method, args.dataset, category)
            # the input example: any training image (not a second scan of the whole category)
            good = pipeline.Layout().prepared(args.dataset) / category / "train" / "good"
            example = min((p for p in good.iterdir() if p.suffix.lower() in IMAGE_EXTS), default=None)
            version = child.register_pyfunc(name, model_dir, tags={"profile": params.profile, "trigger": "dvc repro",
                                                                   **pipeline.card_tags(model_dir)},
                                            content_sha256=pipeline.model_sha256(model_dir), example_image=example)
            champion.ensure_champion(name, version)

    pipeline.fit_dataset(params, args.method, args.dataset, each=each)


run_stage("fit", body, dataset=args.dataset, method=args.method)
