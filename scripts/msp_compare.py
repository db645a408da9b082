"""Multi-scale vs single-scale patch SVDD on the demo data (the paper's Table 6 comparison).

Uses the MVTec-layout dataset at --data as it is, or without --data generates the demo dataset
(--image-size, --n-train ...) into a temporary folder; then for every category trains and fits
``msp_svdd`` twice (``pipeline.train_and_fit``: the encoders' training, then the memory banks on
a fresh instance reading it back) with the same profile settings — once with the profile's
``scales`` (multi-scale) and once with ``--single`` scales (default [64], the paper's
single-scale ablation) — and evaluates image AUROC, pixel AUROC and AUPRO on the category's
test split. Prints a table and writes JSON.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python scripts/msp_compare.py \
        --profile smoke --out /tmp/msp_compare.json

Settings come from ``--params`` (default: the project's params.yaml), ``methods.msp_svdd`` common
merged with profile ``--profile``, plus ``--set key=value`` overrides (value parsed as YAML).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from defectlab.bench import parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def method_params(path: Path, profile: str) -> dict:
    from defectlab.config import Params

    return Params.load(path, profile).profiled("methods", "msp_svdd")


def run(config, data, image_size: int, seed: int, device: torch.device, batch_size: int = 8) -> dict:
    from defectlab.methods.base import FitContext, make_loader
    from defectlab.methods.msp_svdd import MultiScalePatchSVDD
    from defectlab.metrics import compute_all
    from defectlab.pipeline import seed_everything, train_and_fit

    seed_everything(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:   # train (encoders) -> trained.* -> fresh instance -> fit (banks)
        model, stats = train_and_fit(MultiScalePatchSVDD, config,
                                     FitContext(dataset="demo", category=data.category, data=data,
                                                image_size=image_size, seed=seed, device=device, progress=False),
                                     Path(tmp) / "train")
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    out = model.predict_loader(make_loader(data.test, image_size, batch_size))
    t_pred = time.perf_counter() - t0
    m = compute_all(out["labels"], out["scores"], out["masks"], out["maps"])
    return {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
            "fit_seconds": t_fit, "fit_cpu_seconds": c_fit, "train_seconds": stats.get("train_seconds"),
            "bank_seconds": stats.get("bank_seconds"), "predict_seconds": t_pred,
            "final_ssl_acc": {k: v for k, v in stats.items() if k.startswith("final_ssl_acc")}}


def main() -> None:
    from defectlab.config import validate
    from defectlab.data.demo import generate_demo
    from defectlab.methods.msp_svdd import MSPSVDDConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--single", default="[64]", help="scales of the single-scale run (YAML list)")
    ap.add_argument("--variants", default="multi,single", help="which of multi,single to run")
    ap.add_argument("--categories", default="weave,grain,board,tray")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=40, help="generated demo: normal training images")
    ap.add_argument("--n-test-good", type=int, default=10, help="generated demo: good test images")
    ap.add_argument("--n-test-per-defect", type=int, default=4, help="generated demo: test images per defect")
    ap.add_argument("--data", type=Path, default=None,
                    help="MVTec-layout dataset root holding the categories (default: generate the demo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    params_path = args.params
    base = method_params(params_path, args.profile)
    base.update(parse_overrides(args.set))
    single_scales = yaml.safe_load(args.single)
    variants = {"multi": validate(MSPSVDDConfig, base, "msp_svdd"),
                "single": validate(MSPSVDDConfig, {**base, "scales": single_scales}, "msp_svdd")}
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    cats = args.categories.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data
        if data_root is None:
            data_root = Path(tmp) / "demo"
            generate_demo(data_root, seed=args.seed, image_size=args.image_size, n_train=args.n_train,
                          n_test_good=args.n_test_good, n_test_per_defect=args.n_test_per_defect, categories=cats)
        elif not data_root.is_dir():
            raise SystemExit(f"--data {data_root}: no such dataset folder")
        results = compare(args, variants, cats, data_root, params_path)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def compare(args, variants: dict, cats: list[str], data_root: Path, params_path: Path) -> dict:
    from defectlab.data import scan_category

    device = torch.device(args.device)
    results: dict = {"params": str(params_path), "profile": args.profile, "overrides": args.set,
                     "data": str(args.data) if args.data else "demo (generated)",
                     "scales": {k: v.scales for k, v in variants.items()}, "categories": {}}
    for cat in cats:
        data = scan_category(data_root, cat)
        results["categories"][cat] = {}
        for name, cfg in variants.items():
            r = run(cfg, data, args.image_size, args.seed, device)
            results["categories"][cat][name] = r
            print(f"{cat:6s} {name:6s} {str(cfg.scales):12s} image AUROC {r['image_auroc']:.3f}  pixel AUROC "
                  f"{r['pixel_auroc']:.3f}  AUPRO {r['aupro']:.3f}  fit {r['fit_seconds']:.0f}s (cpu {r['fit_cpu_seconds']:.0f}s) "
                  f"predict {r['predict_seconds']:.0f}s", flush=True)
    for name in variants:
        means = {k: float(np.mean([results["categories"][c][name][k] for c in cats]))
                 for k in ("image_auroc", "pixel_auroc", "aupro")}
        results[f"mean_{name}"] = means
        print(f"mean   {name:6s} image AUROC {means['image_auroc']:.3f}  pixel AUROC {means['pixel_auroc']:.3f}  "
              f"AUPRO {means['aupro']:.3f}")
    return results


if __name__ == "__main__":
    main()
