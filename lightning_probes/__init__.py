"""lightning-probes: reusable PyTorch Lightning callbacks that make the inside of training visible."""

from lightning_probes.callbacks import GradientStatsMonitor

__version__ = "0.1.0"
__all__ = ["GradientStatsMonitor", "__version__"]
