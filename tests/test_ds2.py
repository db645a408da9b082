"""DS2: positive-pair selection, loss, momentum branch, pretraining, GDE head, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlab.methods.ds2 import (DS2, PPM, DS2Config, DS2Net, feature_top1_positive, geometric_positives,
                                   ledoit_wolf, make_batch_views, pair_loss, receptive_field_upsample, train_ds2)

TINY = dict(backbone="resnet18", proj_hidden=64, proj_dim=32, crop_size=64, batch_size=8, min_scale=0.3,
            optimizer="lars", lr=1.0, warmup_epochs=0.5, patch_size=16, patch_stride=4, fit_batch_size=8)


def _expected_shift_mask(h, w, shift):
    """Cell (r, c + shift) of view a matches cell (r, c) of view b."""
    m = torch.zeros(h * w, h * w, dtype=torch.bool)
    for r in range(h):
        for c in range(w - shift):
            m[r * w + c + shift, r * w + c] = True
    return m


def test_geometric_positives_known_offset():
    # two equal-size crops of the same image, view b shifted right by exactly one feature cell (1/4 of the crop)
    h = w = 4
    boxes_a = torch.tensor([[0.0, 0.2, 0.5, 0.7]])
    boxes_b = torch.tensor([[0.125, 0.2, 0.625, 0.7]])
    no = torch.tensor([False])
    pos = geometric_positives(boxes_a, no, boxes_b, no, h, w, 0.1)[0]
    assert torch.equal(pos, _expected_shift_mask(h, w, 1))
    # half a cell off: no cell centre within 0.1 diagonals -> no geometric positives (δ = 0.1, Sec. 3.1)
    boxes_c = torch.tensor([[0.0625, 0.2, 0.5625, 0.7]])
    assert not geometric_positives(boxes_a, no, boxes_c, no, h, w, 0.1).any()
    # ... but PixPro's loose threshold (0.7 diagonals) accepts the half-cell neighbours
    assert geometric_positives(boxes_a, no, boxes_c, no, h, w, 0.7).sum() == 2 * h * (w - 1) + h
    # a mirrored view b: its column c lies at original column w-1-c
    yes = torch.tensor([True])
    pos_f = geometric_positives(boxes_a, no, boxes_a, yes, h, w, 0.1)[0]
    exp = torch.zeros(h * w, h * w, dtype=torch.bool)
    for r in range(h):
        for c in range(w):
            exp[r * w + c, r * w + (w - 1 - c)] = True
    assert torch.equal(pos_f, exp)
    # the identical view: the diagonal
    assert torch.equal(geometric_positives(boxes_a, no, boxes_a, no, h, w, 0.1)[0], torch.eye(h * w, dtype=torch.bool))


def test_feature_top1_positive_picks_most_similar_pair():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 3, 3, generator=g)
    b = torch.randn(2, 16, 3, 3, generator=g)
    b[0, :, 2, 1] = a[0, :, 0, 2] * 3.0        # same direction: cosine 1
    b[1, :, 0, 0] = a[1, :, 1, 1]
    m = feature_top1_positive(a, b)
    assert m.sum((1, 2)).tolist() == [1, 1]
    assert m[0, 0 * 3 + 2, 2 * 3 + 1] and m[1, 4, 0]


def test_pair_loss_terms():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 8, 3, 3, generator=g)
    pos = torch.eye(9, dtype=torch.bool)[None].repeat(2, 1, 1)
    assert pair_loss(y, y * 2, pos).item() == pytest.approx(-1.0, abs=1e-5)
    assert pair_loss(y, -y, pos).item() == pytest.approx(1.0, abs=1e-5)
    # only positives count: a random z on non-positive cells does not change the loss
    z = y.clone()
    z2 = z.clone()
    off = torch.zeros_like(pos)
    off[:, 0, 0] = True
    z2[:, :, 1:, :] = torch.randn(2, 8, 2, 3, generator=g)
    assert pair_loss(y, z, off).item() == pytest.approx(pair_loss(y, z2, off).item(), abs=1e-6)


def test_pair_loss_sum_and_mean_weightings_match_hand_computed_values():
    """Two images, 1 x 1 feature maps of 2 cells: image 0 has two positive pairs (cos 1 and 0),
    image 1 one (cos -1). Eq. 1 sums per image: -(1 + 0), -(-1) -> batch mean 0; per-image mean:
    -(1 + 0) / 2, 1 -> 0.25."""
    y = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 1.0]], [[0.0, 0.0]]]])   # (2, C=2, 1, 2)
    z = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]], [[[-1.0, 0.0]], [[0.0, 1.0]]]])
    # y cells: img0 (1,0),(0,1); img1 (1,0),(1,0). z cells: img0 (1,0),(0,0); img1 (-1,0),(0,1)
    pos = torch.zeros(2, 2, 2, dtype=torch.bool)
    pos[0, 0, 0] = True      # cos((1,0),(1,0)) = 1
    pos[0, 1, 0] = True      # cos((0,1),(1,0)) = 0
    pos[1, 0, 0] = True      # cos((1,0),(-1,0)) = -1
    assert pair_loss(y, z, pos, "sum").item() == pytest.approx((-1.0 + 1.0) / 2, abs=1e-5)
    assert pair_loss(y, z, pos, "mean").item() == pytest.approx((-0.5 + 1.0) / 2, abs=1e-5)


def test_ppm_propagates_by_clamped_cosine_to_the_power_gamma_hand_computed():
    """PixPro's PPM: y_i = Σ_j max(cos(x_i, x_j), 0)^γ · T(x_j). Three cells x0 = (1, 0), x1 = (1, 1),
    x2 = (-1, 0): cos(x0, x1) = 1/√2, the other pairs are negative and drop out. With T(x) = 2x + 1
    (hand-set 1x1 convolution) and γ = 2: s01 = 1/2."""
    ppm = PPM(2, gamma=2.0, layers=1)
    with torch.no_grad():
        ppm.transform.weight.copy_(2 * torch.eye(2).view(2, 2, 1, 1))
        ppm.transform.bias.fill_(1.0)
    x = torch.tensor([[1.0, 1.0, -1.0], [0.0, 1.0, 0.0]]).view(1, 2, 1, 3)
    t0, t1, t2 = torch.tensor([3.0, 1.0]), torch.tensor([3.0, 3.0]), torch.tensor([-1.0, 1.0])
    expected = torch.stack([t0 + 0.5 * t1, 0.5 * t0 + t1, t2], 1).view(1, 2, 1, 3)
    torch.testing.assert_close(ppm(x), expected)
    ppm.gamma = 1.0                                                   # γ = 1: s01 = 1/√2
    s = 1 / np.sqrt(2)
    expected = torch.stack([t0 + s * t1, s * t0 + t1, t2], 1).view(1, 2, 1, 3)
    torch.testing.assert_close(ppm(x), expected)


def _loss_on_fixed_views(**cfg):
    cfg = DS2Config(**{**TINY, "batch_size": 2, **cfg})
    gen = torch.Generator().manual_seed(0)
    (v1, v2), (g1, g2) = make_batch_views(torch.rand(2, 3, 64, 64, generator=gen), gen, cfg)
    net = DS2Net(cfg, seed=0)
    with torch.no_grad():
        return net, net(v1, v2, g1, g2, (64, 64))


def test_loss_averages_the_scales_and_reads_scales_and_feature_pair():
    """Eq. 3: the loss is the mean over the configured scales of the per-scale (symmetrised) pair
    losses; ``scales`` decides which stages enter, and ``feature_pair: false`` (PixPro) drops
    the top-1 feature pair: fewer positives (at most one per image and direction), another loss."""
    net, (total, stats) = _loss_on_fixed_views(scales=["layer3", "layer4"])
    assert set(net.projectors) == {"layer3", "layer4"}
    assert total.item() == pytest.approx((stats["loss_layer3"] + stats["loss_layer4"]) / 2, rel=1e-6)
    assert stats["loss_layer3"] != pytest.approx(stats["loss_layer4"], rel=1e-3)   # the mean is not one term
    _, (total4, stats4) = _loss_on_fixed_views(scales=["layer4"])
    assert {k for k in stats4 if k.startswith("loss_")} == {"loss_layer4"}
    assert total4.item() == pytest.approx(stats4["loss_layer4"], rel=1e-6)
    _, (total24, stats24) = _loss_on_fixed_views(scales=["layer2", "layer4"])
    assert {k for k in stats24 if k.startswith("loss_")} == {"loss_layer2", "loss_layer4"}
    assert total24.item() != pytest.approx(total.item(), rel=1e-4)
    _, (total_px, stats_px) = _loss_on_fixed_views(scales=["layer3", "layer4"], feature_pair=False)
    for s in ("layer3", "layer4"):
        extra = stats[f"positives_{s}"] - stats_px[f"positives_{s}"]
        assert 0 < extra <= 1.0, (s, extra)                       # per image, averaged over both directions
    assert total_px.item() != pytest.approx(total.item(), rel=1e-4)


def test_momentum_branch_gets_no_gradients_and_ema_moves_it():
    cfg = DS2Config(**TINY)
    net = DS2Net(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    (v1, v2), (g1, g2) = make_batch_views(torch.rand(4, 3, 96, 96, generator=gen), gen, cfg)
    loss, stats = net(v1, v2, g1, g2, (96, 96))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in net.backbone_m.parameters())
    assert all(p.grad is None for p in net.projectors_m.parameters())
    assert all(p.grad is not None for n, p in net.backbone.named_parameters() if not n.startswith("fc."))
    assert net.ppm.transform.weight.grad.abs().sum() > 0
    assert stats["positives_layer3"] >= 1 and stats["positives_layer4"] >= 1   # ≥ the top-1 pair per image
    opt = torch.optim.SGD(net.online_parameters(), lr=0.5)
    opt.step()
    before = [p.clone() for p in net.backbone_m.parameters()]
    dist0 = sum(float((pm - po).detach().norm()) for pm, po in zip(net.backbone_m.parameters(), net.backbone.parameters()))
    net.momentum_update(0.9)
    after = list(net.backbone_m.parameters())
    dist1 = sum(float((pm - po).detach().norm()) for pm, po in zip(after, net.backbone.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert dist1 == pytest.approx(0.9 * dist0, rel=1e-3)


def test_ledoit_wolf_matches_sklearn():
    sk = pytest.importorskip("sklearn.covariance")
    x = torch.randn(50, 20, generator=torch.Generator().manual_seed(0)).double()
    mean, cov, shrink = ledoit_wolf(x)
    ref = sk.LedoitWolf().fit(x.numpy())
    assert shrink == pytest.approx(ref.shrinkage_, rel=1e-6)
    assert np.allclose(cov.numpy(), ref.covariance_, atol=1e-10)


def test_receptive_field_upsampling():
    flat = receptive_field_upsample(torch.full((1, 5, 5), 3.0), 8, 4, 4.0)
    assert flat.shape == (1, 24, 24) and torch.allclose(flat, torch.full_like(flat, 3.0))
    s = torch.zeros(1, 5, 5)
    s[0, 2, 3] = 1.0
    m = receptive_field_upsample(s, 8, 4, 2.0)[0]
    r, c = divmod(int(m.argmax()), m.shape[1])
    assert abs(r - (2 * 4 + 3.5)) <= 1 and abs(c - (3 * 4 + 3.5)) <= 1    # peak at that patch's centre


def test_loss_decreases_on_demo(tiny_demo):
    from defectlab.data import scan_category

    paths = [s.path for c in ("grain", "board") for s in scan_category(tiny_demo, c).train]
    cfg = DS2Config(**{**TINY, "epochs": 100, "max_steps": 16})
    net, st = train_ds2(cfg, paths, image_size=64, seed=0, device=torch.device("cpu"))
    assert st["steps"] == 16
    assert st["loss_last"] < st["loss_first"] - 0.05, st


def test_interrupted_pretraining_resumes_to_the_uninterrupted_result(tiny_demo, tmp_path, monkeypatch):
    """An interrupted DS2 run resumes from its checkpoint (same final weights as one run); a run
    with other settings does not pick that checkpoint up; the checkpoint is gone once done."""
    from defectlab.data import scan_category

    paths = [s.path for s in scan_category(tiny_demo, "grain").train]
    cfg = DS2Config(**{**TINY, "epochs": 100, "max_steps": 6, "checkpoint_every": 2})
    cpu = torch.device("cpu")
    ref, _ = train_ds2(cfg, paths, image_size=64, seed=0, device=cpu, work_dir=tmp_path / "a")
    assert not list((tmp_path / "a").glob("*"))

    calls = {"n": 0}
    real = DS2Net.momentum_update

    def dies_in_step_4(self, m):                  # the 4th optimiser step "crashes"
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real(self, m)

    monkeypatch.setattr(DS2Net, "momentum_update", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_ds2(cfg, paths, image_size=64, seed=0, device=cpu, work_dir=tmp_path / "b")
    assert len(list((tmp_path / "b").glob("ds2-*.ckpt.pt"))) == 1           # saved after step 2
    def counting(self, m):
        calls["n"] += 1
        real(self, m)

    monkeypatch.setattr(DS2Net, "momentum_update", counting)
    calls["n"] = 0
    other, _ = train_ds2(cfg.model_copy(update={"lr": cfg.lr * 2}), paths, image_size=64, seed=0, device=cpu,
                         work_dir=tmp_path / "b")
    assert calls["n"] == 6                                              # other inputs: trained from step 0
    assert not list((tmp_path / "b").glob("*.ckpt.pt"))                 # and the stale checkpoint is gone
    monkeypatch.setattr(DS2Net, "momentum_update", dies_in_step_4)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        train_ds2(cfg, paths, image_size=64, seed=0, device=cpu, work_dir=tmp_path / "b")
    monkeypatch.setattr(DS2Net, "momentum_update", counting)
    calls["n"] = 0
    resumed, _ = train_ds2(cfg, paths, image_size=64, seed=0, device=cpu, work_dir=tmp_path / "b")
    assert calls["n"] == 4                                              # resumed after step 2
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), other.state_dict().values()))


@pytest.fixture(scope="module")
def pretrained(tiny_demo, tmp_path_factory):
    from defectlab.methods.base import PretrainContext

    out = tmp_path_factory.mktemp("ds2pre")
    cfg = DS2Config(**{**TINY, "epochs": 1, "max_steps": 4})
    stats = DS2.pretrain(cfg, PretrainContext(dataset="demo", data_root=tiny_demo, categories=["grain", "board"],
                                             out_dir=out, image_size=64, seed=0, device=torch.device("cpu"),
                                             progress=False))
    return out, stats


def test_pretrain_checkpoint_loads_as_ds2_weights(pretrained):
    from defectlab.backbones import build_backbone, load_state_dict

    out, stats = pretrained
    assert stats["steps"] == 4 and stats["images"] == 32
    model = build_backbone("resnet18", f"ds2:{out / 'backbone.safetensors'}")
    ref = load_state_dict(out / "backbone.safetensors")
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], ref["layer4.1.conv2.weight"])
    rand = build_backbone("resnet18", "random", seed=0)
    assert not torch.equal(rand.state_dict()["layer4.1.conv2.weight"], ref["layer4.1.conv2.weight"])
    assert (out / "heads.safetensors").exists()


def _score(model, data, size):
    from defectlab.methods.base import make_loader

    return model.predict_loader(make_loader(data.test, size, 8))


def test_gde_detects_planted_defects_and_roundtrips(pretrained, tiny_demo, tmp_path):
    """The GDE head on a ds2 checkpoint: loading, patch counts, detection, save/load. The backbone
    is pretrained for 4 steps only, so it stays close to its random start: this checks the head
    and the checkpoint plumbing, not the quality of DS2 pretraining (the positive-pair, loss and
    PPM tests above cover its mechanism). A longer pretraining would not make it one: on the
    demo's weave / grain at 64 px, 30 AdamW steps raise the GDE image AUROC from 0.54 / 0.88
    (random weights) to 0.75 / 0.96 (seed 0; 0.68 / 0.94 with seed 1), but a DS2 whose geometric
    positives are shuffled across the images of the batch reaches 0.75 / 0.92 as well: any
    augmentation-invariance training helps there, so such a test would pass a broken DS2."""
    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext
    from defectlab.metrics import image_metrics, pixel_metrics

    out, _ = pretrained
    data = scan_category(tiny_demo, "grain")
    model = DS2(DS2Config(**TINY))
    st = model.fit(FitContext(dataset="demo", category="grain", data=data, image_size=64, seed=0,
                              device=torch.device("cpu"), pretrain_dir=out, progress=False))
    assert st["n_train_patches"] == 16 * 13 * 13
    assert model.meta["backbone_source"].endswith("backbone.safetensors")
    res = _score(model, data, 64)
    assert res["maps"].shape[1:] == (64, 64)
    img = image_metrics(res["labels"], res["scores"])["image_auroc"]
    pix = pixel_metrics(res["masks"], res["maps"])["pixel_auroc"]
    assert img > 0.8 and pix > 0.8, (img, pix)
    model.save(tmp_path / "m")
    loaded = DS2.load(tmp_path / "m")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    s0, m0 = model.predict(x)
    s1, m1 = loaded.predict(x)
    assert torch.equal(s0, s1) and torch.equal(m0, m1)


def test_random_weights_skip_checkpoint(tiny_demo, tmp_path):
    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext

    data = scan_category(tiny_demo, "grain")
    model = DS2(DS2Config(**{**TINY, "weights": "random"}))
    # a pretrain_dir without a checkpoint is fine: weights=random never reads it
    model.fit(FitContext(dataset="demo", category="grain", data=data, image_size=64, seed=0,
                         device=torch.device("cpu"), pretrain_dir=tmp_path, progress=False))
    assert model.meta["backbone_source"] == "random"
    with pytest.raises(Exception, match="no DS2 backbone"):
        DS2(DS2Config(**TINY)).fit(FitContext(dataset="demo", category="grain", data=data, image_size=64, seed=0,
                                              device=torch.device("cpu"), pretrain_dir=tmp_path, progress=False))


def test_a_ds2_checkpoint_missing_backbone_weights_is_refused_naming_the_file(tiny_demo, tmp_path):
    from safetensors.torch import save_file

    from defectlab.backbones import build_backbone
    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext

    state = {k: v for k, v in build_backbone("resnet18", "random", seed=0).state_dict().items()
             if not k.startswith("layer4.")}                     # e.g. a checkpoint of a truncated network
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "backbone.safetensors"))
    ctx = FitContext(dataset="demo", category="grain", data=scan_category(tiny_demo, "grain"), image_size=64, seed=0,
                     device=torch.device("cpu"), pretrain_dir=tmp_path, progress=False)
    with pytest.raises(Exception, match=r"backbone\.safetensors: does not match resnet18 \(missing \['layer4"):
        DS2(DS2Config(**TINY)).fit(ctx)


def test_benchmark_trains_the_ds2_backbone_at_the_profiles_backbone_settings(tiny_demo, tmp_path, monkeypatch):
    """`defectlab benchmark --method ds2` trains what the `backbone` stage would (params
    ``backbone.ds2`` at the profile), not the DS2 config's defaults (400 epochs at 224 px crops)."""
    from pathlib import Path

    import defectlab.methods.ds2 as ds2_module
    from defectlab import pipeline
    from defectlab.config import Params

    class Stop(Exception):
        pass

    seen = {}

    def fake_train(cfg, paths, **kwargs):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(ds2_module, "train_ds2", fake_train)
    params = Params.load(Path(__file__).resolve().parents[1] / "params.yaml")
    want = params.section("backbone", "ds2", ds2_module.DS2Config)
    _, method_cfg = pipeline.load_method_config(params, "ds2")
    assert (method_cfg.epochs, method_cfg.crop_size) != (want.epochs, want.crop_size)   # the two differ
    with pytest.raises(Stop):
        pipeline.benchmark(params, "ds2", tiny_demo, "weave", tmp_path / "out", image_size=64, progress=False)
    assert seen["cfg"] == want
    assert not (tmp_path / "out").exists()                                   # nothing partial left


def test_color_aug_jitter_is_the_full_pipeline_without_grayscale_blur_solarize(monkeypatch):
    """Sec. 4.4(c): ``color_aug: jitter`` keeps colour jitter only. With every augmentation certain
    (p = 1), ``full`` turns a colourful batch grey; ``jitter`` gives exactly the jitter stage of the
    full pipeline (same generator, grayscale/blur/solarize at p = 0) and keeps colour; ``none``
    never calls the colour augmentation; the boolean forms still validate."""
    import defectlab.methods.ds2 as ds2

    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    certain = dict(jitter_p=1.0, grayscale_p=1.0, blur_p=[1.0, 1.0], solarize_p=[0.0, 0.0])
    full = ds2.color_augment(x, torch.Generator().manual_seed(1), DS2Config(color_aug="full", **certain), 0)
    assert torch.allclose(full[:, 0], full[:, 1]) and torch.allclose(full[:, 1], full[:, 2])    # grayscale applied
    jitter = ds2.color_augment(x, torch.Generator().manual_seed(1), DS2Config(color_aug="jitter", **certain), 0)
    jitter_stage = ds2.color_augment(x, torch.Generator().manual_seed(1),
                                     DS2Config(color_aug="full", jitter_p=1.0, grayscale_p=0.0, blur_p=[0.0, 0.0],
                                               solarize_p=[0.0, 0.0]), 0)
    assert torch.equal(jitter, jitter_stage)
    assert not torch.allclose(jitter, x, atol=1e-3)                                     # the jitter itself ran
    assert (jitter[:, 0] - jitter[:, 1]).abs().mean() > 0.05                            # still in colour

    def forbidden(*a, **kw):
        raise AssertionError("color_augment called with color_aug: none")

    monkeypatch.setattr(ds2, "color_augment", forbidden)
    views, _ = ds2.make_batch_views(x, torch.Generator().manual_seed(2), DS2Config(color_aug="none", crop_size=8))
    assert views[0].shape == (4, 3, 8, 8)
    assert DS2Config(color_aug=True).color_aug == "full" and DS2Config(color_aug=False).color_aug == "none"
    with pytest.raises(ValueError, match="color_aug"):
        DS2Config(color_aug="light")


def test_paper_profile_uses_jitter_only_colour_augmentation():
    """params.yaml: backbone.ds2.paper follows Sec. 4.4(c) (jitter only); smoke/default keep PixPro's set."""
    from pathlib import Path

    from defectlab.config import Params

    got = {p: Params.load(Path(__file__).parents[1] / "params.yaml", profile=p).section("backbone", "ds2", DS2Config).color_aug
           for p in ("smoke", "default", "paper")}
    assert got == {"smoke": "full", "default": "full", "paper": "jitter"}
