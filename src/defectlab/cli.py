"""`defectlab` command line: the things users run by hand, outside `dvc repro`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from defectlab.errors import DefectlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def benchmark(
    method: str = typer.Option(..., help="method name, e.g. patchcore"),
    root: Path = typer.Option(..., exists=True, file_okay=False, help="MVTec-format dataset folder"),
    category: str = typer.Option(..., help="category folder under ROOT"),
    out: Path = typer.Option(..., help="output folder (metrics.json, maps/)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    profile: Optional[str] = typer.Option(None, help="smoke | default | paper (overrides params)"),
    image_size: int = typer.Option(256, help="resize images to this size"),
    resize: str = typer.Option("squash", help="squash | shorter_side_crop | pad"),
    masks_optional: bool = typer.Option(False, help="accept defective test images without masks (pixel metrics null)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds, e.g. 0,1,2: one fit + evaluation per "
                                                   "seed into OUT/seed-<s>/, mean ± std in OUT/metrics.json "
                                                   "(default: params' seed, one run)"),
) -> None:
    """Fit and evaluate one method on any MVTec-format folder; write OUT/metrics.json and OUT/maps/."""
    from defectlab.config import Params
    from defectlab.pipeline import benchmark as run_benchmark, parse_seeds

    try:
        p = Params.load(params, profile=profile)
        seed_list = parse_seeds(seeds) if seeds is not None else None
        metrics = run_benchmark(p, method, root, category, out, image_size=image_size, resize=resize,
                                masks_optional=masks_optional, seeds=seed_list)
    except DefectlabError as err:
        _fail(err)
    keys = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro", "fit_seconds",
            "images_per_second", "peak_rss_mb"]
    from rich.console import Console
    from rich.table import Table

    if "seeds" in metrics:
        from defectlab.report import fmt_mean_std

        summary = metrics["metrics"]
        table = Table(title=f"{method} on {root}/{category}, seeds {', '.join(map(str, metrics['seeds']))}")
        table.add_column("metric")
        table.add_column("mean ± std", justify="right")
        table.add_column("per seed", justify="right")
        kinds = sorted(k for k in summary if k.startswith("image_auroc_") and k not in keys)
        for k in keys[:6] + kinds + keys[6:]:
            entry = summary.get(k)
            values = " ".join("—" if v is None else f"{v:.4f}" for v in (entry or {}).get("values", []))
            table.add_row(k, fmt_mean_std(entry, 4), values)
        Console().print(table)
        typer.echo(f"wrote {out / 'metrics.json'} and {out}/seed-<s>/ (metrics.json, maps/)")
        return
    table = Table(title=f"{method} on {root}/{category}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in keys:
        v = metrics.get(k)
        table.add_row(k, "—" if v is None else f"{v:.4f}")
    Console().print(table)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'maps'}/")


@app.command()
def predict(
    model: str = typer.Argument(..., help="model folder (models/<method>/<ds>/<cat>) or MLflow URI models:/<name>@<alias>"),
    inputs: list[str] = typer.Argument(..., help="image files, folders or glob patterns"),
    out: Optional[Path] = typer.Option(None, help="write predictions.csv, heatmaps/ and masks/ here"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per image instead of a text line"),
    batch_size: int = typer.Option(8, min=1),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    heatmaps: bool = typer.Option(True, help="write heatmap overlays to OUT/heatmaps/"),
) -> None:
    """Score images with a fitted model: one line per image (path, score, normalised score, label at
    the model's threshold); unreadable files are reported and the rest scored. Streams: one batch in memory."""
    from defectlab.inference import OutputWriter, expand_inputs, load

    try:
        det = load(model, device=device)
        writer = OutputWriter(out, det, heatmaps=heatmaps) if out else None
        t = det.threshold.get("image")
        typer.echo(f"# {det.name}: threshold {t if t is None else f'{t:.6g}'} ({det.threshold.get('rule')}, "
                   f"{det.threshold.get('source')}), {det.image_size} px {det.resize}", err=True)
        for pred in det.predict_files(expand_inputs(inputs), batch_size=batch_size, keep_images=bool(out and heatmaps)):
            row = writer.write(pred) if writer else pred.as_dict()
            if as_json:
                typer.echo(json.dumps(row))
            elif pred.error:
                typer.echo(f"{pred.path}\terror\t{pred.error}")
            else:
                norm = "-" if pred.normalized_score is None else f"{pred.normalized_score:.4f}"
                typer.echo(f"{pred.path}\t{pred.score:.6g}\t{norm}\t{pred.label or '-'}")
        if writer:
            writer.close()
            typer.echo(f"# {writer.counts} -> {out / 'predictions.csv'}", err=True)
    except DefectlabError as err:
        _fail(err)


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="model folder or MLflow URI models:/<name>@<alias>"),
    format: str = typer.Option("onnx", "--format", help="onnx"),
    out: Path = typer.Option(..., help="output file, e.g. weave.onnx"),
    check: bool = typer.Option(True, help="run the export with onnxruntime on random images and compare with torch"),
) -> None:
    """Export a fitted model as one graph: image batch in [0, 1] -> image scores + anomaly maps."""
    from defectlab.errors import ConfigError
    from defectlab.inference import resolve

    try:
        if format != "onnx":
            raise ConfigError(f"--format: only 'onnx' is supported (got {format!r})")
        from defectlab.export import export_onnx

        folder = resolve(model)
        facts = export_onnx(folder, out)
        if check:
            import numpy as np

            from defectlab.export import verify_onnx

            size = json.loads((folder / "model.json").read_text())["preprocess"]["image_size"]
            rng = np.random.default_rng(0)
            v = verify_onnx(folder, out, rng.random((2, 3, size, size), dtype=np.float32))
            facts.update({k: v[k] for k in v if not hasattr(v[k], "shape")})
    except DefectlabError as err:
        _fail(err)
    typer.echo(json.dumps(facts, indent=2, default=str))


@app.command()
def bench(
    root: Optional[Path] = typer.Option(None, help="MVTec-format folder (default: generate demo data)"),
    category: str = typer.Option("grain", help="category under ROOT (or demo category)"),
    method: str = typer.Option("patchcore", help="patchcore: the detailed memory-bank bench below; padim | ds2 | apc | msp_svdd: "
                                                 "that method's fit vs the forward pass of its frozen network (config from params.yaml's profile)"),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params for --method other than patchcore"),
    profile: Optional[str] = typer.Option(None, help="params profile for --method (default: params.yaml's)"),
    image_size: int = typer.Option(192, help="image side in pixels"),
    n_train: int = typer.Option(60, help="demo training images (ignored with --root)"),
    backbone: str = typer.Option("resnet18"),
    weights: str = typer.Option("random", help="random | imagenet | ds2 | PATH"),
    layers: str = typer.Option("layer2,layer3"),
    coreset_ratio: float = typer.Option(0.1),
    device: str = typer.Option("auto"),
    exact: bool = typer.Option(True, help="also time the one-at-a-time, unprojected greedy coreset"),
    inference: bool = typer.Option(False, "--inference", help="time predict against its floor for --method "
                                   "(comma-separated, or all), at --profile; with exact-search accuracy for kNN methods"),
    repeat: int = typer.Option(3, help="time forward and fits this many times; ratios are medians"),
    auroc_seeds: int = typer.Option(5, help="image AUROCs are means over this many coreset seeds"),
    bank: Optional[str] = typer.Option(None, help="also test an approximate faiss index on a random N,D bank, e.g. 1000000,1024"),
    index: str = typer.Option("IVF1024,SQfp16", help="faiss index-factory string for --bank"),
    max_train: Optional[int] = typer.Option(None, help="fit on the first N training images only (shortens long fits)"),
    max_test: Optional[int] = typer.Option(None, help="score N test images only, spread evenly over the test set "
                                           "(every kind keeps its share)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE over the method's profile config, e.g. "
                                             "epochs=1 (repeatable; a key the method does not have is an error)"),
    out: Path = typer.Option(Path("reports/bench.json"), help="write the figures here (JSON; a .md table beside it)"),
) -> None:
    """Speed/memory figures of the memory-bank path as ratios to the backbone's forward time."""
    import tempfile

    from defectlab import bench as B
    from defectlab.io import write_json, write_text

    try:
        if root is None:
            tmp = Path(tempfile.mkdtemp(prefix="defectlab-bench-"))
            data = B.demo_data(tmp, image_size, n_train, category)
        else:
            from defectlab.data import scan_category

            data = scan_category(root, category)
        data = B.subset(data, max_train, max_test)
        if inference:
            from defectlab.config import Params

            p = Params.load(params_file, profile=profile)
            names = p.run.methods if method == "all" else method.split(",")
            overrides = {"weights": weights, **B.parse_overrides(set_ or [], names)}
            result = {}
            for name in names:
                typer.echo(f"bench --inference: {name} ({p.profile})", err=True)
                result[name] = B.bench_inference(name, data, p, image_size=image_size, device=device, repeat=repeat,
                                                 overrides=overrides)
                write_json(out, result)                  # what finished so far survives an interruption
            write_text(out.with_suffix(".md"), B.inference_table(result) + "\n")
            typer.echo(out.with_suffix(".md").read_text())
            return
        overrides = {"weights": weights, **B.parse_overrides(set_ or [], [method])}
        if method != "patchcore":
            from defectlab.config import Params

            result = {method: B.bench_fit(method, data, Params.load(params_file, profile=profile), image_size=image_size,
                                          device=device, repeat=repeat, overrides=overrides)}
            write_json(out, result)
            write_text(out.with_suffix(".md"), f"### {method}\n\n{B.format_table(result[method])}\n")
            typer.echo(out.with_suffix(".md").read_text())
            return
        result = {"patchcore": B.bench_patchcore(data, image_size=image_size, backbone=backbone, weights=weights,
                                                 layers=layers.split(","), coreset_ratio=coreset_ratio,
                                                 device=device, exact=exact, repeat=repeat,
                                                 auroc_seeds=auroc_seeds)}
        if bank:
            n, d = (int(v) for v in bank.split(","))
            result["large_bank"] = B.bench_large_bank(n, d, index=index)
    except DefectlabError as err:
        _fail(err)
    write_json(out, result)
    write_text(out.with_suffix(".md"), "\n\n".join(f"### {k}\n\n{B.format_table(v)}" for k, v in result.items()) + "\n")
    typer.echo(out.with_suffix(".md").read_text())


@app.command("datasets")
def datasets_cmd() -> None:
    """List the dataset registry (name, license, download source)."""
    from defectlab.data.registry import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        typer.echo(f"{name:14s} {spec.title} — {spec.license}")


@app.command()
def prepare(
    name: str = typer.Argument(..., help="registry name, e.g. mvtec_ad"),
    raw_dir: Path = typer.Option(..., help="where the downloaded archives are (or go, with --download)"),
    out: Path = typer.Option(..., help="output root in MVTec layout"),
    download: bool = typer.Option(False, help="download missing archives (verifies checksums)"),
) -> None:
    """Download (optionally), verify, extract safely and convert a public dataset to the common layout."""
    from defectlab.data.registry import prepare_dataset

    try:
        prepare_dataset(name, raw_dir, out, download=download)
    except DefectlabError as err:
        _fail(err)
    typer.echo(f"prepared {name} in {out}")


@app.command("download")
def download_cmd(
    name: str = typer.Argument(..., help="registry name, e.g. mvtec_ad (see `defectlab datasets`)"),
    raw_dir: Path = typer.Option(..., help="where the archives go; extracted to RAW_DIR/extracted/NAME"),
    out: Optional[Path] = typer.Option(None, help="also convert to MVTec layout in OUT"),
    insecure_skip_checksum: bool = typer.Option(
        False, "--insecure-skip-checksum", help="accept an archive that has no published checksum (unsafe)"),
) -> None:
    """Download (resuming), verify the checksum, extract safely and optionally convert a dataset."""
    from defectlab.data.registry import fetch_dataset, prepare_dataset

    try:
        if out is None:
            where = fetch_dataset(name, raw_dir, download=True, insecure_skip_checksum=insecure_skip_checksum)
            typer.echo(f"{name} ready in {where}")
        else:
            prepare_dataset(name, raw_dir, out, download=True, insecure_skip_checksum=insecure_skip_checksum)
            typer.echo(f"prepared {name} in {out}")
    except DefectlabError as err:
        _fail(err)


@app.command("generate-demo")
def generate_demo_cmd(out: Path = typer.Argument(...), seed: int = 0, image_size: int = 128) -> None:
    """Write the embedded demo dataset (MVTec layout) to OUT."""
    from defectlab.data.demo import generate_demo

    summary = generate_demo(out, seed=seed, image_size=image_size)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def report(root: Path = Path("."), out: Path = Path("reports")) -> None:
    """Rebuild reports/results.md (+csv, png) from metrics/."""
    from defectlab.report import build_report

    typer.echo(f"results table: {build_report(root, out).resolve()}")


# ---- Prefect flows (pipelines/): reproduce, retrain, inspect ---------------------------------
def _flows(root: Path):
    """Import pipelines/ from the project root (it lives next to dvc.yaml, not in the package)."""
    root = root.resolve()
    if not (root / "pipelines" / "reproduce.py").exists():
        _fail(DefectlabError(f"{root}: no pipelines/ folder here; run from the project root or pass --root"))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import os

    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(root), os.environ.get("PYTHONPATH")) if x)  # Dask workers
    return root


@app.command("reproduce")
def reproduce_cmd(
    root: Path = typer.Option(Path("."), help="project root (dvc.yaml, params.yaml)"),
    stage: Optional[list[str]] = typer.Option(None, help="only these stages and their upstream (repeatable)"),
    force: bool = typer.Option(False, help="rerun stages even when DVC says they are up to date"),
    dask_address: Optional[str] = typer.Option(None, help="run stages on this Dask scheduler (tcp://host:8786)"),
    dask_workers: Optional[int] = typer.Option(None, help="run stages on a local Dask cluster of N processes"),
) -> None:
    """Run the DVC pipeline as a Prefect flow, one task per stage (retries, resume, optional Dask)."""
    root = _flows(root)
    from pipelines.reproduce import reproduce

    summary = reproduce(str(root), stages=stage or None, force=force, dask_address=dask_address,
                        dask_workers=dask_workers)
    typer.echo(json.dumps(summary, indent=2))


@app.command("retrain")
def retrain_cmd(
    dataset: str = typer.Option(..., help="dataset name in params.yaml"),
    category: str = typer.Option(..., help="category whose incoming folder is picked up"),
    method: Optional[str] = typer.Option(None, help="method (default: params flows.retrain.method)"),
    root: Path = typer.Option(Path("."), help="project root"),
    serve: bool = typer.Option(False, "--serve", help="serve on a schedule instead of running once"),
    cron: Optional[str] = typer.Option(None, help='schedule for --serve, e.g. "0 3 * * *" (default: params)'),
) -> None:
    """Validate new normal images, retrain, promote the challenger to `champion` unless worse by > margin."""
    root = _flows(root)
    from pipelines.retrain import retrain_flow, serve as serve_flow

    from pipelines.common import flows_params

    try:
        flows_params(root)          # a malformed flows: section is one line, before anything runs
        if serve:
            serve_flow(dataset, category, method, str(root), cron)
            return
        result = retrain_flow(dataset=dataset, category=category, method=method, root=str(root))
    except DefectlabError as err:
        _fail(err)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command("review")
def review_cmd(
    action: str = typer.Argument(..., help="list | accept | reject"),
    batch: Optional[str] = typer.Argument(None, help="batch id (a folder name under data/review/<ds>/<cat>/)"),
    dataset: str = typer.Option(..., help="dataset name in params.yaml"),
    category: str = typer.Option(..., help="category"),
    reason: str = typer.Option("rejected by a person", help="reject: the reason written to quarantine.csv"),
    root: Path = typer.Option(Path("."), help="project root"),
) -> None:
    """Decide on a batch a refused challenger left for review: accept (retrain with it, margin check
    skipped) or reject (quarantine it with the reason)."""
    root = _flows(root)
    from pipelines import retrain as R

    try:
        if action == "list":
            result = R.list_reviews(str(root), dataset, category)
        elif action in ("accept", "reject") and batch:
            result = (R.review_accept(str(root), dataset, category, batch) if action == "accept"
                      else R.review_reject(str(root), dataset, category, batch, reason))
        else:
            from defectlab.errors import ConfigError

            raise ConfigError(f"review: expected `list` or `accept|reject BATCH`, got {action!r} {batch or ''}")
    except DefectlabError as err:
        _fail(err)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command("history")
def history_cmd(
    dataset: str = typer.Option(..., help="dataset name in params.yaml"),
    category: str = typer.Option(..., help="category"),
    root: Path = typer.Option(Path("."), help="project root"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per model version"),
) -> None:
    """Model versions of a category (every method), the data each was fitted on, what triggered it
    and the decision; then batches waiting for review."""
    root = _flows(root)
    from datetime import datetime, timezone

    from defectlab import champion
    from pipelines.common import setup_tracking
    from pipelines.retrain import list_reviews

    try:
        setup_tracking(root)
        rows = champion.history(dataset, category)
        waiting = list_reviews(str(root), dataset, category)
    except DefectlabError as err:
        _fail(err)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{dataset}/{category}: model versions")
    for col in ("model", "v", "created (UTC)", "alias", "trigger", "batch", "n_train", "data", "data commit",
                "score", "decision"):
        table.add_column(col)
    for r in rows:
        when = datetime.fromtimestamp(r["created"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
        score = f"{r['metric']}={float(r['score']):.3f}" if r["score"] else ""
        table.add_row(r["model"], str(r["version"]), when, r["aliases"], r["trigger"], r["batch"], r["n_train"],
                      r["data_manifest"][:12], r["data_commit"][:10], score, r["decision"])
    console = Console(width=200)
    console.print(table)
    if waiting:
        console.print(f"waiting for review ({len(waiting)}): " + ", ".join(f"{w['batch']} ({w['images']} images)"
                                                                          for w in waiting))


@app.command("inspect")
def inspect_cmd(
    folder: Path = typer.Argument(..., exists=True, file_okay=False, help="folder of images to score"),
    dataset: str = typer.Option(...),
    category: str = typer.Option(...),
    method: Optional[str] = typer.Option(None, help="method (default: params flows.retrain.method)"),
    root: Path = typer.Option(Path("."), help="project root"),
    out: Optional[Path] = typer.Option(None, help="output folder (default reports/inspect/<ds>/<cat>/<time>)"),
    alias: str = typer.Option("champion", help="registry alias of the model to use"),
) -> None:
    """Score a folder with the category's champion: predictions.csv (path, score, label) + heatmaps."""
    root = _flows(root)
    from pipelines.inspect import inspect_flow

    try:
        result = inspect_flow(folder=str(folder), dataset=dataset, category=category, method=method, root=str(root),
                              out=str(out) if out else None, alias=alias)
    except DefectlabError as err:
        _fail(err)
    result.pop("rows", None)
    typer.echo(json.dumps(result, indent=2, default=str))


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover  (python -m defectlab.cli)
    main()
