"""Method registry: a name maps to the module and class implementing it (imported lazily)."""

from __future__ import annotations

import importlib

from defectlab.errors import ConfigError

REGISTRY: dict[str, str] = {
    "patchcore": "defectlab.methods.patchcore:PatchCore",
    "padim": "defectlab.methods.padim:PaDiM",
    "ds2": "defectlab.methods.ds2:DS2",
    "msp_svdd": "defectlab.methods.msp_svdd:MultiScalePatchSVDD",
    "slsg": "defectlab.methods.slsg:SLSG",
    "dsr": "defectlab.methods.dsr:DSR",
    "apc": "defectlab.methods.apc:APC",
}


def get_method(name: str):
    """Return the AnomalyMethod subclass registered under ``name``."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
