"""``lightning-probes plot``: redraw every figure of a run from its probe files (JSONL, JSON and NPZ).

Usage:
    lightning-probes plot RUN_DIR [--output DIR] [--probes NAME,NAME] [--no_progress]
    python -m lightning_probes.commands.plot runs/quickstart/version_0

``RUN_DIR`` is a run directory holding ``probes/`` (e.g. ``runs/quickstart/version_0``) or the probes directory
itself. Each probe's figures are drawn by the same functions the probe uses during training, from the files it
wrote (see each probe's ``figures_from_files``), into ``<output>/<name>/<figure>.png``, the names the probe
gives them; the default output is the probes directory, so a run with ``plot_every_n_epochs: 0`` ends up with
the figures it would have drawn. Without ``--output``, existing figures are replaced. Bad arguments give one
``error:`` line and exit status 2 before anything is drawn.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)

__all__ = ["PreparedPlot", "build_parser", "main", "plot", "prepare", "run"]

# Errors that mean "bad input" (arguments, run directory): one `error:` line, exit 2.
_INPUT_ERRORS = (ValueError, FileNotFoundError)

@dataclass
class PreparedPlot:
    """What `prepare` found: the figures to draw, where, and the probes without redrawable figures."""

    figures: list[tuple[str, str, Callable[[], Any]]]  # (probe name, file name, draw)
    output: str
    skipped: dict[str, str]  # probe name -> why nothing (or not everything) is drawn
    progress: bool


def _settings(directory: str, name: str) -> dict[str, Any]:
    path = os.path.join(directory, name, "settings.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _probe_class(saved: Mapping[str, Any], name: str) -> Optional[type]:
    """The probe's class: from ``settings.json``'s ``class_path``, else the shipped probe whose default name is
    ``name`` (runs written before the settings file existed)."""
    from lightning_probes import callbacks
    from lightning_probes.callbacks.base import ProbeCallback

    class_path = saved.get("class_path")
    if class_path:
        module, _, attribute = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as err:
            log.warning("%s: cannot import its probe class %s (%s)", name, class_path, err)
            return None
        return cls if isinstance(cls, type) and issubclass(cls, ProbeCallback) else None
    shipped = [getattr(callbacks, n) for n in callbacks.__all__]
    return next((c for c in shipped if isinstance(c, type) and getattr(c, "probe_name", None) == name), None)


def prepare(run_dir: str, output: Optional[str] = None, probes: Optional[str] = None,
            progress: bool = True) -> PreparedPlot:
    """Find the run's probes and the figures each can redraw from its files; nothing is drawn or written.

    Args:
        run_dir: A run directory holding ``probes/``, or the probes directory.
        output: Where the figures go (``<output>/<name>/<figure>.png``); default the probes directory.
        probes: Comma-separated probe names (their file stems); default every probe of the run.
        progress: Show a progress bar while drawing.

    Raises:
        FileNotFoundError: ``run_dir`` holds no probe output.
        ValueError: ``probes`` names a probe the run does not have, or ``output`` is a file.
    """
    from lightning_probes.reading import probe_files, probes_dir

    directory = probes_dir(run_dir)
    available = sorted(probe_files(run_dir))
    chosen = available
    if probes is not None:
        chosen = [p.strip() for p in probes.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in available]
        if unknown or not chosen:
            raise ValueError(f"Expected `probes` to be comma-separated names among {available} (the probes of "
                             f"{run_dir}), but got {probes!r}")
    output = directory if output is None else os.path.abspath(output)
    if os.path.isfile(output):
        raise ValueError(f"Expected `output` to be a directory, but {output!r} is a file")
    figures, skipped = [], {}
    for name in chosen:
        saved = _settings(directory, name)
        cls = _probe_class(saved, name)
        if cls is None:
            skipped[name] = "its probe class is unknown (no settings.json, not a shipped probe's default name)"
            continue
        specs = cls.figures_from_files(directory, name, saved.get("settings", {}))
        if not specs:
            skipped[name] = "no figure data in its files"
        figures += [(name, filename, draw) for filename, _tag, draw in specs]
    return PreparedPlot(figures, output, skipped, progress)


def run(prepared: PreparedPlot) -> list[str]:
    """Draw every prepared figure and write it as PNG; returns the paths written."""
    from tqdm.auto import tqdm

    from lightning_probes.io import atomic_write_bytes, render_png

    written = []
    for name, filename, draw in tqdm(prepared.figures, desc="plot", unit="figure", disable=not prepared.progress):
        path = os.path.join(prepared.output, name, filename)
        atomic_write_bytes(path, render_png(draw()))
        written.append(path)
    for name, why in prepared.skipped.items():
        log.warning("%s: %s", name, why)
    log.info("%d figures of %d probes written to %s", len(written), len({n for n, _, _ in prepared.figures}),
             prepared.output)
    return written


def plot(run_dir: str, output: Optional[str] = None, probes: Optional[str] = None, progress: bool = True) -> list[str]:
    """Redraw every figure of a run from its probe files (`prepare`, then `run`); returns the paths written.

    Example:
        >>> plot("runs/quickstart/version_0", output="figures")  # doctest: +SKIP
    """
    return run(prepare(run_dir, output, probes, progress))


def build_parser():
    """The command's jsonargparse parser."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="lightning-probes plot", description=__doc__.split("\n\n")[0],
                            default_env=False, exit_on_error=False)
    parser.add_argument("run_dir", type=str,
                        help="A run directory holding probes/ (e.g. runs/quickstart/version_0), or its probes/.")
    parser.add_argument("--output", type=Optional[str], default=None,
                        help="Write <output>/<probe>/<figure>.png (default: the probes directory, replacing figures).")
    parser.add_argument("--probes", type=Optional[str], default=None,
                        help="Comma-separated probe names (file stems: layer_correlation,confidence); default: all.")
    parser.add_argument("--progress", action=ActionYesNo, default=True, help="Show a progress bar.")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-probes plot ...`` (``argv`` without the ``plot`` word).

    Raises:
        SystemExit: 2 with one ``error:`` line for a bad argument or a directory without probe output; 130 on
            ``Ctrl-C``.
    """
    from lightning_probes.commands._errors import one_line_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors("plot", _INPUT_ERRORS):
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        prepared = prepare(args.run_dir, args.output, args.probes, args.progress)
    try:
        run(prepared)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
