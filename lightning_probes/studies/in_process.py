"""Run a LightningCLI subcommand (``fit``, ``test``) inside the current process, as a clean, isolated trial.

A long-lived worker (``lightning_probes.studies.workers``, or a Ray Tune actor) imports torch and Lightning once and
then runs trial after trial through ``run_cli_in_process``. Each call gets what a fresh ``lightning fit`` process
would have:

- a fresh LightningCLI: a new Trainer, model, DataModule, loggers and callbacks, seeded by the config's
  ``seed_everything`` (LightningCLI calls ``seed_everything`` before it instantiates anything);
- the working directory of the study (relative data paths), ``sys.argv`` as the command line would set it, and the
  environment of the worker, all restored afterwards (Lightning sets ``PL_GLOBAL_SEED`` and friends);
- torch's global switches restored afterwards: default dtype, intra-op threads, deterministic algorithms,
  float32 matmul precision, cuDNN flags; the warning filters and the handlers of the root and Lightning loggers;
- its output (file descriptors 1 and 2, so C-level output too) appended to the trial's log file, with the
  traceback of an exception raised by the trial's own code, or one ``error:`` line for a configuration error,
  exactly as the command-line process would print them.

What it cannot undo is state a user's own code hides in module globals (a cache, a monkeypatch): such code runs with
``lightning-probes study --isolate`` (one process per trial).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["isolated_state", "redirect_output", "run_cli_in_process"]

_LOGGER_NAMES = ("", "pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning")


@contextlib.contextmanager
def redirect_output(log_path: str) -> Iterator[None]:
    """Append everything written to file descriptors 1 and 2 (Python and C alike) to ``log_path`` meanwhile.

    Args:
        log_path: The log file (appended to).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log_path, "ab", buffering=0) as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            try:
                yield
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def isolated_state(cwd: str) -> Iterator[None]:
    """Run in ``cwd`` and restore the process-wide state a Lightning run changes (see the module docstring).

    Args:
        cwd: Working directory of the trial.
    """
    import torch

    environ = dict(os.environ)
    previous_cwd = os.getcwd()
    torch_state: dict[str, Any] = {
        "dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn": torch.is_deterministic_algorithms_warn_only_enabled(),
        "matmul": torch.get_float32_matmul_precision(),
        "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
    }
    loggers = {name: logging.getLogger(name) for name in _LOGGER_NAMES}
    logger_state = {name: (list(lg.handlers), lg.level, lg.propagate) for name, lg in loggers.items()}
    filters = list(warnings.filters)
    argv = list(sys.argv)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(previous_cwd)
        sys.argv[:] = argv
        os.environ.clear()
        os.environ.update(environ)
        torch.set_default_dtype(torch_state["dtype"])
        torch.set_num_threads(torch_state["threads"])
        torch.use_deterministic_algorithms(torch_state["deterministic"], warn_only=torch_state["deterministic_warn"])
        torch.set_float32_matmul_precision(torch_state["matmul"])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = torch_state["cudnn"]
        for name, (handlers, level, propagate) in logger_state.items():
            lg = loggers[name]
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        warnings.filters[:] = filters
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _worker_cli_class() -> type:
    """``ProbesCLI`` whose parsers are built once per process and reused by every later trial.

    Building LightningCLI's parsers (introspecting every model, DataModule, callback and logger signature) is about a
    third of a CLI's start and the same for every trial; parsing and instantiating stay per trial. A jsonargparse
    parser parses any number of configs; the instantiators LightningCLI registers on it are keyed by class, so each
    new CLI replaces the previous one's.
    """
    global _WORKER_CLI
    if _WORKER_CLI is None:
        from lightning_probes.cli import ProbesCLI

        class WorkerCLI(ProbesCLI):
            _parsers: dict[bool, tuple[Any, Any, Any]] = {}

            def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                             subparser_kwargs: dict[str, Any]) -> None:
                cached = self._parsers.get(add_subcommands)
                if cached is None:
                    super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
                    self._parsers[add_subcommands] = (self.parser, getattr(self, "_subcommand_parsers", None),
                                                      getattr(self, "_subcommand_method_arguments", None))
                    return
                self.parser, subcommand_parsers, method_arguments = cached
                if subcommand_parsers is not None:
                    self._subcommand_parsers = subcommand_parsers
                    self._subcommand_method_arguments = method_arguments

        _WORKER_CLI = WorkerCLI
    return _WORKER_CLI


_WORKER_CLI: Any = None


def _config_error_line(err: BaseException) -> str:
    """The one line ``lightning_probes.cli`` prints for a configuration error (the innermost cause's message)."""
    from lightning_probes.cli import _CONFIG_ERRORS

    while isinstance(err.__cause__, _CONFIG_ERRORS):
        err = err.__cause__
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return f"error: {message}"


def run_cli_in_process(args: Sequence[str], log_path: str, cwd: str) -> int:
    """Run ``lightning <args>`` (a LightningCLI subcommand) in this process, as the command line would.

    Args:
        args: The arguments after ``lightning``, e.g. ``["fit", "--config", "config.yaml"]``.
        log_path: File the run's output is appended to (a ``$ lightning ...`` line first).
        cwd: Working directory of the run.

    Returns:
        The exit status the command would have had: 0 on success, 2 for a configuration error (one ``error:`` line
        in the log), 1 for an exception raised while running (its traceback in the log).
    """
    from lightning_probes.cli import _CONFIG_ERRORS, _RUN_CONFIG_ERRORS, _make_cli

    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"$ lightning {' '.join(args)}  # in a long-lived worker, pid {os.getpid()}\n")
    with isolated_state(cwd), redirect_output(log_path):
        sys.argv[:] = ["lightning", *args]  # as the command line would have it (LightningCLI checks it)
        cli = None
        try:
            try:
                cli = _make_cli(list(args), run=True, cli_class=_worker_cli_class())
            except _CONFIG_ERRORS as err:
                sys.stderr.write(_config_error_line(err) + "\n")
                return 2
            except SystemExit as err:  # jsonargparse printed its usage and error already
                return err.code if isinstance(err.code, int) else 2
            try:
                cli.run()
            except _RUN_CONFIG_ERRORS as err:
                sys.stderr.write(_config_error_line(err) + "\n")
                return 2
            return 0
        except (Exception, SystemExit):
            traceback.print_exc()
            return 1
        finally:
            del cli
