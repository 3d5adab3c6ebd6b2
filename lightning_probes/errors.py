"""Exceptions that mean "the configuration is wrong", not "the code is wrong".

The ``lightning`` command reports these as one ``error:`` line with exit status 2, even when they are raised
while the Trainer runs (a probe's ``setup``, a DataModule's ``prepare_data``/``setup``); any other exception
raised during training keeps its full traceback.

Example:
    >>> raise ProbeConfigurationError("GradientStatsMonitor matched no parameter of `MLP`")
    Traceback (most recent call last):
    ...
    lightning_probes.errors.ProbeConfigurationError: GradientStatsMonitor matched no parameter of `MLP`
"""

from __future__ import annotations

__all__ = ["DataFilesError", "DownloadError", "ProbeConfigurationError"]


class ProbeConfigurationError(ValueError):
    """A probe does not fit the Trainer or model it is attached to (no logger, no matching layer, ...).

    Raised from a probe's ``setup(stage)``; a ``ValueError``, so existing ``except ValueError`` still catches it.
    """


class DataFilesError(FileNotFoundError):
    """A DataModule's files are missing: the message names the directory searched and the files expected."""


class DownloadError(ConnectionError):
    """A DataModule could not download its files (no network, server unreachable)."""
