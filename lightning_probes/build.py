"""Building the model and DataModule of a fit config as ``lightning fit --config`` builds them.

The commands that read a trained model back (``ablate``, ``analyze``, ``zoo-dataset``) need the model and the
DataModule a fit config names, built exactly as the LightningCLI of ``lightning_probes.cli`` builds them (short
class names, defaults, links, a run's saved ``config.yaml`` with its ``ckpt_path``), without training anything.

Example:
    >>> model, datamodule = build_from_config("configs/quickstart.yaml")  # doctest: +SKIP
    >>> _, datamodule = build_from_config("trial/config.yaml", {"data.init_args.data_dir": "data"})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any, Optional
from unittest import mock

from lightning_probes.cli import _make_cli

__all__ = ["build_from_config"]


def build_from_config(config: str, overrides: Optional[Mapping[str, Any]] = None) -> tuple[Any, Any]:
    """The model and DataModule of a fit config, built as ``lightning fit --config config`` builds them.

    ``ProbesCLI`` parses and instantiates with the ``fit`` subcommand (so configs saved by a run, with their
    ``ckpt_path``, parse too) but runs nothing until ``run()``, which is never called here. Like ``lightning fit``,
    it seeds the global random generators with the config's ``seed_everything``.

    Args:
        config: A fit config file.
        overrides: Dotted keys set on top of the config, as ``--key value`` on the command line
            (``{"data.init_args.data_dir": "data"}``).

    Returns:
        ``(model, datamodule)``.

    Raises:
        Errors of the config (jsonargparse, the constructors) pass through.
    """
    args = ["fit", "--config", config]
    for key, value in (overrides or {}).items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    # LightningCLI warns when it gets `args` while sys.argv holds arguments too (those of the calling command).
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = _make_cli(args, run=True)
    return cli.model, cli.datamodule
