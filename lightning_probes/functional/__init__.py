"""Pure tensor functions behind the probes: tensors in, tensors or dicts out, no Trainer."""

from lightning_probes.functional.gradients import gradient_stats, nonfinite_counts, norm_summary, stats_from_summary

__all__ = ["gradient_stats", "nonfinite_counts", "norm_summary", "stats_from_summary"]
