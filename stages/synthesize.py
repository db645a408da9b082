"""DVC stage: build the cached synthetic-anomaly sets of a dataset's categories (seeded, deterministic)."""

from defectlab.stagekit import run_stage, stage_args

args = stage_args(__doc__, "dataset")
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import pipeline


def body(params, run):
    run.log_params({"synthesis": params.profiled("synthesis", "cache"),
                    "image_size": params.dataset(args.dataset).image_size})

    def each(category, out_dir, stats):
        with run.child(category) as child:
            child.log_metrics(stats)
            child.log_artifacts(out_dir / "index.csv")

    pipeline.synthesize_dataset(params, args.dataset, each=each)


run_stage("synthesize", body, dataset=args.dataset)
