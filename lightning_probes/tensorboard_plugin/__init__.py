"""The "Probes" tab of TensorBoard: per-layer heatmaps over training, read from the probes' own files.

Registered through the ``tensorboard_plugins`` entry point, so ``tensorboard --logdir runs`` shows it once the
package is installed. `ProbesPlugin` serves the routes and the ES module frontend (``static/``);
`lightning_probes.tensorboard_plugin.data.ProbeRuns` reads the runs.
"""

from lightning_probes.tensorboard_plugin.data import ProbeRuns
from lightning_probes.tensorboard_plugin.plugin import ProbesLoader, ProbesPlugin

__all__ = ["ProbeRuns", "ProbesLoader", "ProbesPlugin"]
