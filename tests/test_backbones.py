import pytest
import torch
from safetensors.torch import save_file

from defectlab.backbones import (FeatureExtractor, backbone_for_fit, build_backbone, extractor_from_state,
                                 extractor_state, load_state_dict, save_backbone)
from defectlab.errors import ConfigError, ResourceMissingError


def test_random_weights_are_seeded():
    a = build_backbone("resnet18", "random", seed=1).conv1.weight
    b = build_backbone("resnet18", "random", seed=1).conv1.weight
    c = build_backbone("resnet18", "random", seed=2).conv1.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_feature_extractor_returns_requested_layers():
    fx = FeatureExtractor(build_backbone("resnet18"), ["layer2", "layer3"])
    out = fx(torch.zeros(2, 3, 64, 64))
    assert set(out) == {"layer2", "layer3"}
    assert out["layer2"].shape == (2, 128, 8, 8) and out["layer3"].shape == (2, 256, 4, 4)
    with pytest.raises(ConfigError, match="not in backbone"):
        FeatureExtractor(build_backbone("resnet18"), ["layer9"])


def test_feature_extractor_runs_channels_last_with_the_networks_own_values(tmp_path):
    """The extractor computes NHWC (faster on CPU) and returns the maps the network's own NCHW
    forward gives; its saved tensors are row-major (safetensors refuses strided ones) and a model
    rebuilt from them, whose weights arrive row-major, is switched again at its first forward."""
    model = build_backbone("resnet18", "random", seed=0).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        ref = model.layer2(model.layer1(h))
    fx = FeatureExtractor(build_backbone("resnet18", "random", seed=0), ["layer2"]).eval()
    out = fx(x)["layer2"]
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-4)
    state = extractor_state(fx)
    assert all(t.is_contiguous() for t in state.values())
    save_file(state, tmp_path / "fx.safetensors")
    rebuilt = extractor_from_state("resnet18", ["layer2"], state)
    assert rebuilt(x)["layer2"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(rebuilt(x)["layer2"], out)


def _random_batch_norms(model, seed):
    """Batch-norm statistics and affine terms far from the identity a fresh network starts with."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g))
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.randn(n, generator=g))
            mod.bias.data.copy_(torch.randn(n, generator=g))
    return model


def test_eval_forward_folds_batch_norms_and_follows_weight_changes():
    """In eval mode the extractor runs a copy with every batch norm folded into its convolution:
    the same maps as the unfolded body, no BatchNorm left in the copy, nothing added to the saved
    state, and the copy is rebuilt when the body's tensors change in place or are replaced."""
    model = _random_batch_norms(build_backbone("resnet18", "random", seed=0), 1).eval()
    fx = FeatureExtractor(model, ["layer1", "layer2"]).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def check():
        with torch.no_grad():
            ref = fx.body(x)
        out = fx(x)
        for k in ref:
            assert torch.allclose(out[k], ref[k], rtol=1e-4, atol=1e-4 * ref[k].abs().max().item()), k

    check()
    folded = fx.inference_body()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fx.body.modules())
    assert fx.inference_body() is folded                                  # cached while nothing changes
    assert not any("_inference" in k for k in fx.state_dict())
    with torch.no_grad():
        fx.body.get_submodule("layer1.0.bn1").running_mean.add_(3.0)     # in place
    check()
    fx.body.load_state_dict(_random_batch_norms(build_backbone("resnet18", "random", seed=5), 2).state_dict(),
                            strict=False)                                 # copied into the same tensors
    check()
    rebuilt = extractor_from_state("resnet18", ["layer1", "layer2"], extractor_state(fx))   # new tensors
    assert torch.equal(rebuilt(x)["layer2"], fx(x)["layer2"])


def test_weights_from_file_and_ds2_roundtrip(tmp_path):
    model = build_backbone("resnet18", "random", seed=3)
    path = tmp_path / "models/ds2/demo/pretrain/backbone.safetensors"
    path.parent.mkdir(parents=True)
    save_backbone(model, path, "resnet18")
    loaded = build_backbone("resnet18", str(path))
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)
    loaded = build_backbone("resnet18", f"ds2:{path}")
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)
    fx = FeatureExtractor(loaded, ["layer1"])
    again = extractor_from_state("resnet18", ["layer1"], extractor_state(fx))
    assert torch.equal(again.body.conv1.weight, fx.body.conv1.weight)


def _mlp(dims):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [torch.nn.Linear(a, b, bias=False), torch.nn.BatchNorm1d(b)]
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU(inplace=True))
    return torch.nn.Sequential(*layers)


def test_official_moco_v3_checkpoint_is_read_as_released(tmp_path):
    """A checkpoint with the layout of the MoCo v3 release (facebookresearch/moco-v3: main_moco.py
    saves {epoch, arch, state_dict, optimizer, scaler} of the DDP-wrapped MoCo model, whose base and
    momentum encoders are ResNets with ``fc`` replaced by the projection MLP, plus a predictor):
    ``weights: <that file>`` loads the base encoder, not the momentum encoder, and the projection
    head is dropped. A checkpoint of another network stops with the keys that do not match; one
    saved from DataParallel (keys under ``module.``) loads as the network."""
    base = build_backbone("resnet18", "random", seed=1)
    momentum = build_backbone("resnet18", "random", seed=2)
    for enc in (base, momentum):
        enc.fc = _mlp([512, 64, 16])
    moco = torch.nn.Module()
    moco.base_encoder, moco.momentum_encoder, moco.predictor = base, momentum, _mlp([16, 64, 16])
    state = {"module." + k: v for k, v in moco.state_dict().items()}
    path = tmp_path / "r-18-fake.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.6, "params": [0, 1]}]}, "scaler": {"scale": 1.0}}, path)
    loaded = build_backbone("resnet18", str(path))
    for name, tensor in loaded.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, base.state_dict()[name]), name
    assert not torch.equal(loaded.conv1.weight, momentum.conv1.weight)
    with pytest.raises(ResourceMissingError, match="does not match resnet50"):
        build_backbone("resnet50", str(path))
    # a network saved from inside (Distributed)DataParallel: every key under "module."
    plain = build_backbone("resnet18", "random", seed=4)
    torch.save({"module." + k: v for k, v in plain.state_dict().items()}, tmp_path / "dp.pth")
    assert torch.equal(build_backbone("resnet18", str(tmp_path / "dp.pth")).layer4[1].conv2.weight,
                       plain.layer4[1].conv2.weight)


def test_networks_rebuilt_from_saved_tensors_skip_initialisation_but_hold_every_tensor(tmp_path):
    """backbone_for_fit / extractor_from_state build on the meta device and assign the saved
    tensors: same outputs as the saved network, nothing left on the meta device."""
    model = build_backbone("resnet18", "random", seed=5)
    save_backbone(model, tmp_path / "backbone.safetensors", "resnet18")
    x = torch.randn(2, 3, 48, 48)
    rebuilt = backbone_for_fit("resnet18", "random", tmp_path, seed=0)
    assert torch.equal(rebuilt(x), model.eval()(x))
    fx = FeatureExtractor(model, ["layer2", "layer3"])
    again = extractor_from_state("resnet18", ["layer2", "layer3"], extractor_state(fx))
    assert all(torch.equal(again(x)[k], fx(x)[k]) for k in ("layer2", "layer3"))
    for net in (rebuilt, again):
        assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    state = load_state_dict(tmp_path / "backbone.safetensors")
    del state["layer1.0.bn1.running_var"]
    save_file(state, str(tmp_path / "backbone.safetensors"))
    with pytest.raises(ResourceMissingError, match="backbone.safetensors: does not hold a resnet18"):
        backbone_for_fit("resnet18", "random", tmp_path)


def test_missing_or_malicious_weights_give_one_clear_error(tmp_path):
    with pytest.raises(ResourceMissingError, match="DS2 checkpoint not found"):
        build_backbone("resnet18", "ds2", dataset="nowhere")
    with pytest.raises(ResourceMissingError, match="not found"):
        build_backbone("resnet18", str(tmp_path / "x.pt"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ResourceMissingError, match="not a loadable weights file"):
        load_state_dict(bad)
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_backbone("alexnet9")


def test_imagenet_offline_says_how_to_provide_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ResourceMissingError, match=r"download.pytorch.org.*copy it to"):
        build_backbone("resnet18", "imagenet")
