"""lightning-probes: reusable PyTorch Lightning callbacks that make the inside of training visible."""

from lightning_probes.callbacks import GradientDynamicsMonitor, GradientStatsMonitor

__version__ = "0.1.0"
__all__ = ["GradientDynamicsMonitor", "GradientStatsMonitor", "__version__"]
