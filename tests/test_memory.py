"""Correctness of the shared memory-bank fast paths (never timing)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab.errors import ConfigError
from defectlab.memory import (NearestNeighbourIndex, coreset_coverage, gaussian_blur, greedy_coreset,
                              local_patch_features, patch_scores_to_maps)


def brute_force(q, b, k):
    d = torch.cdist(q.double(), b.double())
    dk, ik = torch.topk(d, k, largest=False)
    return dk.float(), ik


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_batched_knn_equals_brute_force(backend):
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(500, 24, generator=g), torch.randn(321, 24, generator=g)
    d, i = NearestNeighbourIndex(bank, backend=backend, chunk=64).search(query, k=3)
    d_ref, i_ref = brute_force(query, bank, 3)
    assert torch.equal(i, i_ref)
    assert torch.allclose(d, d_ref, atol=1e-4)


def test_approximate_faiss_index_has_high_recall():
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(4000, 32, generator=g), torch.randn(300, 32, generator=g)
    _, i = NearestNeighbourIndex(bank, approx="IVF16,Flat", nprobe=16).search(query, k=1)
    _, i_ref = brute_force(query, bank, 1)
    assert (i == i_ref).float().mean() == 1.0  # nprobe == nlist: exhaustive


def exact_kcenter_greedy(x, n, start):
    sel, min_d = [start], torch.cdist(x, x[start:start + 1])[:, 0]
    for _ in range(n - 1):
        j = int(torch.argmax(min_d))
        sel.append(j)
        min_d = torch.minimum(min_d, torch.cdist(x, x[j:j + 1])[:, 0])
    return torch.tensor(sel)


def test_exact_greedy_coreset_matches_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 16, generator=g)
    idx = greedy_coreset(x, 30, proj_dim=None, seed=5)
    ref = exact_kcenter_greedy(x, 30, int(idx[0]))
    assert idx.tolist() == ref.tolist()


def test_approximate_coreset_covers_nearly_as_well_as_exact():
    g = torch.Generator().manual_seed(3)
    # clustered data in 256-D, like patch features
    centres = torch.randn(40, 256, generator=g) * 4
    x = centres[torch.randint(40, (3000,), generator=g)] + torch.randn(3000, 256, generator=g)
    exact = coreset_coverage(x, greedy_coreset(x, 150, proj_dim=None))
    approx = coreset_coverage(x, greedy_coreset(x, 150, proj_dim=128))
    rand = coreset_coverage(x, torch.randperm(3000, generator=g)[:150])
    assert approx <= 1.25 * exact        # k-center greedy is a 2-approximation; JL keeps it close
    assert approx < rand                 # and far better than random subsampling
    # every cluster is represented
    sel = greedy_coreset(x, 150, proj_dim=128)
    assert len(sel.unique()) == 150
    # batched rounds (the fast path) make the one-at-a-time greedy's picks (up to float rounding in
    # near-ties, which the two ways of computing distances may break differently)
    for batch in (8, 32):
        for proj, ref in ((128, sel), (None, greedy_coreset(x, 150, proj_dim=None))):
            fast = greedy_coreset(x, 150, proj_dim=proj, batch=batch, candidates=2)
            assert len(set(fast.tolist()) & set(ref.tolist())) >= 0.95 * 150
            assert coreset_coverage(x, fast) <= 1.02 * coreset_coverage(x, ref)


def test_bfloat16_coreset_covers_nearly_as_well_as_float32():
    """coreset_precision: bfloat16 makes approximate picks; their cover radius stays close."""
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(40, 256, generator=g) * 4
    x = centres[torch.randint(40, (3000,), generator=g)] + torch.randn(3000, 256, generator=g)
    f32 = greedy_coreset(x, 150, proj_dim=128, batch=32)
    bf16 = greedy_coreset(x, 150, proj_dim=128, batch=32, precision="bfloat16")
    assert len(bf16.unique()) == 150
    assert coreset_coverage(x, bf16) <= 1.1 * coreset_coverage(x, f32)
    assert coreset_coverage(x, bf16) < coreset_coverage(x, torch.randperm(3000, generator=g)[:150])
    with pytest.raises(ValueError, match="precision"):
        greedy_coreset(x, 10, precision="float16")


def test_batched_coreset_on_separated_clusters_takes_one_point_per_cluster_first():
    g = torch.Generator().manual_seed(4)
    centres = torch.eye(64)[:20] * 100                  # 20 far-apart clusters
    x = centres.repeat_interleave(30, 0) + torch.randn(600, 64, generator=g) * 0.1
    sel = greedy_coreset(x, 20, proj_dim=None, batch=8)
    assert sorted(set((sel // 30).tolist())) == list(range(20))


def test_local_patch_features_shapes_and_neighbourhood_average():
    a = torch.zeros(1, 2, 8, 8)
    a[0, :, 4, 4] = 9.0
    b = torch.ones(1, 3, 4, 4)
    f = local_patch_features([a, b], patch_size=3)
    assert f.shape == (1, 8, 8, 5)
    # 3x3 average spreads the spike to its neighbours (value 1 = 9/9), not beyond
    assert f[0, 3, 3, 0] == pytest.approx(1.0) and f[0, 2, 2, 0] == 0
    # the reference implementation's zero padding: a corner averages 4 ones and 5 zeros
    assert f[0, 0, 0, 2] == pytest.approx(4 / 9) and torch.allclose(f[0, 3:5, 3:5, 2:], torch.ones(2, 2, 3))
    inside = local_patch_features([a, b], patch_size=3, include_pad=False)   # only cells inside the map
    assert torch.allclose(inside[..., 2:], torch.ones(1, 8, 8, 3))
    assert local_patch_features([a, b], patch_size=3, out_dim=2).shape == (1, 8, 8, 2)


def test_gaussian_blur_preserves_mass_and_maps_upsample():
    m = torch.zeros(1, 33, 33)
    m[0, 16, 16] = 1.0
    blurred = gaussian_blur(m, sigma=2.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0, 16, 16] == blurred.max()
    maps = patch_scores_to_maps(torch.rand(2, 4, 4), (32, 32), sigma=1.0)
    assert maps.shape == (2, 32, 32) and np.isfinite(maps.numpy()).all()


@pytest.mark.parametrize("h, w, size, sigma", [(16, 16, (64, 64), 4.0), (12, 9, (48, 40), 2.0), (8, 8, (32, 32), 0.0)])
def test_maps_as_matrix_products_equal_upsampling_then_blur(h, w, size, sigma):
    """patch_scores_to_maps (two matrix products per image) is the bilinear upsampling followed by
    the reflect-padded Gaussian of gaussian_blur, to float rounding."""
    import torch.nn.functional as F

    scores = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1))
    ref = gaussian_blur(F.interpolate(scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0], sigma)
    assert torch.allclose(patch_scores_to_maps(scores, size, sigma), ref, atol=1e-5)


def test_feature_store_spills_to_disk_and_gathers_the_same_rows():
    from defectlab.memory import FeatureStore

    g = torch.Generator().manual_seed(7)
    rows = torch.randn(500, 48, generator=g)
    ram, disk = FeatureStore(48, max_ram_mb=10), FeatureStore(48, max_ram_mb=0.01)   # 0.01 MB: spills at once
    for s in range(0, 500, 64):
        ram.append(rows[s:s + 64])
        disk.append(rows[s:s + 64])
    assert not ram.spilled and disk.spilled
    idx = torch.tensor([499, 3, 250, 3, 0])
    assert torch.equal(ram.gather(idx), rows[idx]) and torch.equal(disk.gather(idx), rows[idx])
    disk.close()


def test_large_bank_harness_exact_answers_across_chunks():
    from defectlab.bench import bench_large_bank

    # probing every IVF list with flat storage is exact: recall must be 1 if the chunked ground truth is right
    r = bench_large_bank(5000, 32, index="IVF16,Flat", n_queries=200, nprobe=16, chunk=777)
    assert r["recall_at_1"] == 1.0
    r = bench_large_bank(5000, 32, index="IVF16,Flat", n_queries=200, nprobe=1, chunk=777)
    assert r["recall_at_1"] < 1.0


def test_pruned_coreset_makes_the_same_picks_and_recovers_from_a_bad_radius_estimate():
    """prune=True drops points that can no longer be picked; the picks must not change — also when
    the extrapolated final radius is too large (prune_margin > 1 forces dropped points to be revived)."""
    import defectlab.memory as M

    g = torch.Generator().manual_seed(7)
    # low intrinsic dimension (4-D clusters in 32-D), as patch features have: distances to the
    # coreset spread out, so many points fall well inside the final radius
    centres = torch.randn(60, 4, generator=g) * 3
    x = (centres[torch.randint(60, (6000,), generator=g)] + torch.randn(6000, 4, generator=g)) @ torch.randn(4, 32, generator=g)
    revived = []
    orig = M._ActiveSet.revive

    def spy(self, *a, **k):
        revived.append(len(self))
        orig(self, *a, **k)

    ref = greedy_coreset(x, 600, proj_dim=None, batch=16, prune=False)
    M._ActiveSet.revive = spy
    try:
        for margin in (0.9, 1.6):
            drops = []
            orig_drop = M._ActiveSet.drop
            M._ActiveSet.drop = lambda self, tau, ns, _d=drops: (_d.append(len(self)), orig_drop(self, tau, ns))
            try:
                fast = greedy_coreset(x, 600, proj_dim=None, batch=16, prune=True, prune_margin=margin)
            finally:
                M._ActiveSet.drop = orig_drop
            assert drops, "pruning never dropped a point"
            assert sorted(fast.tolist()) == sorted(ref.tolist())
            assert coreset_coverage(x, fast) == pytest.approx(coreset_coverage(x, ref))
        assert revived, "an over-estimated radius must trigger a revive"
        # one-at-a-time greedy with pruning: the textbook picks, in order
        one = greedy_coreset(x[:1500], 150, proj_dim=None, seed=5, prune=True, prune_margin=1.6)
        assert one.tolist() == exact_kcenter_greedy(x[:1500], 150, int(one[0])).tolist()
    finally:
        M._ActiveSet.revive = orig


def test_bench_patchcore_reports_ratios_and_auroc_against_exact(tmp_path):
    """The bench runs end to end on tiny data; its figures are consistent (no timing asserts)."""
    from defectlab.bench import bench_patchcore, demo_data, format_table

    data = demo_data(tmp_path, 64, 8, n_test_good=4, n_test_per_defect=2)
    r = bench_patchcore(data, image_size=64, repeat=2, auroc_seeds=2, batch_size=4)
    assert r["n_train"] == 8 and r["repeat"] == 2 and r["auroc_seeds"] == 2
    assert r["bank_size"] == round(0.1 * r["n_patches"])
    lo, hi = r["fit_ratio_range"]
    assert lo <= r["fit_ratio"] <= hi and r["fit_ratio"] > 0
    assert 0 <= r["image_auroc"] <= 1 and 0 <= r["image_auroc_exact_coreset"] <= 1
    assert r["auroc_points_vs_exact"] == pytest.approx(100 * (r["image_auroc"] - r["image_auroc_exact_coreset"]))
    assert r["fit_seconds_exact_coreset"] > 0
    assert "| fit_ratio_range |" in format_table(r)


def test_bench_fit_times_a_method_against_its_backbone_forward(tmp_path):
    """`defectlab bench --method padim`: the method's own fit, its backbone's forward, the ratio."""
    import yaml

    from conftest import ROOT
    from defectlab.bench import bench_fit, demo_data
    from defectlab.config import Params

    data = demo_data(tmp_path, 64, 6, n_test_good=2, n_test_per_defect=1)
    params = Params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    r = bench_fit("padim", data, params, image_size=64, repeat=1, overrides={"weights": "random"})
    assert r["method"] == "padim" and r["n_train"] == 6 and r["forward_seconds"] > 0 and r["load_seconds"] > 0
    assert r["fit_ratio"] == pytest.approx((r["fit_seconds"] - r["load_seconds"]) / r["forward_seconds"])
    assert r["fit_ratio_with_loading"] == pytest.approx(r["fit_seconds"] / r["forward_seconds"])
    lo, hi = r["fit_ratio_range"]
    assert lo <= r["fit_ratio"] <= hi
    assert "image_forward_seconds" not in r            # PaDiM's floor is the image forward itself
    with pytest.raises(ConfigError, match="no forward-pass floor"):
        bench_fit("dsr", data, params, image_size=64, repeat=1)


def test_bench_inference_trains_a_method_that_pretrains_on_the_category(tmp_path):
    """`bench --inference --method dsr`: DSR's stage 1 (the `pretrain` stage) reads the category's
    own training images, so the bench must pretrain on the folder it was given; the method has no
    frozen network to divide by, so it gets images/s and no ratio."""
    import yaml

    from conftest import ROOT
    from defectlab.bench import bench_inference, demo_data
    from defectlab.config import Params

    data = demo_data(tmp_path, 64, 4, n_test_good=2, n_test_per_defect=1)
    params = Params({**yaml.safe_load((ROOT / "params.yaml").read_text()), "profile": "smoke"})
    tiny = {"stage1_iters": 2, "stage2_iters": 2, "stage2_lr_drop_at": 1, "stage3_iters": 1, "n_procedural_textures": 2}
    r = bench_inference("dsr", data, params, image_size=64, repeat=1, overrides=tiny)
    assert r["method"] == "dsr" and r["n_test"] == len(data.test) and r["train_seconds"] > 0
    assert r["images_per_second"] > 0 and r["ratio"] is None and r["floor_seconds"] is None
    assert 0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1


def test_ds2_floor_is_the_backbone_over_every_crop(tmp_path):
    """DS2-GDE embeds each grid crop on its own: its floor forward runs the backbone on exactly the
    crops ``patch_embeddings`` embeds (counted through the extractor's batch sizes)."""
    from defectlab.methods import get_method

    cls = get_method("ds2")
    model = cls(cls.Config(patch_size=16, patch_stride=8, patch_batch=7), "cpu")
    seen = {"floor": [], "embed": []}
    key = "floor"

    class Counting(torch.nn.Module):
        def forward(self, x):
            seen[key].append(x.clone())
            return {layer: x[:, :1] for layer in model.config.gde_layers}

    model.extractor = Counting()
    images = torch.randn(2, 3, 40, 33)
    model.floor_forward(images)
    key = "embed"
    emb = model.patch_embeddings(images)
    n_crops = emb.shape[0] * emb.shape[1] * emb.shape[2]
    assert sum(len(x) for x in seen["floor"]) == n_crops == 2 * 4 * 4     # 40 rows: 4 starts; 33 cols padded to 40
    torch.testing.assert_close(torch.cat(seen["floor"]), torch.cat(seen["embed"]))
    assert {tuple(x.shape[1:]) for x in seen["floor"]} == {(3, 16, 16)}


def test_greedy_coreset_continues_from_an_existing_bank():
    """With ``covered``, the picks are the one-at-a-time greedy continued from those points: each is
    the point farthest from the bank plus the earlier picks (reference loop), batched or not."""
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(40, 8, generator=g)
    new = torch.cat([torch.randn(150, 8, generator=g), torch.randn(50, 8, generator=g) + 6])   # a new mode
    sel, min_d = [], torch.cdist(new, bank).min(1).values
    for _ in range(20):
        j = int(torch.argmax(min_d))
        sel.append(j)
        min_d = torch.minimum(min_d, torch.cdist(new, new[j:j + 1])[:, 0])
    assert greedy_coreset(new, 20, proj_dim=None, covered=bank).tolist() == sel
    assert sorted(greedy_coreset(new, 20, proj_dim=None, covered=bank, batch=4).tolist()) == sorted(sel)
    assert sum(i >= 150 for i in sel) >= 5        # the new mode, far from the bank, is covered first


def test_auto_index_is_exact_for_small_banks_and_rescore_restores_the_exact_maximum():
    """auto: exact up to AUTO_EXACT_MAX_ROWS rows; above, an IVF index whose overstated distances
    rescore_top replaces by the exact ones for each image's largest patches."""
    from defectlab.memory import AUTO_EXACT_MAX_ROWS, auto_index_factory, rescore_top

    assert auto_index_factory(AUTO_EXACT_MAX_ROWS) is None
    assert auto_index_factory(24576) == "gemm-IVF128"
    assert auto_index_factory(1_000_000) == "gemm-IVF1024"
    assert auto_index_factory(9000) == "gemm-IVF64"
    assert auto_index_factory(10 ** 6, "cuda") is None
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(64, 32, generator=gen)
    bank = centres[torch.randint(64, (4000,), generator=gen)] + 0.3 * torch.randn(4000, 32, generator=gen)
    feats = centres[torch.randint(64, (4, 500), generator=gen)] + 0.5 * torch.randn(4, 500, 32, generator=gen)
    index = NearestNeighbourIndex(bank, approx="IVF64,Flat", nprobe=1)     # deliberately poor recall
    assert index.approximate
    d = index.nearest(feats.reshape(-1, 32)).reshape(4, 500).clone()
    exact, _ = NearestNeighbourIndex(bank).search(feats.reshape(-1, 32))
    exact = exact[:, 0].reshape(4, 500)
    assert (d > exact + 1e-4).any()                                         # the IVF missed some neighbours
    rescore_top(d, feats, index, top=16)
    assert torch.allclose(d.amax(1), exact.amax(1), atol=1e-4)              # image maxima now exact
    assert torch.allclose(d.gather(1, d.topk(16, 1).indices), exact.gather(1, d.topk(16, 1).indices), atol=1e-4)


def test_rescore_top_settles_images_with_more_overstated_patches_than_top():
    """50 patches read 10 above their exact distance, far above the true maximum: one round of 16
    re-searches leaves 34 of them overstated, so rescoring goes on until the largest exact distance
    is at least every distance still approximate; the image maximum is then the exact one, and an
    image whose top patch was right from the start is settled in the first round."""
    from defectlab.memory import rescore_top

    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(2, 100, 2, generator=gen)
    bank = torch.zeros(1, 2)
    exact = feats.norm(dim=-1)                                  # distance to the only bank entry

    class Overstating:                                          # an approximate index that overstates
        approximate = True
        calls = 0

        def exact_search(self, q, k=1):
            self.calls += 1
            return NearestNeighbourIndex(bank).exact_search(q, k)

    dist = exact.clone()
    dist[0, :50] += 10.0
    index = Overstating()
    rescore_top(dist, feats, index, top=16)
    assert torch.allclose(dist.amax(1), exact.amax(1), atol=1e-6)
    assert index.calls == 4                                     # 16 + 16 + 16 + the last 2 and beyond


def _clustered(n_bank=4000, n_query=2000, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, d, generator=gen)
    bank = centres[torch.randint(64, (n_bank,), generator=gen)] + 0.3 * torch.randn(n_bank, d, generator=gen)
    query = centres[torch.randint(64, (n_query,), generator=gen)] + 0.5 * torch.randn(n_query, d, generator=gen)
    return bank, query


def test_gemm_ivf_finds_what_faiss_ivf_finds_with_the_same_lists():
    """The grouped-GEMM inverted file is faiss' IVF,Flat search done list by list: with the same
    centroids and probes it returns the same neighbours and distances; probing every list is exact."""
    import faiss

    from defectlab.memory import GemmIVF

    bank, query = _clustered()
    ivf = GemmIVF(bank, lists=32, nprobe=3)
    quantizer = faiss.IndexFlatL2(32)
    quantizer.add(ivf.centroids.numpy())
    ref = faiss.IndexIVFFlat(quantizer, 32, 32)
    ref.is_trained = True
    ref.add(bank.numpy())
    ref.nprobe = 3
    for k in (1, 4):
        d, i = ivf.search(query, k)
        d_ref, i_ref = ref.search(query.numpy(), k)
        assert (i.numpy() == i_ref).mean() > 0.999                            # ties aside, identical
        assert np.allclose(d.numpy(), d_ref, rtol=1e-4, atol=1e-3)
        assert torch.allclose(d, ((query[:, None] - bank[i]) ** 2).sum(-1), rtol=1e-4, atol=1e-3)
    exact_d, exact_i = NearestNeighbourIndex(bank).search(query, 5)
    d, i = GemmIVF(bank, lists=32, nprobe=32).search(query, 5)
    assert torch.equal(i, exact_i) and torch.allclose(d.sqrt(), exact_d, atol=1e-4)
    # one probe misses some neighbours, but finds most of them (chance: 1 in 4000)
    one = NearestNeighbourIndex(bank, approx="gemm-IVF32", nprobe=1)
    assert one.approximate and one.factory == "gemm-IVF32"
    recall = (one.search(query)[1][:, 0] == exact_i[:, 0]).float().mean()
    assert 0.5 < recall < 1.0


@pytest.mark.parametrize("approx", [None, "gemm-IVF32", "IVF32,Flat"])
def test_nearest_is_the_searchs_nearest_distance(approx):
    """``nearest`` (distances only, by column / row minima) returns what ``search(q, 1)`` finds
    with the same index: the exact distance without an index, the same probed lists' best with one."""
    bank, query = _clustered()
    index = NearestNeighbourIndex(bank, approx=approx, nprobe=1)
    d, _ = index.search(query, 1)
    assert torch.allclose(index.nearest(query), d[:, 0], rtol=1e-5, atol=1e-4)
    exact = torch.cdist(query.double(), bank.double()).amin(1).float()
    if approx is None:
        assert torch.allclose(index.nearest(query), exact, atol=1e-4)
    else:                                        # one probe of 32 lists misses some neighbours
        assert (index.nearest(query) > exact + 1e-3).any()


def test_gemm_ivf_nearest_falls_back_to_exact_for_queries_whose_probed_lists_are_empty():
    from defectlab.memory import GemmIVF

    bank, query = _clustered(n_bank=600, n_query=50)
    index = NearestNeighbourIndex(bank, approx="gemm-IVF16", nprobe=1)
    ivf = index._index
    assert isinstance(ivf, GemmIVF)
    ivf.offsets = [0] * len(ivf.offsets)                # every list empty: nothing is found by probing
    assert torch.isinf(ivf.nearest_sq(query)).all()
    assert torch.allclose(index.nearest(query), torch.cdist(query, bank).amin(1), atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 7, 9])
def test_smallest_columns_are_topks_smallest(k):
    """The packed-key minimum (k < 8) and topk (k >= 8) give each row's k smallest columns, in order."""
    from defectlab.memory import smallest_columns

    x = torch.rand(500, 256, generator=torch.Generator().manual_seed(k)) * 10
    x[0, :] = 1.0                                       # an all-ties row
    got = smallest_columns(x.clone(), k)
    assert torch.equal(got[1:], x[1:].topk(k, dim=1, largest=False).indices)
    assert len(set(got[0].tolist())) == k and (k >= 8 or torch.equal(got[0], torch.arange(k)))


def test_gemm_ivf_falls_back_to_exact_when_the_probed_lists_hold_fewer_than_k_rows():
    bank, query = _clustered(n_bank=600, n_query=50)
    index = NearestNeighbourIndex(bank, approx="gemm-IVF16", nprobe=1)
    d, i = index.search(query, k=200)                  # more than any one list holds
    exact_d, exact_i = NearestNeighbourIndex(bank).search(query, 200)
    assert (i >= 0).all() and torch.allclose(d, exact_d, atol=1e-4)
    with pytest.raises(ValueError, match="gemm-IVF<number of lists>"):
        NearestNeighbourIndex(bank, approx="gemm-IVFx")


def test_bench_subset_and_overrides():
    from defectlab.bench import parse_overrides, subset
    from defectlab.data.mvtec import CategoryData

    train = [f"t{i}" for i in range(10)]
    test = ["good"] * 10 + ["scratch"] * 10 + ["stain"] * 10       # grouped by kind, as scan_category lists them
    data = CategoryData(root=Path("."), category="c", train=train, test=test)
    small = subset(data, 4, 6)
    assert small.train == train[:4] and len(small.test) == 6
    assert {k: small.test.count(k) for k in set(small.test)} == {"good": 2, "scratch": 2, "stain": 2}
    assert subset(data).test == test
    with pytest.raises(ConfigError, match="--max-test"):
        subset(data, None, 0)
    assert parse_overrides(["epochs=1", "knn_approx=exact", "layers=[layer1, layer2]"], ["apc", "patchcore"]) == \
        {"epochs": 1, "knn_approx": "exact", "layers": ["layer1", "layer2"]}
    with pytest.raises(ConfigError, match="epochs: no such config key in patchcore"):
        parse_overrides(["epochs=1"], ["patchcore"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["epochs"])
