"""defectlab: reproducible training and evaluation of industrial visual anomaly detectors."""

__version__ = "0.1.0"
