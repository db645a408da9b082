"""SLSG: SG-block graph construction, loss terms, GPT-Net / SegNet training, save/load, detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlab.methods.slsg import (
    SLSG,
    SGBlock,
    SLSGConfig,
    inpainting_mask,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    max_relative_aggregate,
    positional_similarity,
    segnet_losses,
    sparse_neighbours,
    top_k_score,
)

from conftest import check_phase_reads

SIZE = 64
# small decoder / discriminator so the trainings fit the test budget on one CPU thread
TINY = dict(decoder_channels=[64, 32, 32, 16], head_channels=16, disc_width=16, sg_skip_channels=16, synth_n=48)


# ----------------------------------------------------------------------------- SG block
def _graph_features(seed: int = 0, h: int = 8, w: int = 8, c: int = 64):
    """Random node features, except: node A's right-hand neighbour is an exact copy of A (cosine 1),
    and a node in the far corner is a near-copy (cosine 0.9)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h * w, c, generator=g)
    a, neighbour, distant = 3 * w + 3, 3 * w + 4, 7 * w + 0
    x[neighbour] = x[a]
    orth = torch.randn(c, generator=g)
    orth -= (orth @ x[a]) / (x[a] @ x[a]) * x[a]
    x[distant] = 0.9 * x[a] / x[a].norm() + np.sqrt(1 - 0.81) * orth / orth.norm()
    return x[None], a, neighbour, distant


def test_positional_similarity_is_high_for_spatial_neighbours():
    p = positional_similarity(8, 8, 64)
    assert torch.allclose(p.diagonal(), torch.ones(64), atol=1e-5)
    assert torch.allclose(p, p.T, atol=1e-6)
    # similarity falls with distance: right-hand neighbour > two steps > far corner
    assert p[27, 28] > p[27, 29] > p[27, 56]
    assert p[27, 28] > 0.95 and p[27, 56] < p[27, 28] - 0.2


def test_graph_excludes_positionally_trivial_neighbours():
    x, a, neighbour, distant = _graph_features()
    cos = torch.nn.functional.cosine_similarity(x[0, a], x[0], dim=-1)
    assert cos[neighbour] > cos[distant] > 0.85        # the neighbour is the most similar node
    # purely semantic graph (W_d'): the copy next door (and A itself) come before the distant node
    semantic = sparse_neighbours(x, x, None, k=2)[0, a].tolist()
    assert neighbour in semantic and distant not in semantic
    # SLSG's W_s = CosSim - W_p: the distant near-copy becomes A's first neighbour; the copy next door
    # (and A itself) rank below it and are not picked with K = 1
    pos = positional_similarity(8, 8, 64)
    ranked = sparse_neighbours(x, x, pos, k=64)[0, a].tolist()
    assert ranked[0] == distant
    assert ranked.index(neighbour) > ranked.index(distant) and ranked[0] != a
    assert sparse_neighbours(x, x, pos, k=1)[0, a].tolist() == [distant]


def test_graph_on_smooth_feature_map_reaches_further():
    """On a spatially smooth map (neighbours alike everywhere) the K = 9 graph of W_s holds fewer
    adjacent nodes and reaches further than the purely semantic one."""
    g = torch.Generator().manual_seed(0)
    h = w = 8
    x = torch.nn.functional.interpolate(torch.randn(1, 64, 2, 2, generator=g), size=(h, w), mode="bilinear",
                                        align_corners=True) + 0.05 * torch.randn(1, 64, h, w, generator=g)
    nodes = x.flatten(2).transpose(1, 2)
    ys, xs = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dist = ((ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2).sqrt()
    semantic = torch.gather(dist, 1, sparse_neighbours(nodes, nodes, None, 9)[0])
    slsg = torch.gather(dist, 1, sparse_neighbours(nodes, nodes, positional_similarity(h, w, 64), 9)[0])
    assert slsg.mean() > semantic.mean() + 0.1
    assert (slsg <= 1.5).float().mean() < (semantic <= 1.5).float().mean() - 0.1


def test_max_relative_graph_convolution():
    nodes = torch.tensor([[[0.0, 1.0], [2.0, -1.0], [1.0, 5.0]]])   # (1, 3, 2)
    neighbours = torch.tensor([[[1, 2], [0, 2], [0, 1]]])            # (1, 3, 2)
    out = max_relative_aggregate(nodes, neighbours)
    # node 0: max(v1 - v0, v2 - v0) = max([2, -2], [1, 4]) = [2, 4]
    expected = torch.tensor([[[2.0, 4.0], [-1.0, 6.0], [1.0, -4.0]]])
    assert torch.allclose(out, expected)


def test_sg_block_shapes_graph_and_gradient():
    torch.manual_seed(0)
    block = SGBlock(32, knn=9, reduction=4, pos_dim=16)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    assert block.last_neighbours.shape == (2, 36, 9)
    y.square().mean().backward()
    assert block.f.weight.grad.abs().sum() > 0 and block.h.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def _sg_reference(block: SGBlock, x: torch.Tensor, use_pos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fig. 4 / Eq. 2-7 node by node, for one image (C, H, W) -> (X' (C, H, W), neighbours (N, K)),
    with the block's weights and a hand-written 2-D sine-cosine encoding for pos_dim 4
    (one frequency, ω = 1: P(y, x) = [sin y, cos y, sin x, cos x])."""
    c, hh, ww = x.shape
    nodes = [x[:, i // ww, i % ww] for i in range(hh * ww)]

    def conv1x1(conv, v):
        return conv.weight[:, :, 0, 0] @ v + (conv.bias if conv.bias is not None else 0)

    q = [conv1x1(block.f, v) for v in nodes]
    k = [conv1x1(block.g, v) for v in nodes]
    val = [conv1x1(block.h, v) for v in nodes]
    d = q[0].numel()
    pos = [torch.tensor([np.sin(i // ww), np.cos(i // ww), np.sin(i % ww), np.cos(i % ww)], dtype=torch.float32)
           for i in range(hh * ww)]
    cos = torch.nn.functional.cosine_similarity
    z, v2, nbrs = [], [], []
    for i in range(hh * ww):
        logits = torch.stack([q[i] @ k[j] / np.sqrt(d) for j in range(hh * ww)])
        w_d = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()      # Eq. 2
        z.append(sum(w_d[j] * val[j] for j in range(hh * ww)))                                # Eq. 3
        w_s = torch.stack([cos(q[i], k[j], dim=0) - (cos(pos[i], pos[j], dim=0) if use_pos else 0.0)
                           for j in range(hh * ww)])                                            # Eq. 4, 5
        top = sorted(range(hh * ww), key=lambda j: -w_s[j].item())[:block.knn]
        nbrs.append(top)
        v2.append(torch.stack([nodes[j] - nodes[i] for j in top]).amax(0))                     # Eq. 6
    zz = torch.stack(z, 1).reshape(c, hh, ww)
    vv = torch.stack(v2, 1).reshape(c, hh, ww)
    conv, bn = block.u[0], block.u[1]                                                           # Eq. 7
    cat = torch.cat([zz, vv]).reshape(2 * c, -1)
    out = conv.weight[:, :, 0, 0] @ cat
    out = (out - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    out = out * bn.weight[:, None] + bn.bias[:, None]
    return out.clamp_min(0).reshape(c, hh, ww), torch.tensor(nbrs)


@pytest.fixture
def seeded_locally():
    """Seed 0 inside, the global generator as it was afterwards: the module's trained fixture
    draws from the global generator, so these tests must not move it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def test_sg_block_matches_the_papers_equations_node_by_node(seeded_locally):
    """SGBlock.forward against Eq. 2-7 written out per node (dense attention on h(X), sparse graph
    from CosSim(f(X), g(X)ᵀ) − W_p, max-relative aggregation of the input nodes X, u on [Z', V'']).
    The case is one where W_p changes the graph, so a block that drops it, aggregates h(X)
    instead of X or leaves a branch out of u does not match."""
    block = SGBlock(6, knn=2, reduction=2, pos_dim=4).eval()
    with torch.no_grad():
        block.u[1].running_mean.uniform_(-0.2, 0.2)
        block.u[1].running_var.uniform_(0.5, 2.0)
        block.u[1].weight.uniform_(0.5, 1.5)
        block.u[1].bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 6, 2, 3)
    with torch.no_grad():
        y = block(x)
        for b in range(2):
            ref, nbrs = _sg_reference(block, x[b])
            torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=1e-4)
            assert torch.equal(block.last_neighbours[b].sort(-1).values, nbrs.sort(-1).values)
        # the case discriminates: without W_p the graph (and X') would differ
        _, nbrs_no_pos = _sg_reference(block, x[0], use_pos=False)
        assert not torch.equal(nbrs_no_pos.sort(-1).values, block.last_neighbours[0].sort(-1).values)


def test_segnet_decoder_reads_the_sg_block_output(seeded_locally):
    """X' reaches the decoder (as its bottleneck and, projected, in every decoder block): changing
    only the SG block's output changes the segmentation logits, through each path."""
    from defectlab.methods.slsg import SegNet

    # batch statistics (train-mode batch norm): at eval with fresh running statistics the
    # signal of a randomly initialised decoder fades to nothing
    net = SegNet(SLSGConfig(**TINY), __import__("torchvision").models.resnet18()).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base, _ = net(x)
        original, skip = net.sg.forward, net.sg_skip.forward
        # the bottleneck path alone: X' shifted, the projection into the decoder blocks sees the original
        net.sg.forward = lambda f: original(f) + 1.0
        net.sg_skip.forward = lambda f: skip(f - 1.0)
        bottleneck_only, _ = net(x)
        # the decoder-block path alone: X' unchanged, only its projection shifted
        net.sg.forward = original
        net.sg_skip.forward = lambda f: skip(f) + 1.0
        extra_only, _ = net(x)
    assert (bottleneck_only - base).abs().max() > 1e-3
    assert (extra_only - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------- losses and masks
def test_segnet_loss_terms_react():
    cfg = SLSGConfig()
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 10:30, 20:40] = 1
    aux_good = torch.logit(torch.nn.functional.adaptive_avg_pool2d(mask, (2, 2)).clamp(1e-4, 1 - 1e-4))
    right = segnet_losses((mask * 2 - 1) * 8, aux_good, mask, cfg)
    wrong = segnet_losses((1 - 2 * mask) * 8, -aux_good, mask, cfg)
    blank = segnet_losses(torch.full_like(mask, -8.0), torch.full((2, 1, 2, 2), -8.0), mask, cfg)
    for term in ("focal", "l1", "aux", "loss"):
        assert right[term] < blank[term] < wrong[term], term
    assert right["loss"] == pytest.approx(0.4 * right["focal"] + 0.6 * right["l1"] + 0.3 * right["aux"])
    # γ = 4 down-weights confident pixels far more than cross-entropy (γ = 0) does
    cfg0 = SLSGConfig(focal_gamma=0.0)
    mild = torch.full_like(mask, -2.0)
    assert segnet_losses(mild, aux_good, torch.zeros_like(mask), cfg)["focal"] < \
        0.05 * segnet_losses(mild, aux_good, torch.zeros_like(mask), cfg0)["focal"]


def test_lsgan_losses():
    ones, zeros = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert lsgan_generator_loss(ones) == 0 and lsgan_generator_loss(zeros) == pytest.approx(0.5)
    assert lsgan_discriminator_loss(zeros, ones) == 0          # D right on both
    assert lsgan_discriminator_loss(ones, zeros) == pytest.approx(1.0)


def test_inpainting_mask_hides_8_pixel_patches_by_default():
    """Sec. 4.4 / Tab. 4 "8-80 %": 8x8-pixel patches, 80 % of them hidden (32 x 32 patches at 256 px)."""
    m = inpainting_mask(16, 256, SLSGConfig(large_masks=0), torch.Generator().manual_seed(0))
    patches = torch.nn.functional.avg_pool2d(m, 8)
    assert patches.shape[-2:] == (32, 32) and set(patches.unique().tolist()) <= {0.0, 1.0}
    assert not set(torch.nn.functional.avg_pool2d(m, 16).unique().tolist()) <= {0.0, 1.0}   # not 16-px cells
    assert m.mean() == pytest.approx(0.8, abs=0.01)
    odd = inpainting_mask(2, 60, SLSGConfig(large_masks=0), torch.Generator().manual_seed(0))
    assert odd.shape == (2, 1, 60, 60)                 # a size that is no multiple of 8: border patches cut


def test_inpainting_mask_grid_and_large_masks():
    cfg = SLSGConfig(grid_cell=None, grid=8, grid_mask_ratio=0.8, large_masks=1)
    m = inpainting_mask(64, 64, cfg, torch.Generator().manual_seed(0))
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0.8 <= m.mean() < 0.95                      # 80 % of the cells + the large rectangles
    cells = torch.nn.functional.avg_pool2d(m, 8)       # grid cells are fully hidden or shown...
    no_large = inpainting_mask(64, 64, SLSGConfig(grid_cell=None, large_masks=0), torch.Generator().manual_seed(0))
    assert set(torch.nn.functional.avg_pool2d(no_large, 8).unique().tolist()) <= {0.0, 1.0}
    assert no_large.mean() == pytest.approx(0.8, abs=0.03)
    assert ((cells > 0) & (cells < 1)).any()           # ...unless a large rectangle cuts them


def test_top_k_score():
    maps = torch.zeros(2, 20, 20)
    maps[0, :5, :20] = 1.0   # 100 pixels at 1
    maps[1, 0, :50 // 5] = 1.0
    s = top_k_score(maps, 100)
    assert s[0] == pytest.approx(1.0) and s[1] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- synthesis + training
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from defectlab.data.demo import generate_demo

    root = tmp_path_factory.mktemp("slsg") / "demo"
    generate_demo(root, seed=0, image_size=SIZE, n_train=16, n_test_good=8, n_test_per_defect=3,
                  categories=["grain", "board"])
    return root


def test_synthesis_gives_both_kinds_with_masks(demo, tmp_path):
    """The cache SegNet trains on (the fallback cache fit builds) holds structural and logical
    anomalies, each with a non-empty mask on the object's foreground."""
    from PIL import Image

    from defectlab.data import scan_category
    from defectlab.synthesis import foreground_mask
    from defectlab.synthesis.cache import build_cache, load_cache, load_rgb

    data = scan_category(demo, "board")
    build_cache([s.path for s in data.train], tmp_path / "c", n=24, seed=0, image_size=SIZE,
                kinds={"structural": 0.5, "logical": 0.5}, object_kind="object")
    rows = load_cache(tmp_path / "c")
    assert {r["kind"] for r in rows} == {"structural", "logical"}
    for r in rows:
        mask = np.asarray(Image.open(r["mask"])) > 127
        assert mask.any()
        src = load_rgb(data.train[0].path.parent / r["source_image"], SIZE)
        assert (mask & ~foreground_mask(src, "object")).sum() <= 0.05 * mask.sum()
        changed = np.abs(load_rgb(r["image"], SIZE) - src).max(-1) > 2 / 255
        assert changed[mask].mean() > 0.3 and changed[~mask].mean() < 0.02


TRAIN_CFG = dict(**TINY, gpt_max_iters=16, gpt_batch=4, seg_iters=120, n_normal=2, n_anomalous=4,
                 optimizer="adam", seg_lr=3e-3, freeze_encoder=True, recalibrate_bn=True)   # the smoke recipe


def _ctx(data, pre, **kw):
    from defectlab.methods.base import FitContext

    return FitContext("demo", "grain", data, SIZE, 0, torch.device("cpu"), pretrain_dir=pre, progress=False,
                      extra={"object_kind": "texture"}, **kw)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """pretrain (GPT-Net) -> train (SegNet, saved as the `train` stage saves it) -> fit on a new
    instance that reads the train output back, as the DVC stages run them."""
    from defectlab.data import scan_category
    from defectlab.methods.base import PretrainContext
    from defectlab.pipeline import train_and_fit

    cfg = SLSGConfig(**TRAIN_CFG)
    pre = tmp_path_factory.mktemp("slsg_pre")
    with check_phase_reads(SLSG, "pretrain"):         # its stage depends on every field it reads
        pre_stats = SLSG.pretrain(cfg, PretrainContext("demo", demo, ["grain", "board"], pre, SIZE, 0,
                                                       torch.device("cpu"), progress=False))
    data = scan_category(demo, "grain")
    train_dir = tmp_path_factory.mktemp("slsg_train") / "grain"
    with check_phase_reads(SLSG, "train"):
        model, stats = train_and_fit(SLSG, cfg, _ctx(data, pre), train_dir)
    return model, data, pre, pre_stats, stats, train_dir


def test_gptnet_pretraining_loss_falls_and_writes_encoder(trained):
    from defectlab.backbones import load_state_dict

    _, _, pre, pre_stats, *_ = trained
    assert pre_stats["gpt_l1_last"] < 0.8 * pre_stats["gpt_l1_first"]
    assert pre_stats["gpt_loss_last"] < pre_stats["gpt_loss_first"]
    enc = load_state_dict(pre / "backbone.safetensors")
    assert "layer4.1.conv2.weight" in enc and (pre / "gptnet.safetensors").exists()


def test_segnet_loss_falls_and_uses_gptnet_encoder(trained):
    from defectlab.backbones import load_state_dict

    model, _, pre, _, stats, _ = trained
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
    assert stats["l1_last"] < stats["l1_first"]
    assert model.meta["encoder"] == "gptnet"
    # SegNet starts from the GPT-Net encoder (fine-tuned since, so only close to it)
    enc = load_state_dict(pre / "backbone.safetensors")
    w = model.net.encoder.conv1.weight.detach().cpu()
    assert torch.nn.functional.cosine_similarity(w.flatten(), enc["conv1.weight"].flatten(), dim=0) > 0.5


def test_save_load_round_trip(trained, tmp_path):
    from defectlab.methods.base import make_loader

    model, data, *_ = trained
    model.save(tmp_path / "m")
    loaded = SLSG.load(tmp_path / "m")
    batch = next(iter(make_loader(data.test, SIZE, 6)))["image"]
    s1, m1 = model.predict(batch)
    s2, m2 = loaded.predict(batch)
    assert m1.shape == (6, SIZE, SIZE)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(m1, m2)


def test_detects_planted_defects(trained):
    """The smoke recipe on demo 'grain' (8 good + 24 defective test images at 64 px). Measured over
    4 seeds x 1 and 2 torch threads (the float order changes the training): pixel AUROC 0.90-0.98,
    image AUROC 0.60-0.98 (8 good images make it coarse). The pixel AUROC carries the claim; the
    image AUROC is only asserted above chance, so the test passes at any thread count."""
    from defectlab.methods.base import make_loader
    from defectlab.metrics import compute_all

    model, data, *_ = trained
    r = model.predict_loader(make_loader(data.test, SIZE, 8))
    m = compute_all(r["labels"], r["scores"], r["masks"], r["maps"])
    assert m["pixel_auroc"] > 0.85, m
    assert m["image_auroc"] > 0.55, m


@pytest.mark.slow
def test_detects_logical_and_structural_defects_on_an_object_category(trained, demo, tmp_path):
    """On 'board' (an object category with logical defects: missing, extra or swapped parts),
    SegNet trained on structural + logical synthetic anomalies from the same GPT-Net (the smoke
    recipe): logical defects are detected above chance (image AUROC of the good images against
    the logical defects: 0.77 measured, > 0.65 asserted; structural 0.49 on this draw, not
    asserted). ~2 min CPU with the fixture it shares."""
    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext, make_loader
    from defectlab.metrics import image_metrics
    from defectlab.pipeline import train_and_fit

    _, _, pre, *_ = trained
    data = scan_category(demo, "board")
    ctx = FitContext("demo", "board", data, SIZE, 0, torch.device("cpu"), pretrain_dir=pre, progress=False,
                     extra={"object_kind": "object"})
    model, _ = train_and_fit(SLSG, SLSGConfig(**TRAIN_CFG), ctx, tmp_path / "train")
    r = model.predict_loader(make_loader(data.test, SIZE, 8))
    kinds = np.asarray(r["kinds"])
    assert {"structural", "logical"} <= set(kinds.tolist())
    auroc = {}
    for kind in ("structural", "logical"):
        keep = (r["labels"] == 0) | (kinds == kind)
        auroc[kind] = image_metrics(r["labels"][keep], r["scores"][keep])["image_auroc"]
    assert auroc["logical"] > 0.65, auroc


# ----------------------------------------------------------------------------- train / fit split
def test_train_stage_output_and_fit_reproduces_predictions(trained):
    """`fit` in a new process (a fresh instance) only loads the `train` output: same predictions
    as the model train_and_fit returned, no training step run."""
    import json

    from defectlab.methods.base import make_loader

    model, data, pre, _, _, train_dir = trained
    assert SLSG.trains_per_category
    assert (train_dir / "trained.safetensors").exists()
    info = json.loads((train_dir / "trained.json").read_text())
    assert info["method"] == "slsg" and info["meta"]["encoder"] == "gptnet"
    assert info["meta"]["train"]["seg_steps"] == 120 and "loss_history" in info["meta"]

    fresh = SLSG(SLSGConfig(**TRAIN_CFG))
    fresh._train_segnet = None   # fit must not train: calling it would fail
    stats = fresh.fit(_ctx(data, pre, train_dir=train_dir))
    assert stats["seg_steps"] == 120
    batch = next(iter(make_loader(data.test, SIZE, 6)))["image"]
    s1, m1 = model.predict(batch)
    s2, m2 = fresh.predict(batch)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(m1, m2)
    # a predict-only setting may change without retraining; a training setting may not
    SLSG(SLSGConfig(**{**TRAIN_CFG, "top_k": 10})).fit(_ctx(data, pre, train_dir=train_dir))
    from defectlab.errors import ConfigError

    with pytest.raises(ConfigError, match="different slsg config"):
        SLSG(SLSGConfig(**{**TRAIN_CFG, "seg_iters": 121})).fit(_ctx(data, pre, train_dir=train_dir))


def test_fit_without_train_output_fails_clearly(demo, tmp_path):
    from defectlab.data import scan_category
    from defectlab.errors import ResourceMissingError

    data = scan_category(demo, "grain")
    with pytest.raises(ResourceMissingError, match="run the train stage"):
        SLSG(SLSGConfig(**TRAIN_CFG)).fit(_ctx(data, None))
    with pytest.raises(ResourceMissingError, match="trained.json missing"):
        SLSG(SLSGConfig(**TRAIN_CFG)).fit(_ctx(data, None, train_dir=tmp_path / "nothing"))


def test_recalibrate_encoder_bn_uses_normal_images(demo):
    """recalibrate_bn: the encoder's BN running statistics become those of the normal images
    (GPT-Net's are those of masked inputs); weights are unchanged."""
    from defectlab.backbones import build_backbone
    from defectlab.data import ImageDataset, scan_category

    model = SLSG(SLSGConfig(**TINY, recalibrate_bn=True, freeze_encoder=True))
    model._build(build_backbone("resnet18", "random", seed=0))
    w = model.net.encoder.conv1.weight.detach().clone()
    normal = ImageDataset(scan_category(demo, "grain").train, SIZE)   # 16 images: two batches of 8
    model._recalibrate_encoder_bn(normal)
    x = torch.stack([normal[i]["image"] for i in range(len(normal))])
    with torch.no_grad():
        pre_bn = model.net.encoder.conv1(x)
    torch.testing.assert_close(model.net.encoder.bn1.running_mean, pre_bn.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(model.net.encoder.conv1.weight, w) and not model.net.encoder.training


# ----------------------------------------------------------------------------- online synthesis
def test_online_synthesis_is_the_caches_stream_and_never_repeats(demo, tmp_path):
    """Sample k simulated online equals the cache's image k (same settings, read from its
    params.json); the stream goes on past the cache with new images only; a cache made from other
    normal images is refused, naming its params.json."""
    from defectlab.data import scan_category
    from defectlab.errors import DatasetError
    from defectlab.synthesis.cache import OnlineSynthDataset, SynthDataset, Synthesizer, build_cache

    paths = [s.path for s in scan_category(demo, "board").train]
    build_cache(paths, tmp_path / "c", n=4, seed=3, image_size=SIZE, kinds={"structural": 0.5, "logical": 0.5},
                object_kind="object")
    cached = SynthDataset(tmp_path / "c", SIZE)
    online = OnlineSynthDataset(Synthesizer.like_cache(tmp_path / "c", paths), SIZE, n=12)
    for k in range(4):
        assert torch.equal(online[k]["image"], cached[k]["image"]) and torch.equal(online[k]["mask"], cached[k]["mask"])
    images = torch.stack([online[k]["image"] for k in range(12)]).flatten(1)
    assert torch.cdist(images, images).add(torch.eye(12) * 1e9).min() > 1.0          # 12 different images
    with pytest.raises(DatasetError, match="params.json"):
        Synthesizer.like_cache(tmp_path / "c", paths[1:])


@pytest.mark.parametrize("synthesis", ["online", "cache"])
def test_segnet_run_draws_no_simulated_image_twice_online(synthesis, demo, tmp_path, monkeypatch):
    """A SegNet run of 4 steps x 2 simulated images with a 3-image cache: online, the 8 draws are 8
    different images (none seen twice); from the cache they must repeat, and the stats say so."""
    from defectlab.data import scan_category
    from defectlab.methods import slsg as slsg_module
    from defectlab.synthesis.cache import build_cache

    data = scan_category(demo, "grain")
    build_cache([s.path for s in data.train], tmp_path / "synth", n=3, seed=0, image_size=SIZE,
                kinds={"structural": 0.5, "logical": 0.5}, object_kind="texture")
    seen = []
    real_losses = slsg_module.segnet_losses

    def spy(logits, aux, mask, cfg):
        seen.append(mask[cfg.n_normal:].flatten(1).clone())        # the simulated images' masks, in draw order
        return real_losses(logits, aux, mask, cfg)

    monkeypatch.setattr(slsg_module, "segnet_losses", spy)
    cfg = SLSGConfig(**{**TRAIN_CFG, "seg_iters": 4, "n_normal": 1, "n_anomalous": 2, "synthesis": synthesis,
                        "recalibrate_bn": False})
    stats = SLSG(cfg).train(_ctx(data, None, synth_dir=tmp_path / "synth", work_dir=tmp_path / "work"))
    masks = torch.cat(seen)
    distinct = len({tuple(m.nonzero()[:, 0].tolist()) for m in masks})
    assert stats["synthetic_draws"] == 8 == masks.shape[0]
    if synthesis == "online":
        assert distinct == 8 and stats["synthetic_distinct"] == 8
    else:
        assert distinct <= 3 and stats["synthetic_distinct"] <= 3
