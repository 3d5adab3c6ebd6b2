"""The ``lightning`` / ``lightning-probes`` command: a LightningCLI over the project's models and data.

Example:
    lightning fit --config configs/quickstart.yaml
    lightning fit --model LeNet5 --data MNISTDataModule --data.data_dir ../shared/data
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from pytorch_lightning.cli import LightningCLI

import datamodules  # noqa: F401  (registers the DataModules for `--data NAME`)
import lightning_probes.callbacks  # noqa: F401  (registers the probes for `--trainer.callbacks NAME`)
import models  # noqa: F401  (registers the models for `--model NAME`)
from datamodules.base import ImageDataModule
from models.base import ImageClassifier

log = logging.getLogger(__name__)

# Errors our own code raises for bad input; anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ConnectionError)


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
        run: Run the subcommand; ``False`` only parses and instantiates (then ``args`` has no subcommand).

    Returns:
        The ``LightningCLI`` object, with ``trainer``, ``model`` and ``datamodule``.
    """
    return LightningCLI(
        ImageClassifier,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point: run the CLI and turn bad input into one message and exit code 2.

    Set ``LIGHTNING_PROBES_DEBUG=1`` to see the full traceback instead.
    """
    try:
        build_cli(args)
    except _USER_ERRORS as err:
        if os.environ.get("LIGHTNING_PROBES_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
