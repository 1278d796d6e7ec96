"""vitad: unsupervised industrial anomaly detection with frozen backbones, as a DVC pipeline."""

__version__ = "0.1.0"
