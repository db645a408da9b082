"""DS2 + GDE vs PixPro (ablation) + GDE vs random ResNet-18 + GDE on the demo dataset.

Pretrains DS2 and the PixPro ablation (no feature-similarity pair, c5 only, PixPro's δ = 0.7)
one-for-all on the categories' normal training images, fits the same GDE head on each backbone
per category and evaluates with the shared metrics module.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python scripts/ds2_compare.py --out /tmp/ds2_compare

Configs come from ``--params`` (default: the project's params.yaml), ``methods.ds2`` common merged
with ``--profile`` (default smoke), with ``--set key=value`` overrides (YAML values) applied to every
variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from defectlab.config import Params, validate
from defectlab.bench import parse_overrides
from defectlab.data import scan_category
from defectlab.data.demo import generate_demo
from defectlab.methods.base import FitContext, PretrainContext, make_loader
from defectlab.methods.ds2 import DS2, DS2Config
from defectlab.metrics import compute_all
from defectlab.pipeline import seed_everything

VARIANTS = {
    "ds2": {},
    "pixpro": {"feature_pair": False, "scales": ["layer4"], "pos_threshold": 0.7},
    "random": {"weights": "random"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ds2_compare"))
    ap.add_argument("--root", type=Path, default=None, help="existing demo root (default: generate into OUT/demo)")
    ap.add_argument("--categories", default="grain,weave,board,tray")
    ap.add_argument("--variants", default="ds2,pixpro,random")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    ap.add_argument("--n-train", type=int, default=40, help="generated demo: normal training images")
    ap.add_argument("--n-test-good", type=int, default=10, help="generated demo: good test images")
    ap.add_argument("--n-test-per-defect", type=int, default=4, help="generated demo: test images per defect")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="key=value override (YAML value)")
    args = ap.parse_args()

    cats = args.categories.split(",")
    root = args.root or args.out / "demo"
    if args.root is None and not root.exists():
        generate_demo(root, seed=0, image_size=args.image_size, n_train=args.n_train, n_test_good=args.n_test_good,
                      n_test_per_defect=args.n_test_per_defect, categories=cats)
    base = Params.load(args.params, args.profile).profiled("methods", "ds2")
    base.update(parse_overrides(args.set))
    device = torch.device(args.device)
    results: dict = {"config": base, "profile": args.profile, "variants": {}}
    for name in args.variants.split(","):
        cfg = validate(DS2Config, {**base, **VARIANTS[name]}, f"{args.params}: methods.ds2 ({args.profile}, {name})")
        pre_dir = args.out / "pretrain" / name
        info: dict = {}
        if cfg.weights == "ds2":
            pre_dir.mkdir(parents=True, exist_ok=True)
            seed_everything(args.seed)
            t0 = time.perf_counter()
            c0 = time.process_time()
            info = DS2.pretrain(cfg, PretrainContext(dataset="demo", data_root=root, categories=cats, out_dir=pre_dir,
                                                     image_size=args.image_size, seed=args.seed, device=device,
                                                     progress=False))
            info.update(pretrain_wall_s=time.perf_counter() - t0, pretrain_cpu_s=time.process_time() - c0)
            print(f"[{name}] pretrain {json.dumps({k: round(v, 3) for k, v in info.items()})}", flush=True)
        rows = {}
        for cat in cats:
            data = scan_category(root, cat)
            seed_everything(args.seed)
            model = DS2(cfg, device)
            t0 = time.perf_counter()
            model.fit(FitContext(dataset="demo", category=cat, data=data, image_size=args.image_size, seed=args.seed,
                                 device=device, pretrain_dir=pre_dir if cfg.weights == "ds2" else None, progress=False))
            out = model.predict_loader(make_loader(data.test, args.image_size, 8))
            m = compute_all(out["labels"], out["scores"], out["masks"], out["maps"])
            rows[cat] = {k: round(float(m[k]), 4) for k in ("image_auroc", "pixel_auroc", "aupro")}
            rows[cat]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"[{name}] {cat}: {rows[cat]}", flush=True)
        results["variants"][name] = {"pretrain": info, "categories": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'variant':8s} {'category':8s} {'img_auroc':>9s} {'pix_auroc':>9s} {'aupro':>7s}")
    for name, res in results["variants"].items():
        for cat, r in res["categories"].items():
            print(f"{name:8s} {cat:8s} {r['image_auroc']:9.3f} {r['pixel_auroc']:9.3f} {r['aupro']:7.3f}")
        mean = {k: sum(r[k] for r in res["categories"].values()) / len(res["categories"]) for k in ("image_auroc", "pixel_auroc", "aupro")}
        print(f"{name:8s} {'mean':8s} {mean['image_auroc']:9.3f} {mean['pixel_auroc']:9.3f} {mean['aupro']:7.3f}")


if __name__ == "__main__":
    main()
