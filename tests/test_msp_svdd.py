"""Multi-scale patch SVDD: each loss term (Eq. 1-4) reacts as it should, the patch sampling
follows Sec. 3.3, training lowers the loss and teaches the angle classifier above chance, the
K-means centres are recomputed on schedule, maps follow Eq. 7-9, a resumed training equals an
uninterrupted one, the train / fit split (train -> save_trained -> fresh instance -> fit) keeps
predictions and training stats and never retrains in fit, save/load round-trips, and planted
defects are detected far above chance."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from defectlab.data import scan_category
from defectlab.errors import ConfigError, ResourceMissingError
from defectlab.methods import get_method
from defectlab.methods.base import FitContext, PretrainContext, make_loader
from defectlab.methods.msp_svdd import (MSPSVDDConfig, MultiScalePatchSVDD, PatchEncoder, cos_loss, coverage, crop,
                                        grid_starts, kmeans, kmeans_loss, sample_ssl_pairs, sample_triplets,
                                        ssl_loss, svdd_loss)
from defectlab.metrics import compute_all
from defectlab.pipeline import train_and_fit

from conftest import check_phase_reads

CPU = torch.device("cpu")
# a CPU-sized configuration (thin random VGG16, few short epochs)
FAST = dict(scales=[32, 16], strides={32: 8, 16: 8}, jitters={32: 2, 16: 1}, width=0.0625, embed_dim=32,
            batch_size=16, patches_per_image=4, lr=3e-3, n_clusters=8, kmeans_samples=128, kmeans_every=2,
            kmeans_weight=0.1)


def fresh(cfg: MSPSVDDConfig) -> MultiScalePatchSVDD:
    """A model whose encoders hold the seeded VGG16-style initialisation (as ``fit`` does)."""
    from defectlab.methods.msp_svdd import init_features

    model = MultiScalePatchSVDD(cfg, CPU)
    state, _ = init_features(cfg.weights, cfg.width, seed=0)
    for enc in model.encoders.values():
        enc.load_init(state)
    return model


def images_of(root: Path, category: str, size: int) -> torch.Tensor:
    data = scan_category(root, category)
    return torch.cat([b["image"] for b in make_loader(data.train, size, 16)])


# ---- loss terms --------------------------------------------------------------------------------
def test_svdd_loss_is_mean_l2_distance_of_neighbours():
    e = torch.randn(8, 16)
    assert svdd_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-5)
    shift = torch.zeros(8, 16)
    shift[:, 0] = 3.0
    assert svdd_loss(e, e + shift).item() == pytest.approx(3.0, rel=1e-5)
    # its gradient pulls the pair together
    a = e.clone().requires_grad_(True)
    svdd_loss(a, e + shift).backward()
    assert (a.grad[:, 0] < 0).all()


def test_cos_loss_rewards_near_similar_far_dissimilar():
    e_i = torch.randn(8, 16)
    good = cos_loss(e_i, e_i * 2, -e_i).item()       # j aligned, k opposite: -1 - 1
    bad = cos_loss(e_i, -e_i, e_i * 2).item()        # reversed: 1 + 1
    assert good == pytest.approx(-2.0, abs=1e-5) and bad == pytest.approx(2.0, abs=1e-5)


def test_ssl_loss_cross_entropy_and_accuracy():
    y = torch.arange(12)
    perfect = torch.eye(12) * 50
    loss, acc = ssl_loss(perfect, y)
    assert loss.item() < 1e-6 and acc.item() == 1.0
    loss, acc = ssl_loss(torch.zeros(12, 12), y)      # uniform guess: log 12
    assert loss.item() == pytest.approx(math.log(12), rel=1e-5) and acc.item() <= 1 / 12 + 1e-6


def test_kmeans_loss_is_distance_to_nearest_centre_and_kmeans_finds_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    e = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0], [10.0, 2.0]])
    assert kmeans_loss(e, centres).item() == pytest.approx((0 + 0 + 1 + 2) / 4, rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(50, 2) * 0.1 + torch.tensor(c) for c in ([0.0, 0.0], [5.0, 5.0], [-5.0, 5.0])])
    c = kmeans(blobs, 3, 20, gen)
    found = sorted((round(float(x)), round(float(y))) for x, y in c)
    assert found == [(-5, 5), (0, 0), (5, 5)]


# ---- patch sampling (Sec. 3.3) -----------------------------------------------------------------
@pytest.mark.parametrize("patch,jitter,size", [(64, 4, 128), (32, 2, 128), (16, 1, 64), (64, 4, 256)])
def test_triplets_neighbour_within_jitter_and_far_patch_farther(patch, jitter, size):
    gen = torch.Generator().manual_seed(0)
    p_i, p_j, p_k = sample_triplets(2000, (size, size), patch, jitter, 0.5, gen)
    for p in (p_i, p_j, p_k):
        assert p.min() >= 0 and p.max() <= size - patch
    d_ij = (p_j - p_i).abs().amax(1)
    d_ik = (p_k - p_i).abs().amax(1)
    assert (d_ij >= 1).all() and (d_ij <= jitter).all()
    assert (d_ik > d_ij).all()
    if size >= 2 * patch:   # room for the requested far distance
        assert (d_ik >= patch // 2).float().mean() > 0.95


@pytest.mark.parametrize("patch,size", [(64, 128), (32, 128), (64, 256)])
def test_ssl_pairs_lie_one_patch_away_at_the_labelled_angle(patch, size):
    gen = torch.Generator().manual_seed(1)
    p_m, p_n, y = sample_ssl_pairs(3000, (size, size), patch, 12, 0.125, gen)
    for p in (p_m, p_n):
        assert p.min() >= 0 and p.max() <= size - patch
    assert set(y.tolist()) == set(range(12))
    d = (p_n - p_m).double()
    angle = torch.atan2(-d[:, 0], d[:, 1]) % (2 * math.pi)              # image y points down
    err = torch.remainder(angle - y.double() * math.pi / 6 + math.pi, 2 * math.pi) - math.pi
    assert err.abs().max() < math.radians(15)                           # nearest of the 12 classes
    dist = d.norm(dim=1)
    assert (dist > 0.75 * patch).all() and (dist < 1.3 * patch).all()


# ---- maps (Eq. 7-9) ----------------------------------------------------------------------------
def test_crop_is_the_patch_at_each_position_channels_last():
    """Each crop is the image's window at its (image, top-left), value for value, whatever the
    images' layout; the crops come out channels-last."""
    imgs = torch.randn(3, 3, 37, 45, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for patch in (16, 8, 37):
        idx = torch.randint(3, (20,), generator=gen)
        pos = torch.stack([torch.randint(38 - patch, (20,), generator=gen), torch.randint(46 - patch, (20,), generator=gen)], 1)
        ref = torch.stack([imgs[i, :, y:y + patch, x:x + patch] for i, (y, x) in zip(idx.tolist(), pos.tolist())])
        for layout in (torch.contiguous_format, torch.channels_last):
            got = crop(imgs.contiguous(memory_format=layout), idx, pos, patch)
            assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, ref)


def test_map_is_average_of_covering_patch_scores():
    h, p, s = 20, 8, 5
    ys = grid_starts(h, p, s)
    assert ys == [0, 5, 10, 12]                                         # last row moved to the border
    scores = torch.rand(1, len(ys), len(ys))
    ry = coverage(ys, p, h, CPU)
    fast = torch.einsum("ya,bac,xc->byx", ry, scores, ry) / (ry.sum(1)[:, None] * ry.sum(1)[None])
    slow_sum, slow_n = torch.zeros(h, h), torch.zeros(h, h)
    for a, y0 in enumerate(ys):
        for b, x0 in enumerate(ys):
            slow_sum[y0:y0 + p, x0:x0 + p] += scores[0, a, b]
            slow_n[y0:y0 + p, x0:x0 + p] += 1
    torch.testing.assert_close(fast[0], slow_sum / slow_n)


def test_encoders_follow_vgg16_and_map_patch_to_vector():
    for patch, n_convs in ((16, 4), (32, 7), (64, 10)):
        enc = PatchEncoder(patch, 0.0625, 32)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in enc.body) == n_convs
        assert enc(torch.randn(2, 3, patch, patch)).shape == (2, 32)


def test_encoders_run_channels_last_with_the_networks_own_values():
    """Weights and inputs are NHWC (faster on CPU); the embedding is the one the same weights give
    row-major, and a state dict loads into an encoder without undoing the layout."""
    enc = PatchEncoder(32, 0.0625, 16).eval()
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in enc.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = PatchEncoder(32, 0.0625, 16).eval()
    plain.load_state_dict({k: v.contiguous() for k, v in enc.state_dict().items()})
    with torch.no_grad():
        ref = torch.tanh(plain.head.to(memory_format=torch.contiguous_format)(
            plain.body.to(memory_format=torch.contiguous_format)(x))).flatten(1)
        assert torch.allclose(enc(x), ref, atol=1e-5)
    assert plain.body[0].weight.is_contiguous(memory_format=torch.contiguous_format)
    fresh = PatchEncoder(32, 0.0625, 16)
    fresh.load_state_dict({k: v.contiguous() for k, v in enc.state_dict().items()})
    assert fresh.body[0].weight.is_contiguous(memory_format=torch.channels_last)


# ---- training ------------------------------------------------------------------------------------
def only(term: str) -> dict:
    w = {"lambda_svdd": 0.0, "cos_weight": 0.0, "ssl_weight": 0.0, "kmeans_weight": 0.0}
    w.update({"svdd": {"lambda_svdd": 1.0}, "cos": {"lambda_svdd": 0.01, "cos_weight": 100.0},
              "ssl": {"ssl_weight": 1.0}, "kmeans": {"kmeans_weight": 1.0}}[term])
    return w


@pytest.mark.parametrize("term", ["svdd", "cos", "ssl", "kmeans"])
def test_each_loss_term_alone_is_reduced_by_training(tiny_demo, term):
    images = images_of(tiny_demo, "board", 64)
    cfg = MSPSVDDConfig(**{**FAST, "scales": [32], "epochs": 4, "patches_per_image": 12, "lr": 1e-3,
                           "kmeans_every": 100, **only(term)})
    model = fresh(cfg)
    history = model.train_encoders(images, seed=0)
    first, last = history[0][f"{term}_32"], history[-1][f"{term}_32"]
    assert last < first - 0.05 * abs(first), (term, first, last)


def test_training_lowers_loss_learns_angles_and_recomputes_centres(tiny_demo):
    images = images_of(tiny_demo, "board", 64)
    model = fresh(MSPSVDDConfig(**{**FAST, "epochs": 8, "patches_per_image": 8}))
    before = {p: e.head.weight.clone() for p, e in model.encoders.items()}
    snapshots = []
    orig = model._kmeans_centres

    def spy(p, imgs, gen):
        c = orig(p, imgs, gen)
        snapshots.append((p, c.clone()))
        return c

    model._kmeans_centres = spy
    history = model.train_encoders(images, seed=0)
    # K-means centres recomputed on the schedule (every 2 epochs here, 5 in the paper) and they move
    assert [h["epoch"] for h in history if h.get("kmeans_recomputed")] == [0, 2, 4, 6]
    c16 = [c for p, c in snapshots if p == 16]
    assert len(c16) == 4 and not torch.allclose(c16[0], c16[-1])
    # every term is computed at every scale, the total falls, the encoders move
    for p in (32, 16):
        for term in ("svdd", "cos", "ssl", "kmeans"):
            assert all(math.isfinite(h[f"{term}_{p}"]) for h in history)
        assert history[-1][f"total_{p}"] < history[0][f"total_{p}"]
        assert not torch.equal(before[str(p)], model.encoders[str(p)].head.weight)
    # the SSL loss falls below chance level (log 12) and the angle classifier beats chance (1/12)
    # on fresh pairs (32-px patches of 64-px objects; 16-px patches learn far more slowly)
    assert history[-1]["ssl_32"] < math.log(12) - 0.5
    acc = model.ssl_accuracy(images, n=600)
    assert acc[32] > 3 / 12, acc


def test_lambda_and_weights_switch_terms():
    model = MultiScalePatchSVDD(MSPSVDDConfig(scales=[16], width=0.0625, lambda_svdd=0.5, cos_weight=2.0,
                                              ssl_weight=0.0, kmeans_weight=3.0), CPU)
    t = {k: torch.tensor(v) for k, v in dict(svdd=1.0, cos=-0.25, ssl=7.0, kmeans=0.5).items()}
    assert model.total_loss(t).item() == pytest.approx(0.5 * (1.0 + 2.0 * -0.25) + 0.0 * 7.0 + 3.0 * 0.5)


def test_resumed_training_equals_uninterrupted(tiny_demo, tmp_path):
    images = images_of(tiny_demo, "grain", 32)
    cfg = MSPSVDDConfig(scales=[16], strides={16: 8}, jitters={16: 1}, width=0.0625, embed_dim=16, epochs=4,
                        checkpoint_every=2, patches_per_image=2, batch_size=16, lr=1e-3, kmeans_samples=64,
                        n_clusters=4)
    from defectlab.resume import Checkpoint

    ck = Checkpoint(tmp_path, "ck", cfg, 3)
    full = fresh(cfg)
    h_full = full.train_encoders(images, seed=3, checkpoint=ck)
    assert ck.path.exists()                              # written after epoch 2
    resumed = fresh(cfg)
    h_res = resumed.train_encoders(images, seed=3, checkpoint=ck)
    assert [h["epoch"] for h in h_res] == [0, 1, 2, 3]
    assert h_res == h_full                               # the resumed run reports the same epochs and losses
    for (k, a), b in zip(full.encoders.state_dict().items(), resumed.encoders.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


# ---- fit / predict / save / load --------------------------------------------------------------
def test_detects_planted_defects_and_round_trips(tiny_demo, tmp_path, category="grain"):
    data = scan_category(tiny_demo, category)
    cfg = MSPSVDDConfig(**{**FAST, "epochs": 4, "lr": 1e-4})
    ctx_pre = PretrainContext(dataset="demo", data_root=tiny_demo, categories=[category], out_dir=tmp_path / "pre",
                              image_size=64, seed=0, device=CPU)
    ctx_pre.out_dir.mkdir()
    with check_phase_reads(MultiScalePatchSVDD, "pretrain"):    # its stage depends on every field it reads
        MultiScalePatchSVDD.pretrain(cfg, ctx_pre)
    assert (ctx_pre.out_dir / "vgg_init.safetensors").exists()
    with check_phase_reads(MultiScalePatchSVDD, "train"):
        model, stats = train_and_fit(get_method("msp_svdd"), cfg,
                                     FitContext(dataset="demo", category=category, data=data, image_size=64, seed=0,
                                                device=CPU, pretrain_dir=ctx_pre.out_dir, progress=False),
                                     tmp_path / "train")
    assert stats["bank_size_16"] == len(data.train) * 7 * 7 and "frozen in" in model.meta["init_source"]
    model.save(tmp_path / "model")
    loaded = MultiScalePatchSVDD.load(tmp_path / "model")
    # the training history and stats survive into the final model's meta
    assert len(loaded.meta["history"]) == 4 and loaded.meta["kmeans_epochs"] == [0, 2]
    assert loaded.meta["train"]["final_ssl_acc_32"] == stats["final_ssl_acc_32"]
    out = loaded.predict_loader(make_loader(data.test, 64, 8))
    batch = next(iter(make_loader(data.test[:4], 64, 4)))["image"]
    s, m = model.predict(batch)
    assert m.shape == (4, 64, 64)
    np.testing.assert_allclose(out["scores"][:4], s.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["maps"][:4], m.numpy(), rtol=1e-5, atol=1e-6)
    # the textures' planted structural defects (on the 64-px objects the thin random encoders and 16
    # training images are not enough; see the report for the 128-px figures)
    metrics = compute_all(out["labels"], out["scores"], out["masks"], out["maps"])
    assert metrics["image_auroc"] > 0.8, metrics
    assert metrics["pixel_auroc"] > 0.8, metrics


def test_detects_a_planted_square_on_weave(tiny_demo, tmp_path):
    data = scan_category(tiny_demo, "weave")
    model, _ = train_and_fit(MultiScalePatchSVDD, MSPSVDDConfig(**{**FAST, "epochs": 4}),
                             FitContext(dataset="demo", category="weave", data=data, image_size=64, seed=0,
                                        device=CPU, progress=False), tmp_path / "train")
    good = torch.cat([b["image"] for b in make_loader([s for s in data.test if s.label == 0], 64, 8)])
    rng = np.random.default_rng(0)
    bad, masks = good.clone(), torch.zeros(len(good), 64, 64, dtype=torch.bool)
    for i in range(len(good)):                           # a 10×10 bright square somewhere
        y, x = rng.integers(4, 50, size=2)
        bad[i, :, y:y + 10, x:x + 10] = 2.0
        masks[i, y:y + 10, x:x + 10] = True
    s_good, m_good = model.predict(good)
    s_bad, m_bad = model.predict(bad)
    metrics = compute_all(np.r_[np.zeros(len(good)), np.ones(len(bad))], torch.cat([s_good, s_bad]).numpy(),
                          torch.cat([torch.zeros_like(masks), masks]).numpy(), torch.cat([m_good, m_bad]).numpy())
    assert metrics["image_auroc"] > 0.75, metrics
    assert metrics["pixel_auroc"] > 0.85, metrics


def test_train_then_fit_in_a_fresh_instance_reproduces_train_and_fit(tiny_demo, tmp_path, monkeypatch):
    """The `train` stage's output (train -> save_trained) read back by a new instance's ``fit``
    gives the same model as ``train_and_fit``; ``fit`` never trains; without a train output it
    fails clearly; the resumable checkpoint lives in work_dir during ``train`` only."""
    data = scan_category(tiny_demo, "grain")
    cfg = MSPSVDDConfig(**{**FAST, "epochs": 2, "checkpoint_every": 1})
    ctx = FitContext(dataset="demo", category="grain", data=data, image_size=64, seed=0, device=CPU,
                     progress=False, work_dir=tmp_path / "work")
    ref, stats = train_and_fit(MultiScalePatchSVDD, cfg, ctx, tmp_path / "train")
    assert MultiScalePatchSVDD.trains_per_category
    assert (tmp_path / "train" / "trained.safetensors").exists() and (tmp_path / "train" / "trained.json").exists()
    assert not list((tmp_path / "work").glob("*.pt"))          # checkpoint written at epoch 1, removed at the end
    assert {"train_seconds", "bank_seconds", "final_ssl_acc_16", "bank_size_32"} <= set(stats)

    def no_training(*a, **k):
        raise AssertionError("fit must not train")

    monkeypatch.setattr(MultiScalePatchSVDD, "train_encoders", no_training)
    monkeypatch.setattr(MultiScalePatchSVDD, "_load_init", no_training)
    fresh_model = MultiScalePatchSVDD(cfg, CPU)
    fit_stats = fresh_model.fit(dataclasses.replace(ctx, train_dir=tmp_path / "train"))
    assert "train_seconds" not in fit_stats and fit_stats["bank_size_16"] == len(data.train) * 7 * 7
    batch = next(iter(make_loader(data.test[:6], 64, 6)))["image"]
    s_ref, m_ref = ref.predict(batch)
    s_new, m_new = fresh_model.predict(batch)
    torch.testing.assert_close(s_new, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(m_new, m_ref, rtol=0, atol=0)
    # the trained classifiers / centres come along too (the angle accuracy can be measured after loading)
    assert set(fresh_model.centres) == {"32", "16"}
    train_images = torch.cat([b["image"] for b in make_loader(data.train, 64, 16)])
    assert fresh_model.ssl_accuracy(train_images, n=32) == ref.ssl_accuracy(train_images, n=32)
    # the train stage's meta (history, stats) is in the fitted model's meta
    assert fresh_model.meta["history"] == ref.meta["history"] and len(fresh_model.meta["history"]) == 2
    assert fresh_model.meta["train"]["final_total_32"] == stats["final_total_32"]
    # no train output -> the clear error; a train output from another config -> ConfigError
    with pytest.raises(ResourceMissingError, match="train stage"):
        MultiScalePatchSVDD(cfg, CPU).fit(ctx)
    with pytest.raises(ResourceMissingError, match="train stage"):
        MultiScalePatchSVDD(cfg, CPU).fit(dataclasses.replace(ctx, train_dir=tmp_path / "nowhere"))
    with pytest.raises(ConfigError):
        MultiScalePatchSVDD(MSPSVDDConfig(**{**FAST, "epochs": 3}), CPU).fit(
            dataclasses.replace(ctx, train_dir=tmp_path / "train"))


def test_image_score_is_max_of_window_means():
    model = MultiScalePatchSVDD(MSPSVDDConfig(scales=[16], width=0.0625), CPU)
    am = torch.zeros(1, 32, 32)
    am[0, 4:12, 8:16] = 1.0                                           # one full 8×8 window at stride 4
    am[0, 30, 30] = 20.0                                              # an outlier pixel: diluted by the mean
    model.scale_map = lambda images, p: am
    score, maps = model.predict(torch.zeros(1, 3, 32, 32))
    assert score.item() == pytest.approx(1.0) and torch.equal(maps, am)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_anomaly_map_is_eq6_nearest_bank_distance_summed_over_scales_eq8(backend):
    """Eq. 6-8 written out on tiny banks: each grid patch's score is the L2 distance (not squared)
    of its embedding to the nearest training-patch embedding of its scale, each pixel of AM_θ the
    mean over the patches covering it, and AM the sum (not the mean) of the per-scale maps."""
    cfg = MSPSVDDConfig(**{**FAST, "knn_backend": backend})
    model = fresh(cfg)
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(2, 3, 48, 48, generator=gen), torch.randn(2, 3, 48, 48, generator=gen)
    size, stride = 48, 8

    def patches(images, p):
        starts = list(range(0, size - p + 1, stride))          # 48 - p is a multiple of 8: no border shift
        with torch.no_grad():
            return starts, {(i, y, x): model.encoders[str(p)](images[i:i + 1, :, y:y + p, x:x + p])[0].double()
                            for i in range(len(images)) for y in starts for x in starts}

    expected = torch.zeros(2, size, size, dtype=torch.float64)
    for p in cfg.scales:
        _, bank = patches(train, p)
        model.banks[p] = torch.stack(list(bank.values())).float()     # T^θ: every training grid patch
        starts, test_emb = patches(test, p)
        for i in range(2):
            total = torch.zeros(size, size, dtype=torch.float64)
            count = torch.zeros(size, size, dtype=torch.float64)
            for y in starts:
                for x in starts:
                    d = min(float(torch.sqrt(((test_emb[i, y, x] - t) ** 2).sum())) for t in bank.values())   # Eq. 6
                    total[y:y + p, x:x + p] += d
                    count[y:y + p, x:x + p] += 1
            expected[i] += total / count                                # Eq. 7, summed over θ: Eq. 8
    model._index = {}
    _, am = model.predict(test)
    torch.testing.assert_close(am.double(), expected, rtol=1e-4, atol=1e-4)
    # the training patches themselves score 0 at every scale
    _, am_train = model.predict(train)
    assert am_train.abs().max().item() < 1e-2


# ---- configuration -------------------------------------------------------------------------------
def test_config_checks_and_params_profiles():
    with pytest.raises(ValueError):
        MSPSVDDConfig(scales=[48], strides={64: 16}, jitters={64: 4})
    with pytest.raises(ConfigError):
        from defectlab.methods.msp_svdd import init_features
        init_features("imagenet", 0.5, 0)
    sec = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["methods"]["msp_svdd"]
    for profile in ("smoke", "default", "paper"):
        cfg = MSPSVDDConfig(**{**sec["common"], **sec[profile]})
        assert cfg.scales == [64, 32, 16]
    paper = MSPSVDDConfig(**{**sec["common"], **sec["paper"]})
    assert (paper.lambda_svdd, paper.lr, paper.batch_size, paper.patches_per_image, paper.kmeans_every) == \
        (1e-3, 1e-5, 64, 100, 5)
    assert paper.strides == {64: 16, 32: 4, 16: 4} and paper.jitters == {64: 4, 32: 2, 16: 1}


def test_pretrain_output_must_match_config(tiny_demo, tmp_path):
    cfg = MSPSVDDConfig(scales=[16], strides={16: 8}, jitters={16: 1}, width=0.0625)
    ctx = PretrainContext(dataset="demo", data_root=tiny_demo, categories=["grain"], out_dir=tmp_path,
                          image_size=32, seed=0, device=CPU)
    MultiScalePatchSVDD.pretrain(cfg, ctx)
    other = MultiScalePatchSVDD(MSPSVDDConfig(scales=[16], strides={16: 8}, jitters={16: 1}, width=0.125), CPU)
    with pytest.raises(ResourceMissingError):
        other._load_init(FitContext(dataset="demo", category="grain", data=None, image_size=32, seed=0,
                                    device=CPU, pretrain_dir=tmp_path))


def test_full_width_encoders_take_torchvision_vgg16_weights():
    """width 1: the encoders' bodies are torchvision VGG16 ``features`` prefixes (ImageNet weights load as-is)."""
    from defectlab.methods.msp_svdd import init_features

    state, source = init_features("random", 1.0, seed=0)
    assert "VGG16" in source and state["28.weight"].shape == (512, 512, 3, 3)
    for patch, last in ((16, "7.weight"), (32, "14.weight"), (64, "21.weight")):
        enc = PatchEncoder(patch, 1.0, 8)
        enc.load_init(state)
        assert list(enc.body.state_dict())[-2] == last
        torch.testing.assert_close(enc.body.state_dict()[last], state[last])
