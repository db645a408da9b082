"""DVC stage: the resolved config fields each method's pretrain and train phases read
(``configs/<method>/{pretrain,train}.json``); those stages depend on these files, not on all of
``methods.<m>``, so a fit-only setting does not retrain a network."""

from defectlab.stagekit import run_stage, stage_args

stage_args(__doc__)   # no options; --help prints the description instead of running the stage
# imported after stage_args: it puts back the outputs DVC deleted before the heavy imports
from defectlab import pipeline


def body(params, run):
    stats = pipeline.write_phase_configs(params)
    run.log_artifacts(pipeline.Layout().configs(), "configs")
    return stats


run_stage("config", body, dataset="all")
