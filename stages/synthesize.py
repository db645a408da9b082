"""DVC stage: build the cached synthetic-anomaly sets of a dataset's categories (seeded, deterministic)."""

from defectlab import pipeline
from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "dataset")


def body(params, run):
    run.log_params({"synthesis": params.profiled("synthesis", "cache"),
                    "image_size": params.dataset(args.dataset).image_size})

    def each(category, out_dir, stats):
        with run.child(category) as child:
            child.log_metrics(stats)
            child.log_artifacts(out_dir / "index.csv")

    pipeline.synthesize_dataset(params, args.dataset, each=each)


run_stage("synthesize", body, dataset=args.dataset)
