"""lightning-probes: reusable PyTorch Lightning callbacks that make the inside of training visible."""

from lightning_probes.callbacks import (
    ConfidenceMonitor,
    GradientDynamicsMonitor,
    GradientStatsMonitor,
    NoiseRobustnessMonitor,
)

__version__ = "0.1.0"
__all__ = [
    "ConfidenceMonitor",
    "GradientDynamicsMonitor",
    "GradientStatsMonitor",
    "NoiseRobustnessMonitor",
    "__version__",
]
