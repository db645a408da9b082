"""defectlab: reproducible training and evaluation of industrial visual anomaly detectors.

``defectlab.load(model)`` -> a ``defectlab.inference.Detector`` for a model folder or an MLflow
model URI (imported lazily, so ``import defectlab`` stays light).
"""

__version__ = "0.1.0"


def load(model, device: str = "auto", cache_dir=None):
    """A Detector for a model folder or ``models:/<name>@<alias>`` (see defectlab.inference.load)."""
    from defectlab.inference import load as _load

    return _load(model, device=device, cache_dir=cache_dir)
