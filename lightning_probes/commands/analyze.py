"""``lightning-probes analyze``: compare finished runs: weight health, calibration, information flow, training
dynamics, similarity, Pareto front, one dashboard and one report page.

Usage:
    lightning-probes analyze RUN [RUN ...] [--output DIR] [--config <fit config for data>] [--num_samples 1000]
                             [--names a,b,...] [--seed 0] [--trust_checkpoints] [--batch_size 256]
    python -m lightning_probes.commands.analyze ...

A RUN is a run directory (``runs/quickstart/version_0``: ``checkpoints/``, TensorBoard events or ``metrics.csv``,
``probes/``), a study output (every finished trial), or a folder of ``version_<n>`` runs. With ``--config``, the
data-dependent analyses (calibration, information flow, CKA) run every model on the same seeded test samples of
that config's DataModule; without it they use what the probes recorded, and the report says what was skipped and
why. Checkpoints are read with ``torch.load(weights_only=True)``; one holding pickled objects is refused unless
``--trust_checkpoints``. Writes ``analysis_results.json``, one PNG per analysis, ``summary_dashboard.png`` and
``report.html`` to ``--output`` (default ``./analysis``) and prints the headline table. Bad arguments give one
``error:`` line and exit status 2 before any analysis starts.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional, Union

log = logging.getLogger(__name__)

__all__ = ["analyze", "build_parser", "main", "parse_names"]

def parse_names(names: Union[None, str, list[str]]) -> Optional[list[str]]:
    """``"a,b,c"`` (or a list) as a list of names; ``None`` stays ``None``.

    Raises:
        ValueError: Naming ``names``, for an empty name.

    Example:
        >>> parse_names("lr 0.1, lr 0.01")
        ['lr 0.1', 'lr 0.01']
    """
    if names is None:
        return None
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    if not items or any(not n for n in items):
        raise ValueError(f"Expected `names` to be comma-separated non-empty names such as a,b,c, but got {names!r}")
    return items


def analyze(runs: list[str], output: Optional[str] = None, config: Optional[str] = None, num_samples: int = 1000,
            names: Union[None, str, list[str]] = None, seed: int = 0, trust_checkpoints: bool = False,
            batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """Analyse and compare finished runs; write the results, figures and report.

    Args:
        runs: Run directories, study outputs or folders of ``version_<n>`` runs.
        output: Output directory (default ``./analysis``).
        config: A fit config whose DataModule's test set feeds the data-dependent analyses.
        num_samples: Most test samples used (chosen by ``seed``; the same for every model).
        names: One name per run found, in order (default: trial ids / folder names).
        seed: Seed of the sample choice.
        trust_checkpoints: Read checkpoints holding pickled objects (``weights_only=False``, which can run code).
        batch_size: Samples per forward pass.
        progress: Show a progress bar over runs.

    Returns:
        What ``analysis_results.json`` holds.

    Example:
        >>> analyze(["runs/studies/quick"], config="configs/quickstart.yaml")  # doctest: +SKIP
    """
    from lightning_probes.analysis.analyzer import analyze_runs, prepare, write_outputs

    prepared = prepare(list(runs), output=output, config=config, num_samples=num_samples, names=parse_names(names),
                       seed=seed, trust_checkpoints=trust_checkpoints, progress=progress, batch_size=batch_size)
    results = analyze_runs(prepared)
    write_outputs(results, prepared.output)
    return results


def build_parser():
    """The command's jsonargparse parser; parse errors raise ``ArgumentError``."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="lightning-probes analyze", description=__doc__.split("\n\n")[0],
                            default_env=False, exit_on_error=False)
    parser.add_argument("runs", type=str, nargs="+",
                        help="Run directories, study outputs or folders of version_<n> runs.")
    parser.add_argument("--output", type=Optional[str], default=None, help="Output directory (default ./analysis).")
    parser.add_argument("--config", type=Optional[str], default=None,
                        help="Fit config whose DataModule's test set feeds the data-dependent analyses.")
    parser.add_argument("--num_samples", type=int, default=1000, help="Most test samples (seeded, same for all).")
    parser.add_argument("--names", type=Optional[str], default=None,
                        help="Comma-separated names, one per run found, in order.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample choice.")
    parser.add_argument("--trust_checkpoints", action=ActionYesNo, default=False,
                        help="Read checkpoints holding pickled objects (weights_only=False: can run code).")
    parser.add_argument("--batch_size", type=int, default=256, help="Samples per forward pass.")
    parser.add_argument("--progress", action=ActionYesNo, default=True, help="Show a progress bar.")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-probes analyze ...`` (``argv`` without the ``analyze`` word).

    Raises:
        SystemExit: 2 with one ``error:`` line for a bad argument, run, checkpoint or config; 130 on ``Ctrl-C``.
    """
    from lightning_probes.analysis.analyzer import analyze_runs, prepare, write_outputs
    from lightning_probes.analysis.report import format_headline
    from lightning_probes.commands._errors import one_line_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors("analyze"):
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        prepared = prepare(list(args.runs), output=args.output, config=args.config, num_samples=args.num_samples,
                           names=parse_names(args.names), seed=args.seed, trust_checkpoints=args.trust_checkpoints,
                           progress=args.progress, batch_size=args.batch_size)
    try:
        results = analyze_runs(prepared)
        write_outputs(results, prepared.output)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    skipped = sum(len(v) for v in results["skipped"]["per_run"].values()) + len(results["skipped"]["analyses"])
    sys.stdout.write(format_headline(results["headline"]) + "\n\n"
                     + (f"{skipped} analyses skipped (reasons in report.html and analysis_results.json)\n"
                        if skipped else "")
                     + f"report: {os.path.join(prepared.output, 'report.html')}\n")


if __name__ == "__main__":
    main()
