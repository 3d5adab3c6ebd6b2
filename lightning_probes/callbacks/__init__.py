"""The probes: Lightning callbacks that make the inside of training visible."""

from lightning_probes.callbacks.base import ParameterProbe, ProbeCallback
from lightning_probes.callbacks.confidence import ConfidenceMonitor
from lightning_probes.callbacks.gradient_dynamics import GradientDynamicsMonitor
from lightning_probes.callbacks.gradient_stats import GradientStatsMonitor
from lightning_probes.callbacks.noise_robustness import NoiseRobustnessMonitor

__all__ = [
    "ConfidenceMonitor",
    "GradientDynamicsMonitor",
    "GradientStatsMonitor",
    "NoiseRobustnessMonitor",
    "ParameterProbe",
    "ProbeCallback",
]
