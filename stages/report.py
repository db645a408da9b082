"""DVC stage: results table (Markdown + CSV) and heatmap gallery from every evaluated category."""

from defectlab.stagekit import run_stage, stage_args

stage_args(__doc__)   # no options; --help prints the description instead of running the stage
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import report


def body(params, run):
    path = report.build_report()
    run.log_artifacts(path)
    run.log_artifacts(path.with_suffix(".csv"))
    run.log_artifacts(path.with_suffix(".png"))
    print(f"results table: {path.resolve()}")
    return {}


run_stage("report", body, dataset="all")
