"""DSR on the demo data, outside DVC: stage 1 (pretrain) once on all categories, then per category
stage 2 (train, saved to <out>/train-<profile>/<cat>) and stage 3 (fit on a fresh instance reading
that train output, as the DVC stages chain them: defectlab.pipeline.train_and_fit), then image
AUROC / pixel AUROC / AUPRO per category (defectlab.metrics.compute_all). "fit" times below are
stages 2 + 3 together.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python scripts/dsr_eval.py --profile smoke \
        --out /tmp/dsr_eval [--root data/prepared/demo] [--set stage2_iters=400 ...]

Without --root the demo dataset is generated (seed 0) at --size px with the params.yaml demo
counts (40 train, 10 good + 4 per defect test images; --n-train etc. for smaller runs). Settings
come from --params (default: the project's params.yaml), methods.dsr common merged with the chosen
profile; --set overrides single keys (YAML values). Stage 1 is reused from <out> when its settings
match (the directory is named by a hash of them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from defectlab.bench import parse_overrides
from defectlab.data import scan_category
from defectlab.methods.base import FitContext, PretrainContext, make_loader
from defectlab.methods.dsr import DSR, STAGE1_KEYS, DSRConfig
from defectlab.metrics import compute_all
from defectlab.pipeline import seed_everything, train_and_fit

ROOT = Path(__file__).resolve().parents[1]


def load_config(params: Path, profile: str, overrides: list[str]) -> DSRConfig:
    from defectlab.config import Params, validate

    cfg = Params.load(params, profile).profiled("methods", "dsr")
    cfg.update(parse_overrides(overrides))
    return validate(DSRConfig, cfg, f"{params}: methods.dsr ({profile})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--out", type=Path, default=Path("/tmp/dsr_eval"))
    ap.add_argument("--root", type=Path, default=None, help="MVTec-layout dataset (default: generate the demo)")
    ap.add_argument("--categories", nargs="+", default=["weave", "grain", "board", "tray"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=40, help="generated demo: normal training images")
    ap.add_argument("--n-test-good", type=int, default=10, help="generated demo: good test images")
    ap.add_argument("--n-test-per-defect", type=int, default=4, help="generated demo: test images per defect")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = load_config(args.params, args.profile, args.set)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.root
    if root is None:
        from defectlab.data.demo import generate_demo

        root = args.out / "demo"
        if not root.exists():
            generate_demo(root, seed=0, image_size=args.size, n_train=args.n_train, n_test_good=args.n_test_good,
                          n_test_per_defect=args.n_test_per_defect, categories=args.categories)
    seed_everything(args.seed)
    stage1_settings = json.dumps({k: getattr(cfg, k) for k in sorted(STAGE1_KEYS)} | {
        "size": args.size, "seed": args.seed, "root": str(root.resolve()), "categories": args.categories}, sort_keys=True)
    pre = args.out / f"pretrain-{hashlib.sha256(stage1_settings.encode()).hexdigest()[:12]}"
    t0, c0 = time.perf_counter(), time.process_time()
    if not (pre / "vq.safetensors").exists():
        pre.mkdir(parents=True, exist_ok=True)
        DSR.pretrain(cfg, PretrainContext(dataset="demo", data_root=root, categories=args.categories, out_dir=pre,
                                          image_size=args.size, seed=args.seed, device=device,
                                          progress=args.progress))
    stage1 = json.loads((pre / "vq.json").read_text())["stats"]
    results = {"profile": args.profile, "config": cfg.model_dump(mode="json"), "device": str(device),
               "pretrain_seconds": time.perf_counter() - t0, "pretrain_cpu_seconds": time.process_time() - c0,
               "stage1": stage1, "categories": {}}
    print(f"stage 1: {results['pretrain_seconds']:.1f} s wall, {results['pretrain_cpu_seconds']:.1f} s CPU  "
          f"recon mse {stage1.get('stage1_recon', float('nan')):.4f}  codebook usage lo {stage1['codebook_usage_lo']:.2f} hi {stage1['codebook_usage_hi']:.2f}")
    for cat in args.categories:
        data = scan_category(root, cat)
        seed_everything(args.seed)
        ctx = FitContext(dataset="demo", category=cat, data=data, image_size=args.size, seed=args.seed,
                         device=device, pretrain_dir=pre, progress=args.progress)
        t1, c1 = time.perf_counter(), time.process_time()
        model, stats = train_and_fit(DSR, cfg, ctx, args.out / f"train-{args.profile}" / cat)
        fit_s, fit_cpu = time.perf_counter() - t1, time.process_time() - c1
        out = model.predict_loader(make_loader(data.test, args.size, batch_size=8))
        m = compute_all(out["labels"], out["scores"], out["masks"], out["maps"])
        # the image AUROC with the score read from the other map (M vs M_r), same fitted model
        other = "refined" if cfg.score_map == "coarse" else "coarse"
        alt = DSR(cfg.model_copy(update={"score_map": other}), device)
        alt.net, alt.meta = model.net, model.meta
        alt_out = alt.predict_loader(make_loader(data.test, args.size, batch_size=8))
        alt_auroc = compute_all(alt_out["labels"], alt_out["scores"], alt_out["masks"], alt_out["maps"])["image_auroc"]
        kinds = np.asarray(out["kinds"])
        per_kind = {}
        for kind in sorted(set(kinds) - {"good"}):
            sel = (kinds == "good") | (kinds == kind)
            per_kind[str(kind)] = compute_all(out["labels"][sel], out["scores"][sel], out["masks"][sel],
                                              out["maps"][sel])["image_auroc"]
        row = {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
               f"image_auroc_score_{other}": alt_auroc, "image_auroc_by_kind": per_kind, "fit_seconds": fit_s,
               "fit_cpu_seconds": fit_cpu, "fit_stats": stats}
        results["categories"][cat] = row
        print(f"{cat:6s} image AUROC {m['image_auroc']:.3f}  pixel AUROC {m['pixel_auroc']:.3f}  "
              f"AUPRO {m['aupro']:.3f}  (image AUROC from {other} map {alt_auroc:.3f})  "
              f"fit {fit_s:.1f} s wall {fit_cpu:.1f} s CPU  by kind {per_kind}  "
              f"focal {stats.get('stage2_focal_start', float('nan')):.3f}->{stats.get('stage2_focal', float('nan')):.3f}")
    cats = results["categories"].values()
    results["mean"] = {k: float(np.mean([c[k] for c in cats])) for k in ("image_auroc", "pixel_auroc", "aupro")}
    print("mean   image AUROC {image_auroc:.3f}  pixel AUROC {pixel_auroc:.3f}  AUPRO {aupro:.3f}".format(**results["mean"]))
    (args.out / f"results-{args.profile}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
