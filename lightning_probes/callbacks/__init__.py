"""The probes: Lightning callbacks that make the inside of training visible."""

from lightning_probes.callbacks.base import ParameterProbe, ProbeCallback
from lightning_probes.callbacks.gradient_dynamics import GradientDynamicsMonitor
from lightning_probes.callbacks.gradient_stats import GradientStatsMonitor

__all__ = ["GradientDynamicsMonitor", "GradientStatsMonitor", "ParameterProbe", "ProbeCallback"]
