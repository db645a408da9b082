"""APC vs plain PatchCore on the same backbone and the same (reduced) test set.

For each category: APC draws its N labelled anomalies from the test set, fine-tunes the
backbone (``train``) and builds PatchCore's bank on it (``fit`` on a fresh instance reading the
saved train output, as the DVC `train` and `fit` stages do; ``pipeline.train_and_fit``); plain PatchCore uses the *same* initial backbone
(same ``backbone`` / ``weights`` / seed) and the *same* PatchCore settings (every PatchCore field
of the APC config). Both are scored on ``pipeline.eval_samples(apc, data)``: the test set minus
APC's labelled anomalies. Writes ``<out>/apc_compare.json`` and ``<out>/apc_compare.md``.

    OMP_NUM_THREADS=1 python scripts/apc_compare.py --profile smoke            # demo, 128 px, 4 categories
    python scripts/apc_compare.py --set epochs=10 --set lr=0.0005              # override APC params
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


from defectlab.bench import parse_overrides
from defectlab.backbones import resolve_device
from defectlab.data import scan_category
from defectlab.data.demo import CATEGORIES, generate_demo
from defectlab.methods.apc import APC, APCConfig
from defectlab.methods.base import FitContext, make_loader
from defectlab.methods.patchcore import PatchCore, PatchCoreConfig
from defectlab.metrics import compute_all
from defectlab.pipeline import eval_samples, seed_everything, train_and_fit

KEYS = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro")


def apc_config(params_file: Path, profile: str, overrides: list[str]) -> APCConfig:
    from defectlab.config import Params, validate

    raw = Params.load(params_file, profile).profiled("methods", "apc")
    raw.update(parse_overrides(overrides))
    return validate(APCConfig, raw, f"{params_file}: methods.apc ({profile})")


def evaluate(model, samples, size: int) -> dict:
    out = model.predict_loader(make_loader(samples, size, 8))
    m = compute_all(out["labels"], out["scores"], out["masks"], out["maps"])
    return {k: m.get(k) for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/apc_compare_demo"), help="demo data (generated if missing)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    ap.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    ap.add_argument("--n-train", type=int, default=None, help="generated demo: normal training images")
    ap.add_argument("--n-test-good", type=int, default=None, help="generated demo: good test images")
    ap.add_argument("--n-test-per-defect", type=int, default=None, help="generated demo: test images per defect")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="APC param override key=value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("reports/apc_compare"))
    args = ap.parse_args()

    cfg = apc_config(args.params, args.profile, args.overrides)
    pc_cfg = PatchCoreConfig(**{k: getattr(cfg, k) for k in PatchCoreConfig.model_fields})
    device = resolve_device(args.device)
    if not args.root.exists():
        counts = {k: v for k, v in (("n_train", args.n_train), ("n_test_good", args.n_test_good),
                                    ("n_test_per_defect", args.n_test_per_defect)) if v is not None}
        generate_demo(args.root, seed=args.seed, image_size=args.image_size, categories=args.categories, **counts)
    rows = []
    for cat in args.categories:
        data = scan_category(args.root, cat)
        ctx = FitContext(dataset="demo", category=cat, data=data, image_size=args.image_size, seed=args.seed,
                         device=device, progress=False,
                         extra={"object_kind": "texture" if CATEGORIES[cat].kind == "texture" else "object"})
        seed_everything(args.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory(prefix="apc-train-") as train_dir:
            apc, stats = train_and_fit(APC, cfg, ctx, Path(train_dir), device)
        apc_s, apc_cpu = time.perf_counter() - t0, time.process_time() - c0
        samples = eval_samples(apc, data)
        seed_everything(args.seed)
        pc = PatchCore(pc_cfg, device)
        t0, c0 = time.perf_counter(), time.process_time()
        pc.fit(ctx)
        pc_s, pc_cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {"category": cat, "n_eval": len(samples), "n_eval_anomalous": sum(s.label for s in samples),
               "n_labelled": len(apc.meta["labelled_anomalies"]),
               "apc": {**evaluate(apc, samples, args.image_size), "fit_seconds": apc_s, "fit_cpu_seconds": apc_cpu,
                       "loss_first": stats.get("loss_total_first"), "loss_last": stats.get("loss_total_last")},
               "patchcore": {**evaluate(pc, samples, args.image_size), "fit_seconds": pc_s, "fit_cpu_seconds": pc_cpu}}
        rows.append(row)
        print(json.dumps(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "apc_compare.json").write_text(json.dumps(
        {"config": cfg.model_dump(mode="json"), "image_size": args.image_size, "root": str(args.root),
         "device": str(device), "rows": rows}, indent=2) + "\n")
    lines = [f"APC vs PatchCore ({cfg.backbone}, weights={cfg.weights}, {args.image_size} px, profile={args.profile}, "
             f"epochs={cfg.epochs}, N={cfg.n_labelled}); same test set minus APC's labelled anomalies", "",
             "| category | n_eval | method | " + " | ".join(KEYS) + " | fit s (wall / cpu) |",
             "|---|---|---|" + "---|" * (len(KEYS) + 1)]
    for r in rows:
        for name in ("patchcore", "apc"):
            m = r[name]
            vals = " | ".join("-" if m[k] is None else f"{m[k]:.3f}" for k in KEYS)
            lines.append(f"| {r['category']} | {r['n_eval']} | {name} | {vals} | {m['fit_seconds']:.0f} / {m['fit_cpu_seconds']:.0f} |")
    for name in ("patchcore", "apc"):
        mean = {k: sum(r[name][k] for r in rows) / len(rows) for k in KEYS}
        lines.append(f"| mean | | {name} | " + " | ".join(f"{mean[k]:.3f}" for k in KEYS) + " | |")
    (args.out / "apc_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
