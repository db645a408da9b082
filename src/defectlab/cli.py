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
) -> None:
    """Fit and evaluate one method on any MVTec-format folder; write OUT/metrics.json and OUT/maps/."""
    from defectlab.config import Params
    from defectlab.pipeline import benchmark as run_benchmark

    try:
        p = Params.load(params, profile=profile)
        metrics = run_benchmark(p, method, root, category, out, image_size=image_size)
    except DefectlabError as err:
        _fail(err)
    keys = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro", "fit_seconds",
            "images_per_second", "peak_rss_mb"]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{method} on {root}/{category}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in keys:
        v = metrics.get(k)
        table.add_row(k, "—" if v is None else f"{v:.4f}")
    Console().print(table)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'maps'}/")


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


def main() -> None:  # pragma: no cover
    sys.exit(app())
