import pytest
import torch

from defectlab.backbones import (FeatureExtractor, build_backbone, extractor_from_state, extractor_state,
                                 load_state_dict, save_backbone)
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
