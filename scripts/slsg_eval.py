"""SLSG on the demo data: structural vs logical image AUROC, pixel AUROC, AUPRO and sPRO per category.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/slsg_eval.py --profile smoke --out /tmp/slsg_eval
    # with the proposed smoke settings and DRAEM-sized structural masks:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/slsg_eval.py --profile smoke --out /tmp/slsg_eval \
        --synth-param structural_threshold=0.35 --set freeze_encoder=true --set recalibrate_bn=true \
        --set seg_lr=0.003 --set seg_iters=200

Generates the demo dataset (``--image-size``, ``--n-train`` ...), simulates a synthesis cache per
category (structural : logical = 1 : 1, texture categories without foreground restriction, as
the ``synthesize`` stage does), runs ``SLSG.pretrain`` (GPT-Net, all categories), ``SLSG.train``
(SegNet, per category) and ``SLSG.fit`` (loads it), scores the test split and writes ``results.json`` + a table.

Image AUROC per kind: the good test images against the defects of that kind only (the kinds are
in each category's ``defects.json``). sPRO (FPR ≤ ``--max-fpr-spro``): the demo data define no
per-defect saturation areas (MVTec LOCO's ``defects_config.json`` does), so each defect
saturates at its full mask area, i.e. sPRO here equals PRO restricted to FPR ≤ 0.05.
Config: ``common`` merged with ``--profile`` from the project's ``params.yaml``,
then ``--set key=yaml`` overrides.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from defectlab.bench import parse_overrides
from defectlab.data import scan_category
from defectlab.data.demo import CATEGORIES, generate_demo
from defectlab.methods.base import FitContext, PretrainContext, make_loader
from defectlab.methods.slsg import SLSG, SLSGConfig
from defectlab.metrics import compute_all, image_metrics, spro
from defectlab.pipeline import train_and_fit
from defectlab.synthesis.cache import build_cache

ROOT = Path(__file__).resolve().parents[1]


def load_config(profile: str, overrides: list[str]) -> SLSGConfig:
    from defectlab.config import Params, validate

    values = Params.load(ROOT / "params.yaml", profile).profiled("methods", "slsg")
    values.update(parse_overrides(overrides))
    return validate(SLSGConfig, values, f"params.yaml: methods.slsg ({profile})")


def kind_metrics(result: dict, kind: str, max_fpr: float) -> dict:
    keep = np.array([lab == 0 or k == kind for lab, k in zip(result["labels"], result["kinds"])])
    labels = result["labels"][keep]
    if labels.sum() == 0:
        return {}
    maps, masks = result["maps"][keep], result["masks"][keep]
    defects = [[(m, float(m.sum()))] if lab else [] for lab, m in zip(labels, masks)]
    return {"image_auroc": image_metrics(labels, result["scores"][keep])["image_auroc"],
            "spro": spro(defects, maps, max_fpr), "n_defective": int(labels.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/slsg_eval"))
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=yaml override of the config")
    ap.add_argument("--categories", nargs="+", default=["board", "tray", "grain", "weave"])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-test-good", type=int, default=10)
    ap.add_argument("--n-test-per-defect", type=int, default=4)
    ap.add_argument("--synth-n", type=int, default=64)
    ap.add_argument("--synth-param", action="append", default=[],
                    help="key=yaml synthesis option (as params.yaml synthesis.cache.options), e.g. structural_threshold=0.35")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-fpr-spro", type=float, default=0.05)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    cfg = load_config(args.profile, args.overrides)
    synth_params = parse_overrides(args.synth_param)
    device = torch.device(args.device)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "demo"
    generate_demo(data_root, seed=args.seed, image_size=args.image_size, n_train=args.n_train,
                  n_test_good=args.n_test_good, n_test_per_defect=args.n_test_per_defect, categories=args.categories)
    t0 = time.perf_counter()
    pre_dir = out / "pretrain"
    pre_dir.mkdir(exist_ok=True)
    pre_stats = SLSG.pretrain(cfg, PretrainContext("demo", data_root, args.categories, pre_dir, args.image_size,
                                                   args.seed, device, progress=True))
    pre_stats["seconds"] = time.perf_counter() - t0
    print("pretrain:", json.dumps({k: round(v, 4) for k, v in pre_stats.items()}))

    results: dict = {"config": cfg.model_dump(mode="json"), "args": {k: str(v) for k, v in vars(args).items()},
                     "pretrain": pre_stats, "categories": {}}
    for cat in args.categories:
        object_kind = CATEGORIES[cat].kind
        data = scan_category(data_root, cat)
        synth = out / "synth" / cat
        build_cache([s.path for s in data.train], synth, n=args.synth_n, seed=args.seed, image_size=args.image_size,
                    kinds={"structural": 0.5, "logical": 0.5}, object_kind=object_kind, params=synth_params)
        t0 = time.perf_counter()
        ctx = FitContext("demo", cat, data, args.image_size, args.seed, device, pretrain_dir=pre_dir,
                         synth_dir=synth, progress=True, extra={"object_kind": object_kind})
        model, fit_stats = train_and_fit(SLSG, cfg, ctx, out / "train" / cat)   # train stage + fit stage
        fit_stats["seconds"] = time.perf_counter() - t0
        r = model.predict_loader(make_loader(data.test, args.image_size, cfg.batch_size))
        m = compute_all(r["labels"], r["scores"], r["masks"], r["maps"])
        defects = [[(mk, float(mk.sum()))] if lab else [] for lab, mk in zip(r["labels"], r["masks"])]
        row = {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
               "spro": spro(defects, r["maps"], args.max_fpr_spro),
               "structural": kind_metrics(r, "structural", args.max_fpr_spro),
               "logical": kind_metrics(r, "logical", args.max_fpr_spro),
               "fit": {k: fit_stats[k] for k in ("seconds", "loss_first", "loss_last")}}
        results["categories"][cat] = row
        print(cat, json.dumps(row, default=float))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")

    def fmt(v):
        return "  -  " if v is None else f"{v:.3f}"

    print(f"\n{'category':10s} {'imgAUROC':>8s} {'pixAUROC':>8s} {'AUPRO':>6s} {'sPRO':>6s} "
          f"{'img-str':>7s} {'img-log':>7s} {'sPRO-str':>8s} {'sPRO-log':>8s} {'fit s':>6s}")
    for cat, row in results["categories"].items():
        s, lg = row["structural"], row["logical"]
        print(f"{cat:10s} {fmt(row['image_auroc']):>8s} {fmt(row['pixel_auroc']):>8s} {fmt(row['aupro']):>6s} "
              f"{fmt(row['spro']):>6s} {fmt(s.get('image_auroc')):>7s} {fmt(lg.get('image_auroc')):>7s} "
              f"{fmt(s.get('spro')):>8s} {fmt(lg.get('spro')):>8s} {row['fit']['seconds']:6.1f}")
    print(f"pretrain {pre_stats['seconds']:.1f} s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
