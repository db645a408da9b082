"""PatchCore's nearest-neighbour search, index by index, against the backbone forward it follows.

Fits PatchCore at ``--profile`` (random weights) on a category of an MVTec-format folder, embeds
``--images`` of its test images once, then times each search over those queries in one batch (as
``predict`` searches a batch): exact (one GEMM), faiss inverted files and HNSW, and the grouped-GEMM
inverted file (``memory.GemmIVF``, what ``knn_approx: auto`` builds on the CPU) at several list
counts and probes, with the neighbours' indices (``search``) and distances only (``nearest``, what
``predict`` calls). Reports ms per image, recall@1 against exact search (for distances only: the
share of queries whose distance is the exact one), the mean relative overstatement of the distance,
and the forward pass (the floor ``defectlab bench --inference`` divides by) timed in the same run.

    python scripts/bench_search.py --root ../shared/realdev --category moon --out reports/bench_search.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def pairs(text: str) -> list[tuple[int, int]]:
    """"512:8,256:6" -> [(512, 8), (256, 6)]."""
    return [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="MVTec-format folder")
    ap.add_argument("--category", required=True)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--images", type=int, default=8, help="test images searched (one batch)")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--set", dest="set_", action="append", default=[], help="KEY=VALUE over PatchCore's config")
    ap.add_argument("--ivf", default="512:8,512:4", help="faiss IVF<lists>,Flat as lists:probes, comma-separated")
    ap.add_argument("--hnsw", default="32:16,16:16", help="faiss HNSW<M> as M:efSearch")
    ap.add_argument("--gemm", default="512:8,256:6,256:8,128:4", help="memory.GemmIVF as lists:probes")
    ap.add_argument("--nearest", default="256:6,128:3,128:2",
                    help="memory.GemmIVF distances only (GemmIVF.nearest_sq, what predict calls) as lists:probes")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON (and a .md table beside it)")
    a = ap.parse_args(argv)

    import faiss

    from defectlab import bench as B
    from defectlab.config import Params
    from defectlab.data import scan_category
    from defectlab.io import write_json, write_text
    from defectlab.memory import GemmIVF, NearestNeighbourIndex
    from defectlab.methods.base import make_loader

    data = B.subset(scan_category(a.root, a.category), a.max_train, a.images)
    params = Params.load(ROOT / "params.yaml", profile=a.profile)
    overrides = {"weights": "random", **B.parse_overrides(a.set_, ["patchcore"])}
    with tempfile.TemporaryDirectory() as tmp:
        _, _, model, _, _ = B._fit_for_bench("patchcore", data, params, image_size=a.image_size,
                                             dev=torch.device("cpu"), seed=0, overrides=overrides, tmp=Path(tmp))
    images = torch.cat([b["image"] for b in make_loader(data.test, a.image_size, a.images)])[:a.images]
    n = len(images)

    def timed(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(a.repeat):
            out = fn()
        return 1000 * (time.perf_counter() - t0) / a.repeat / n, out

    with torch.no_grad():
        floor_ms, _ = timed(lambda: model.extractor(images))
        embed_ms, feats = timed(lambda: model.embed(images))
    q = feats.reshape(-1, feats.shape[-1]).contiguous()
    bank = model.bank.float().contiguous()
    exact_ms, (exact_d, exact_i) = timed(lambda: NearestNeighbourIndex(bank).exact_search(q))
    exact_d = exact_d[:, 0]
    rows = [{"search": "backbone forward (floor)", "ms_per_image": floor_ms, "recall_at_1": None},
            {"search": "forward + patch aggregation", "ms_per_image": embed_ms, "recall_at_1": None},
            {"search": "exact (chunked GEMM + minimum)", "ms_per_image": exact_ms, "recall_at_1": 1.0}]
    qn, bn = q.numpy(), bank.numpy()
    searches = [("faiss-ivf", *p) for p in pairs(a.ivf)] + [("faiss-hnsw", *p) for p in pairs(a.hnsw)] + \
        [("gemm", *p) for p in pairs(a.gemm)] + [("gemm-nearest", *p) for p in pairs(a.nearest)]
    for kind, size, probes in searches:
        if kind != "faiss-hnsw" and size > len(bank) // 39:
            print(f"skipped {kind} with {size} lists: k-means wants >= 39 bank rows per list ({len(bank)} rows)")
            continue
        if kind.startswith("gemm"):
            index = GemmIVF(bank, size, probes)
            if kind == "gemm":
                search = lambda: index.search(q)[1][:, 0].numpy()                       # noqa: E731
                name = f"gemm-IVF{size}, {probes} probes"
            else:
                search = lambda: index.nearest_sq(q).clamp_min(0).sqrt()                # noqa: E731
                name = f"gemm-IVF{size}, {probes} probes, distances only (`predict`)"
        else:
            factory = f"IVF{size},Flat" if kind == "faiss-ivf" else f"HNSW{size}"
            index = faiss.index_factory(bn.shape[1], factory)
            index.train(bn)
            index.add(bn)
            if kind == "faiss-ivf":
                index.nprobe = probes
            else:
                index.hnsw.efSearch = probes
            search = lambda: index.search(qn, 1)[1][:, 0]                               # noqa: E731
            name = f"faiss {factory}, {'probes' if kind == 'faiss-ivf' else 'efSearch'} {probes}"
        ms, found = timed(search)
        if kind == "gemm-nearest":
            dist = found
            recall = float((found <= exact_d * (1 + 1e-5) + 1e-6).float().mean())
        else:
            dist = ((q - bank[torch.as_tensor(found).long()]) ** 2).sum(1).sqrt()
            recall = float((found == exact_i[:, 0].numpy()).mean())
        over = float(((dist - exact_d) / exact_d.clamp_min(1e-12)).mean())
        rows.append({"search": name, "ms_per_image": ms, "recall_at_1": recall, "distance_overstated": over})
    for r in rows:
        r["ratio_to_floor"] = r["ms_per_image"] / floor_ms
    lines = [f"PatchCore ({a.profile}) search on {a.root.name}/{a.category}: {n} images x "
             f"{feats.shape[1] * feats.shape[2]} queries of {q.shape[1]} dims, bank {len(bank)} rows", "",
             "| search | ms / image | ÷ forward | recall@1 | distance overstated (mean) |", "|---|---|---|---|---|"]
    for r in rows:
        rec = "–" if r["recall_at_1"] is None else f"{r['recall_at_1']:.4f}"
        over = "–" if r.get("distance_overstated") is None else f"{100 * r['distance_overstated']:.2f} %"
        lines.append(f"| {r['search']} | {r['ms_per_image']:.1f} | {r['ratio_to_floor']:.2f} | {rec} | {over} |")
    print("\n".join(lines))
    if a.out:
        write_json(a.out, {"root": str(a.root), "category": a.category, "profile": a.profile, "images": n,
                           "queries_per_image": int(feats.shape[1] * feats.shape[2]), "dims": int(q.shape[1]),
                           "bank_rows": int(len(bank)), "rows": rows})
        write_text(a.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
