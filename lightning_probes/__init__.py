"""lightning-probes: reusable PyTorch Lightning callbacks that make the inside of training visible."""

from lightning_probes.budget import memory_plan, set_memory_budget
from lightning_probes.callbacks import (
    ActivationOutlierMonitor,
    ActivationStatsMonitor,
    AlignmentMonitor,
    AttentionMonitor,
    AugmentationInvarianceMonitor,
    ConfidenceMonitor,
    CurvatureMonitor,
    GradientDynamicsMonitor,
    GradientNoiseScaleMonitor,
    GradientStatsMonitor,
    LayerCorrelationMonitor,
    NoiseRobustnessMonitor,
    PerSampleGradientMonitor,
    StabilityMonitor,
)
from lightning_probes.callbacks.guard import ProbeDisabledWarning, ProbeSkippedWarning, ProbeWarning
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.reading import read_probes

__version__ = "0.1.0"
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
    "PerSampleGradientMonitor",
    "ProbeConfigurationError",
    "ProbeDisabledWarning",
    "ProbeSkippedWarning",
    "ProbeWarning",
    "StabilityMonitor",
    "__version__",
    "memory_plan",
    "read_probes",
    "set_memory_budget",
]
