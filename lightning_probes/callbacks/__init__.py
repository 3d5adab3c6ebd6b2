"""The probes: Lightning callbacks that make the inside of training visible."""

from lightning_probes.callbacks.activation_outliers import ActivationOutlierMonitor
from lightning_probes.callbacks.activation_stats import ActivationStatsMonitor
from lightning_probes.callbacks.alignment import AlignmentMonitor
from lightning_probes.callbacks.attention import AttentionMonitor
from lightning_probes.callbacks.augmentation_invariance import AugmentationInvarianceMonitor
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.confidence import ConfidenceMonitor
from lightning_probes.callbacks.curvature import CurvatureMonitor
from lightning_probes.callbacks.gradient_dynamics import GradientDynamicsMonitor
from lightning_probes.callbacks.gradient_noise_scale import GradientNoiseScaleMonitor
from lightning_probes.callbacks.gradient_stats import GradientStatsMonitor
from lightning_probes.callbacks.layer_correlation import LayerCorrelationMonitor
from lightning_probes.callbacks.noise_robustness import NoiseRobustnessMonitor
from lightning_probes.callbacks.parameter_probe import ParameterProbe
from lightning_probes.callbacks.per_sample_gradients import PerSampleGradientMonitor
from lightning_probes.callbacks.stability import StabilityMonitor

__all__ = [
    "ActivationOutlierMonitor",
    "ActivationStatsMonitor",
    "AlignmentMonitor",
    "AttentionMonitor",
    "AugmentationInvarianceMonitor",
    "ConfidenceMonitor",
    "CurvatureMonitor",
    "GradientDynamicsMonitor",
    "GradientNoiseScaleMonitor",
    "GradientStatsMonitor",
    "LayerCorrelationMonitor",
    "NoiseRobustnessMonitor",
    "ParameterProbe",
    "PerSampleGradientMonitor",
    "ProbeCallback",
    "StabilityMonitor",
]
