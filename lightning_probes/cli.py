"""The ``lightning`` / ``lightning-probes`` command: a LightningCLI over the project's models and data.

Example:
    lightning fit --config configs/quickstart.yaml
    lightning fit --model LeNet5 --data MNISTDataModule --data.data_dir ../shared/data
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

import lightning_probes.callbacks  # noqa: F401  (registers the probes for `--trainer.callbacks NAME`)
import lightning_probes.datamodules  # noqa: F401  (registers the DataModules for `--data NAME`)
import lightning_probes.models  # noqa: F401  (registers the models for `--model NAME`)
from lightning_probes.commands import COMMANDS
from lightning_probes.errors import DataFilesError, DownloadError, ProbeConfigurationError
from lightning_probes.run_dir import run_directory

log = logging.getLogger(__name__)

# Raised while parsing and instantiating, these can only come from the configuration: one line, exit 2.
_CONFIG_ERRORS = (ValueError, FileNotFoundError, KeyError, ConnectionError)
# Raised while the subcommand runs, only these mean "bad configuration"; anything else (a ValueError in a
# model's `training_step`, say) is a bug in code and keeps its traceback.
_RUN_CONFIG_ERRORS = (DataFilesError, DownloadError, ProbeConfigurationError)


class RunDirSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` that also saves when the logger has no directory of its own.

    Lightning's callback writes ``<trainer.log_dir>/config.yaml`` and stops with a bare ``AssertionError`` when
    ``trainer.log_dir`` is ``None`` (``MLFlowLogger`` with a ``sqlite:///`` tracking URI). This one writes it to
    `lightning_probes.run_dir.run_directory` instead: ``<default_root_dir>/<logger name>/<version>/config.yaml``,
    the directory that holds the run's checkpoints and probe files, and says where in the log. Arguments are those
    of ``SaveConfigCallback``.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir or trainer.log_dir is not None:
            super().setup(trainer, pl_module, stage)
            return
        directory = run_directory(trainer)
        config_path = os.path.join(directory, self.config_filename)
        if not self.overwrite:
            exists = trainer.strategy.broadcast(os.path.isfile(config_path) if trainer.is_global_zero else False)
            if exists:
                raise RuntimeError(f"{config_path} exists already: not overwriting a previous run's config")
        if trainer.is_global_zero:
            os.makedirs(directory, exist_ok=True)
            self.parser.save(self.config, config_path, skip_none=False, overwrite=self.overwrite,
                             multifile=self.multifile)
            log.info("The logger has no directory: config saved to %s", config_path)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class ProbesCLI(LightningCLI):
    """A ``LightningCLI`` that parses and instantiates in ``__init__`` but runs the subcommand only on ``run()``.

    The split lets ``main`` tell configuration errors (raised while instantiating) from errors raised by the
    code being trained. Arguments are those of ``LightningCLI``.

    Example:
        >>> cli = ProbesCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
        ...                 subclass_mode_data=True,
        ...                 args=["fit", "--model", "MLP", "--data", "DigitsDataModule"])  # doctest: +SKIP
        >>> cli.run()  # doctest: +SKIP
    """

    def _run_subcommand(self, subcommand: str) -> None:
        # Called at the end of `LightningCLI.__init__`: defer to `run()`.
        pass

    def run(self) -> None:
        """Run the parsed subcommand (``fit``, ``validate``, ...); nothing when built with ``run=False``."""
        if self.subcommand is not None:
            LightningCLI._run_subcommand(self, self.subcommand)


def _make_cli(args: Optional[list[str]], run: bool, cli_class: type[ProbesCLI] = ProbesCLI) -> ProbesCLI:
    # Any LightningModule and LightningDataModule: the image classifiers and the meta-networks alike (`--model
    # LeNet5`, `--model MetaNet`: short names resolve among the imported subclasses). `cli_class`: a subclass, e.g.
    # the long-lived trial workers' one, which builds its parsers once per process.
    return cli_class(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_callback=RunDirSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> ProbesCLI:
    """Build (and by default run) the LightningCLI.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
        run: Run the subcommand; ``False`` only parses and instantiates (then ``args`` has no subcommand).

    Returns:
        The ``LightningCLI`` object, with ``trainer``, ``model`` and ``datamodule``.
    """
    cli = _make_cli(args, run)
    cli.run()
    return cli


def _exit_with_message(err: Exception) -> None:
    if os.environ.get("LIGHTNING_PROBES_DEBUG"):
        raise err
    # jsonargparse wraps a constructor's ValueError in a long "Does not validate against any of the Union
    # subtypes" report; the constructor's own message is the one that says what is wrong.
    while isinstance(err.__cause__, _CONFIG_ERRORS):
        err = err.__cause__
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2) from None


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point: LightningCLI's subcommands, and the project's commands (``study``, ...).

    ``lightning-probes study ...`` (any word in ``lightning_probes.commands.COMMANDS``) runs that command's
    ``main``; everything else goes to the LightningCLI. Bad configuration gives one ``error:`` line and exit
    status 2.

    Errors raised while parsing and instantiating (jsonargparse, the constructors' ``ValueError``) and, while
    the subcommand runs, missing data files, failed downloads and misconfigured probes
    (``lightning_probes.errors``) are reported in one line. Anything else raised during training, by the
    model's own code for instance, keeps its full traceback. Set ``LIGHTNING_PROBES_DEBUG=1`` to see the
    traceback of every error.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
        return
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(f"Project commands: {', '.join(COMMANDS)} (lightning-probes <command> --help).\n"
                         "LightningCLI subcommands:\n")
    try:
        # `args=None` lets LightningCLI read sys.argv itself (passing it explicitly makes it warn).
        cli = _make_cli(args, run=True)
    except _CONFIG_ERRORS as err:
        _exit_with_message(err)
    try:
        cli.run()
    except _RUN_CONFIG_ERRORS as err:
        _exit_with_message(err)


if __name__ == "__main__":
    main()
