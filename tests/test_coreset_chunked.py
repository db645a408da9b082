"""The chunked coreset (``coreset: chunked``): exact greedy up to one chunk, coverage above it,
determinism, and PatchCore's fit / incremental extension on it. Correctness only, never timing."""

import dataclasses

import pytest
import torch

from defectlab.data import scan_category
from defectlab.memory import chunked_coreset, coreset_coverage, greedy_coreset
from defectlab.methods.base import FitContext, make_loader
from defectlab.methods import patchcore as patchcore_module
from defectlab.methods.patchcore import PatchCore, PatchCoreConfig
from defectlab.metrics import compute_all


def clustered(seed: int = 0):
    """20 dense clusters of 100 points and 10 rare ones of 3 points, far apart, in 8-D."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, 8, generator=g) * 20
    sizes = [100] * 20 + [3] * 10
    x = torch.cat([c + torch.randn(s, 8, generator=g) for c, s in zip(centres, sizes)])
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    perm = torch.randperm(len(x), generator=g)
    return x[perm], labels[perm]


def test_chunked_equals_exact_greedy_up_to_one_chunk_and_auto_is_exact_for_small_banks(monkeypatch):
    """N <= chunk: the very picks of greedy_coreset (same seed), projected or not. PatchCore's
    ``coreset: auto`` selects exactly greedy's picks up to CORESET_EXACT_MAX patches and the
    chunked ones above; that is the default."""
    x, _ = clustered()
    for proj in (None, 4):
        for seed in (0, 3):
            ref = greedy_coreset(x, 100, proj_dim=proj, seed=seed, batch=16)
            assert torch.equal(chunked_coreset(x, 100, chunk=len(x), proj_dim=proj, seed=seed, batch=16), ref)
    assert PatchCoreConfig().coreset == "auto"
    model = PatchCore(PatchCoreConfig(coreset="auto", coreset_chunk=256), "cpu")
    assert patchcore_module.CORESET_EXACT_MAX >= len(x)
    exact = greedy_coreset(x, 100, proj_dim=None, seed=5, batch=64)
    assert torch.equal(model._select(x, 100, 5), exact)
    monkeypatch.setattr(patchcore_module, "CORESET_EXACT_MAX", len(x) - 1)
    chunked = chunked_coreset(x, 100, chunk=256, proj_dim=None, seed=5, batch=64)
    assert torch.equal(model._select(x, 100, 5), chunked) and not torch.equal(chunked, exact)


def test_chunked_coreset_covers_clustered_data_nearly_as_well_as_greedy():
    """2 030 points in 5 chunks, 40 or 41 picks each (more than the 30 clusters: the regime the
    default chunk size keeps, e.g. 164 picks per chunk at 1 %): exactly n distinct picks, every
    cluster (the 3-point rare ones included) represented, and the k-center radius within 1.5×
    exact greedy's, far below a random subset's."""
    x, labels = clustered()
    n = 203
    sel = chunked_coreset(x, n, chunk=420, proj_dim=None, seed=0, batch=16)
    assert len(sel) == n and len(set(sel.tolist())) == n
    assert set(labels[sel].tolist()) == set(range(30))
    exact = coreset_coverage(x, greedy_coreset(x, n, proj_dim=None, batch=16))
    rand = coreset_coverage(x, torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n])
    chunked = coreset_coverage(x, sel)
    assert chunked <= 1.5 * exact, (chunked, exact)
    assert chunked < 0.5 * rand, (chunked, rand)


def test_kmeans_chunks_give_the_spread_out_region_its_share_and_cover_as_greedy_does():
    """Two regions of 3 000 points, one tight (σ = 0.2) and one spread out (σ = 2), in 6 chunks:
    exact greedy spends almost all of the bank on the spread-out region. A k-means cell starts with
    a share proportional to its size (1/6 of the bank each) and must win the rest through the
    radius-ordered merge and its continued greedy: it ends with the same split, and a k-center
    radius within 1.2× greedy's; random chunks, each covering both regions with a sixth of the
    bank, do worse."""
    g = torch.Generator().manual_seed(0)
    tight = torch.randn(3000, 6, generator=g) * 0.2
    wide = torch.randn(3000, 6, generator=g) * 2 + 30
    x = torch.cat([tight, wide])[torch.randperm(6000, generator=g)]
    is_wide = (x[:, 0] > 15)
    n = 300
    exact = greedy_coreset(x, n, proj_dim=None, batch=16)
    kmeans = chunked_coreset(x, n, chunk=1000, proj_dim=None, seed=0, batch=16)
    rand = chunked_coreset(x, n, chunk=1000, proj_dim=None, seed=0, batch=16, partition="random")
    assert len(set(kmeans.tolist())) == n
    share = {k: float(is_wide[v].float().mean()) for k, v in (("exact", exact), ("kmeans", kmeans), ("random", rand))}
    assert share["exact"] > 0.95 and share["kmeans"] > 0.95, share
    r = {k: coreset_coverage(x, v) for k, v in (("exact", exact), ("kmeans", kmeans), ("random", rand))}
    assert r["kmeans"] <= 1.2 * r["exact"] and r["random"] > 1.1 * r["kmeans"], r


def test_kmeans_chunks_on_data_with_duplicates_return_what_exists():
    """Patch features with few distinct values (flat image regions): each cell's greedy stops
    when only duplicates are left; the merge keeps every distinct point instead of failing."""
    g = torch.Generator().manual_seed(1)
    distinct = torch.randn(40, 4, generator=g) * 5
    x = distinct[torch.randint(40, (3000,), generator=g)]
    sel = chunked_coreset(x, 300, chunk=500, proj_dim=None, seed=0, batch=8)
    assert len(set(sel.tolist())) == len(sel) and len(sel) <= 300
    assert len({tuple(v) for v in x[sel].tolist()}) == 40          # every distinct point, once


@pytest.mark.parametrize("batch", [1, 16])
def test_greedy_state_gives_the_radii_and_distances_and_resumes_exactly(batch):
    """``return_state``: each pick's radius is its distance to the coreset before it (inf for the
    random start; to the bank first when one is given), the distances are every row's to the whole
    coreset (dropped rows included), and going on from them picks what a fresh greedy from the same
    coreset picks (chunked_coreset's cells resume this way instead of recomputing distances)."""
    x, _ = clustered()
    tol = 1e-5 * float((x * x).sum(1).max())          # float32 rounding of |x|² - 2x·c + |c|² near 0
    sel, r2, dist = greedy_coreset(x, 150, proj_dim=None, batch=batch, return_state=True)
    ref = [float("inf")] + [float(torch.cdist(x[sel[k:k + 1]], x[sel[:k]]).min()) ** 2 for k in range(1, 150)]
    assert torch.allclose(r2, torch.tensor(ref), rtol=1e-3, atol=tol)
    assert torch.allclose(dist, torch.cdist(x, x[sel]).min(1).values ** 2, rtol=1e-3, atol=tol)
    more, r2_more, _ = greedy_coreset(x, 100, proj_dim=None, batch=batch, min_d=dist, n_covered=150, return_state=True)
    fresh, r2_fresh, _ = greedy_coreset(x, 100, proj_dim=None, batch=batch, covered=x[sel], return_state=True)
    assert len(set(more.tolist()) & set(sel.tolist())) == 0
    # the same picks, up to the order of near-ties (distances kept up to date vs recomputed round differently)
    assert set(more.tolist()) == set(fresh.tolist()) and torch.allclose(r2_more, r2_fresh, rtol=1e-3, atol=tol)
    bank = x[:10]
    first, r2_bank, _ = greedy_coreset(x, 5, proj_dim=None, batch=batch, covered=bank, return_state=True)
    assert float(r2_bank[0]) == pytest.approx(float(torch.cdist(x[first[:1]], bank).min()) ** 2, rel=1e-3)


def test_chunked_coreset_is_deterministic_per_seed():
    x, _ = clustered()
    a = chunked_coreset(x, 200, chunk=500, proj_dim=4, seed=1)
    assert torch.equal(a, chunked_coreset(x, 200, chunk=500, proj_dim=4, seed=1))
    assert not torch.equal(a, chunked_coreset(x, 200, chunk=500, proj_dim=4, seed=2))


def test_chunked_coreset_continues_from_an_existing_bank():
    """With ``covered``, each chunk continues greedy from the bank: a new mode far from the bank
    takes the picks, points the bank already covers do not."""
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(100, 8, generator=g)
    old_like = torch.randn(1500, 8, generator=g) * 0.5
    new_mode = torch.randn(500, 8, generator=g) * 0.5 + 8
    x = torch.cat([old_like, new_mode])
    sel = chunked_coreset(x, 40, chunk=400, proj_dim=None, covered=bank)
    assert len(sel) == 40 and (sel >= 1500).float().mean() >= 0.5
    # each chunk's first pick is the point of that chunk farthest from the bank, i.e. from the new mode
    assert int(sel[0]) >= 1500


def test_patchcore_config_rejects_bad_coreset_settings():
    with pytest.raises(ValueError, match="coreset"):
        PatchCoreConfig(coreset="fast")
    with pytest.raises(ValueError, match="coreset_chunk"):
        PatchCoreConfig(coreset_chunk=10)


def test_patchcore_chunked_fit_detects_defects_and_extends_incrementally(small_demo, tmp_path):
    """A chunked bank (9 chunks of 1 024 patches; the smoke profile's layers 1+2) detects the planted defects about as well as the
    exact-greedy bank; extending it with new images embeds only those and keeps the bank a prefix."""
    size = 96
    data = scan_category(small_demo, "grain")
    ctx = FitContext(dataset="demo", category="grain", data=data, image_size=size, seed=0,
                     device=torch.device("cpu"), progress=False)

    def evaluate(model):
        out = model.predict_loader(make_loader(data.test, size, 8))
        return compute_all(out["labels"], out["scores"], out["masks"], out["maps"])["image_auroc"]

    kw = dict(embed_dim=128, coreset_ratio=0.25, coreset_chunk=1024, layers=["layer1", "layer2"])
    chunked = PatchCore(PatchCoreConfig(**kw, coreset="chunked"), "cpu")
    greedy = PatchCore(PatchCoreConfig(**kw, coreset="greedy"), "cpu")
    part_ctx = dataclasses.replace(ctx, data=dataclasses.replace(data, train=data.train[:16]))
    stats = chunked.fit(part_ctx)
    greedy.fit(part_ctx)
    assert stats["n_patches"] == 16 * 576 and stats["bank_size"] == greedy.bank.shape[0] == 2304
    assert not torch.equal(chunked.bank, greedy.bank)              # really chunked
    a_chunked, a_greedy = evaluate(chunked), evaluate(greedy)
    assert a_chunked > 0.7 and a_chunked >= a_greedy - 0.05, (a_chunked, a_greedy)

    chunked.save(tmp_path / "m")
    ext = PatchCore.load(tmp_path / "m")
    embedded = []
    embed = ext.embed
    ext.embed = lambda images: (embedded.append(images.shape[0]), embed(images))[1]
    info = ext.extend(ctx, data.train[16:], seed=0)
    assert sum(embedded) == 8 and info["incremental"] == 1
    assert torch.equal(ext.bank[:2304], chunked.bank) and ext.bank.shape[0] == round(0.25 * 24 * 576)
    assert evaluate(ext) > 0.7
