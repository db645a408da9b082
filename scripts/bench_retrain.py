"""What a one-category retrain costs against a full `dvc repro` of the dataset, measured in one run.

In a temporary copy of this project (src, stages, pipelines, dvc.yaml, params.yaml with
``--profile``, ``--methods`` and any ``--set key=value`` overrides applied; a fresh git + DVC
repository, MLflow tracking on, its own sqlite store):

1. ``dvc repro``: every stage from nothing (the full run);
2. ``--n-new`` new normal images of ``--category`` (demo generator, another seed) dropped into
   the incoming folder and ``defectlab retrain`` (the flow: validate, new data version, the
   retrained method's stages, compare, promote; ``flows.retrain.margin`` is set to 1 so the batch
   is kept whatever the scores: this measures cost, not the decision);
3. ``dvc repro``: every other method catching up on the new data version;
4. PatchCore on that category: the fit the pipeline made (extended with the new images, when
   ``incremental``) against a refit from scratch on the same images, same process: fit seconds
   and test-set image / pixel AUROC of both.

Reports wall times, the stages each step ran, and the ratio (retrain + catch-up) / full run.
Writes ``--out`` atomically (JSON) and prints a markdown table.

    python scripts/bench_retrain.py --out reports/bench_retrain_smoke.json
    python scripts/bench_retrain.py --profile default --methods patchcore,padim \\
        --set methods.patchcore.default.weights=random --set methods.padim.default.weights=random \\
        --out reports/bench_retrain_default.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], cwd: Path, env: dict) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return r.stdout + r.stderr, time.perf_counter() - t0


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def make_copy(dest: Path, profile: str, methods: list[str] | None, overrides: list[str]) -> dict:
    for item in ("src", "stages", "pipelines", "dvc.yaml", "params.yaml", ".dvcignore", "data/accepted"):
        (dest / item).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, dest / item)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["profile"] = profile
    if methods:
        params["run"]["methods"] = methods
        params["run"]["train_methods"] = [m for m in params["run"]["train_methods"] if m in methods]
    params.setdefault("flows", {}).setdefault("retrain", {})["margin"] = 1.0
    for item in overrides:                       # a.b.c=value (value parsed as YAML)
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = yaml.safe_load((dest / "dvc.yaml").read_text())
    if not params["run"]["train_methods"]:          # DVC refuses a matrix over an empty list
        del dvc["stages"]["train"]
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    return params


def patchcore_refit(proj: Path, dataset: str, category: str) -> dict:
    """In the copy: the pipeline's PatchCore model of the category against a refit from scratch."""
    os.chdir(proj)
    from defectlab import pipeline
    from defectlab.backbones import resolve_device
    from defectlab.config import EvalParams, Params
    from defectlab.data.transform import resize_mode
    from defectlab.methods import get_method

    params = Params.load("params.yaml")
    ev = params.section("evaluation", "eval", EvalParams)
    spec = params.dataset(dataset)
    data = pipeline.category_data(params, dataset, category)
    layout = pipeline.Layout()
    cls = get_method("patchcore")

    def scores(model) -> dict:
        with resize_mode(spec.resize):
            out, _ = pipeline.score_category(model, data, spec.image_size, ev.batch_size)
            m, _ = pipeline.metrics_for(out, ev)
        return {k: m.get(k) for k in ("image_auroc", "pixel_auroc")}

    made = cls.load(layout.model("patchcore", dataset, category), resolve_device(params.device))
    with tempfile.TemporaryDirectory() as tmp:
        refit, stats = pipeline.fit(params, "patchcore", dataset, category, layout, progress=False, out_dir=Path(tmp))
    fit_made = made.meta.get("fit", {})
    return {"pipeline_fit": {"incremental": bool(fit_made.get("incremental")), "fit_seconds": fit_made.get("fit_seconds"),
                             "bank_size": fit_made.get("bank_size"), **scores(made)},
            "refit": {"fit_seconds": stats["fit_seconds"], "bank_size": stats.get("bank_size"), **scores(refit)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--methods", default=None, help="comma-separated (default: params run.methods)")
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--category", default="weave")
    ap.add_argument("--n-new", type=int, default=4)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep", type=Path, default=None, help="build the copy here and keep it (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("reports/bench_retrain.json"))
    args = ap.parse_args()

    from defectlab.data.demo import generate_demo
    from defectlab.io import write_json

    out_path = args.out.resolve()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_retrain_"))
    work.mkdir(parents=True, exist_ok=True)
    proj = work / "project"
    proj.mkdir()
    params = make_copy(proj, args.profile, args.methods.split(",") if args.methods else None, args.overrides)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=f"{proj / 'src'}{os.pathsep}{proj}", DEFECTLAB_TRACKING="on",
               PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "bench@defectlab"],
                ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "bench project"]):
        sh(cmd, proj, env)

    full_out, full_s = sh(["dvc", "repro"], proj, env)
    incoming = proj / "data/incoming" / args.dataset / args.category
    incoming.mkdir(parents=True)
    size = params["datasets"][args.dataset].get("image_size", 128)
    generate_demo(work / "new", seed=7, image_size=size, n_train=args.n_new, n_test_good=0, n_test_per_defect=0,
                  categories=[args.category])
    for p in sorted((work / "new" / args.category / "train/good").glob("*.png")):
        shutil.copy(p, incoming / f"new_{p.name}")
    method = params.get("flows", {}).get("retrain", {}).get("method", "patchcore")
    retrain_out, retrain_s = sh([str(Path(sys.executable).parent / "defectlab"), "retrain", "--dataset", args.dataset,
                                 "--category", args.category, "--method", method, "--root", str(proj)], proj, env)
    result = json.loads(retrain_out[retrain_out.index("{"):retrain_out.rindex("}") + 1])
    catchup_out, catchup_s = sh(["dvc", "repro"], proj, env)
    status, _ = sh(["dvc", "status"], proj, env)
    compare = patchcore_refit(proj, args.dataset, args.category) if "patchcore" in params["run"]["methods"] else None

    report = {"profile": args.profile, "methods": params["run"]["methods"], "categories": params["run"]["categories"],
              "category": args.category, "n_new": args.n_new, "overrides": args.overrides,
              "full_repro_seconds": full_s, "stages_full": ran(full_out),
              "retrain_seconds": retrain_s, "retrain_method": method, "retrain_promoted": result.get("promote"),
              "stages_retrain": [s for s in (result.get("stages_rerun") or "").split(",") if s],
              "catchup_seconds": catchup_s, "stages_catchup": ran(catchup_out),
              "one_category_over_full": (retrain_s + catchup_s) / full_s,
              "dvc_status_clean": "changed" not in status, "patchcore": compare,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    write_json(out_path, report)
    print(f"| step | seconds | stages run |\n|---|---|---|\n"
          f"| full `dvc repro` ({args.profile}, {len(report['methods'])} methods, "
          f"{len(report['categories'])} categories) | {full_s:.0f} | {len(report['stages_full'])} |\n"
          f"| `defectlab retrain` ({method}, {args.n_new} images in {args.category}) | {retrain_s:.0f} | "
          f"{len(report['stages_retrain'])}: {', '.join(report['stages_retrain'])} |\n"
          f"| `dvc repro` after it (other methods catch up) | {catchup_s:.0f} | {len(report['stages_catchup'])}: "
          f"{', '.join(report['stages_catchup'])} |\n"
          f"| (retrain + catch-up) / full | {report['one_category_over_full']:.2f} | |")
    if compare:
        print(json.dumps(compare, indent=2))
    print(f"written: {out_path}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
