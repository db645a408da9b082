from pathlib import Path

import pytest
import yaml

from defectlab.config import Params
from defectlab.errors import ConfigError
from defectlab.methods import get_method

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_validate_for_every_profile_and_method():
    for profile in ("smoke", "default", "paper"):
        p = Params.load(ROOT / "params.yaml", profile=profile)
        for name in p.run.methods:
            cls = get_method(name)
            assert isinstance(p.method(name, cls.Config), cls.Config)
        for ds in p.run.datasets:
            assert p.dataset(ds).categories


def test_profile_overrides_common(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = Params(raw)
    assert p.profiled("methods", "patchcore")["backbone"] == "resnet18"
    raw["profile"] = "paper"
    assert Params(raw).profiled("methods", "patchcore")["backbone"] == "wide_resnet50_2"


def test_malformed_value_names_the_key(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["methods"]["patchcore"]["smoke"]["coreset_ratio"] = "lots"
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    p = Params.load(f)
    with pytest.raises(ConfigError, match=r"methods\.patchcore\.coreset_ratio"):
        p.method("patchcore", get_method("patchcore").Config)


def test_unknown_names_list_valid_ones(tmp_path):
    p = Params.load(ROOT / "params.yaml")
    with pytest.raises(ConfigError, match="valid: .*patchcore"):
        get_method("patchcoer")
    with pytest.raises(ConfigError, match="demo"):
        p.dataset("nope")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = "fast"
    with pytest.raises(ConfigError, match="profile"):
        Params(raw)
    raw["profile"] = "smoke"
    raw["methods"]["patchcore"]["smoke"]["coreset_ratioo"] = 0.1
    with pytest.raises(ConfigError, match="coreset_ratioo"):
        Params(raw).method("patchcore", get_method("patchcore").Config)
