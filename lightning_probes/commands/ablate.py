"""``lightning-probes ablate``: drop hidden units in order of their alignment and measure the damage.

Usage:
    lightning-probes ablate --config <fit config> --ckpt_path <checkpoint or directory of checkpoints>
                            [--output DIR] [--fractions 0,0.1,...,0.9] [--random_repeats 5]
                            [--mode by_layer|all_layers] [--rescale none|inverted] [--seed 0]
                            [--thresholds 0.5,0.9] [--min_count 5] [--figure_fractions 0.5,0.9]
                            [--limit_batches N] [--pattern '*.ckpt'] [--device cpu] [--no_figures]
    python -m lightning_probes.commands.ablate ...

The model and DataModule are built from the fit config exactly as ``lightning fit --config`` builds them, the
checkpoint's weights are loaded, and the DataModule's test set is the data. Writes ``<output>/ablation.json``
(default output: ``ablation/`` next to the checkpoint, or inside the directory of checkpoints), figures in
``<output>/figures/`` and prints the accuracy per order and fraction. Bad arguments give one ``error:`` line and
exit status 2 before any work starts. See `lightning_probes.analysis.ablation` for what is measured.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Optional, Union

log = logging.getLogger(__name__)

__all__ = ["PreparedAblation", "ablate", "build_parser", "main", "parse_floats", "prepare", "run"]

_DEFAULT_FRACTIONS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def parse_floats(argument: str, value: Union[str, Sequence[float]]) -> list[float]:
    """``"0,0.1,0.2"`` (or ``"[0, 0.1]"``, or a sequence of numbers) as a list of floats.

    Raises:
        ValueError: Naming ``argument``, for an item that is not a number.

    Example:
        >>> parse_floats("fractions", "0, 0.5,0.9")
        [0.0, 0.5, 0.9]
    """
    items = value.strip().strip("[]").split(",") if isinstance(value, str) else list(value)
    try:
        return [float(item) for item in items if not isinstance(item, str) or item.strip()]
    except (TypeError, ValueError):
        raise ValueError(f"Expected `{argument}` to be comma-separated numbers such as 0,0.5,0.9, but got "
                         f"{value!r}") from None


def _default_output(ckpt_path: str) -> str:
    folder = ckpt_path if os.path.isdir(ckpt_path) else os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.join(folder, "ablation")


@dataclass
class PreparedAblation:
    """Everything `prepare` checked and built, ready for `run`."""

    settings: Any
    checkpoints: list[str]
    output: str
    model: Any
    batches: list
    device: Any
    chosen: Optional[list[int]]
    figures: bool
    progress: bool
    trust: bool = False


def prepare(
    config: str,
    ckpt_path: str,
    output: Optional[str] = None,
    fractions: Union[str, Sequence[float]] = _DEFAULT_FRACTIONS,
    random_repeats: int = 5,
    mode: str = "by_layer",
    rescale: str = "none",
    seed: int = 0,
    thresholds: Union[str, Sequence[float]] = "0.5,0.9",
    min_count: int = 5,
    figure_fractions: Optional[Union[str, Sequence[float]]] = None,
    limit_batches: Optional[int] = None,
    pattern: str = "*.ckpt",
    device: str = "cpu",
    figures: bool = True,
    progress: bool = True,
    trust_checkpoints: bool = False,
) -> PreparedAblation:
    """Check every argument, build the model and data from the config and check every checkpoint fits.

    The arguments are those of `ablate`. Nothing is written.

    Raises:
        ValueError, FileNotFoundError: Naming the argument, for bad input; errors of the config (jsonargparse,
            the constructors) and of the data (`lightning_probes.errors`) pass through.
    """
    import torch

    from lightning_probes.analysis.ablation import AblationSettings
    from lightning_probes.analysis.ablation_checkpoints import check_checkpoint, find_checkpoints
    from lightning_probes.build import build_from_config

    # Everything that can be checked without building anything comes first.
    settings = AblationSettings(fractions=parse_floats("fractions", fractions), mode=mode,
                                random_repeats=random_repeats, seed=seed, rescale=rescale,
                                thresholds=parse_floats("thresholds", thresholds), min_count=min_count)
    chosen = None
    if figure_fractions is not None:
        wanted = parse_floats("figure_fractions", figure_fractions)
        if not wanted or any(f not in settings.fractions for f in wanted):
            raise ValueError(f"Expected `figure_fractions` to be some of `fractions` {list(settings.fractions)}, but "
                             f"got {wanted}")
        chosen = sorted(settings.fractions.index(f) for f in set(wanted))
    if limit_batches is not None and (isinstance(limit_batches, bool) or limit_batches < 1):
        raise ValueError(f"Expected `limit_batches` to be a positive integer, but got {limit_batches!r}")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"Expected `config` to be a fit config file, but {config!r} is not a file (looked for "
                                f"{os.path.abspath(config)!r})")
    checkpoints = find_checkpoints(ckpt_path, pattern)
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Expected `device` to be a torch device such as cpu or cuda, but got {device!r}") from None
    model, datamodule = build_from_config(config)
    for path in checkpoints:
        check_checkpoint(model, path, trust_checkpoints)
    datamodule.prepare_data()
    datamodule.setup("test")
    batches = list(islice(datamodule.test_dataloader(), limit_batches))
    if not batches:
        raise ValueError(f"Expected the test set of {type(datamodule).__name__} to hold data, but it is empty")
    return PreparedAblation(settings=settings, checkpoints=checkpoints, output=output or _default_output(ckpt_path),
                            model=model.to(torch_device), batches=batches, device=torch_device, chosen=chosen,
                            figures=figures, progress=progress, trust=trust_checkpoints)


def run(prepared: PreparedAblation) -> dict[str, Any]:
    """Analyse every checkpoint, compare them, write ``ablation.json`` and the figures, print the table.

    Returns:
        What ``ablation.json`` holds: one analysis, or ``{"checkpoints": [...], "comparison": {...}}``.
    """
    from tqdm.auto import tqdm

    from lightning_probes.analysis.ablation import ablate as ablate_model
    from lightning_probes.analysis.ablation import find_sites
    from lightning_probes.analysis.ablation_checkpoints import accuracy_table, compare_checkpoints, load_weights
    from lightning_probes.analysis.ablation_figures import write_figures
    from lightning_probes.io import atomic_write_json

    p, settings = prepared, prepared.settings
    sites = find_sites(p.model)
    log.info("ablate: %d checkpoint(s), %d layers (%s), %d test samples -> %s", len(p.checkpoints), len(sites),
             ", ".join(s.layer for s in sites), sum(len(b[1]) for b in p.batches), p.output)
    names = [os.path.splitext(os.path.basename(path))[0] for path in p.checkpoints]
    analyses = []
    with tqdm(total=len(p.checkpoints) * settings.passes(len(sites)), desc="ablate", unit="pass",
              disable=not p.progress) as bar:
        for path, name in zip(p.checkpoints, names):
            bar.set_postfix_str(name)
            meta = load_weights(p.model, path, p.trust)
            analyses.append({**meta, **ablate_model(p.model, p.batches, settings, device=p.device,
                                                    advance=bar.update)})
    comparison = compare_checkpoints(analyses, names) if len(analyses) > 1 else None
    result = analyses[0] if comparison is None else {"checkpoints": analyses, "comparison": comparison}
    atomic_write_json(os.path.join(p.output, "ablation.json"), result)
    if p.figures:
        written = write_figures(os.path.join(p.output, "figures"), analyses, names, comparison, p.chosen)
        log.info("ablate: %d figures in %s", len(written), os.path.join(p.output, "figures"))
    tables = [accuracy_table(a, title=f"accuracy, {name} ({settings.mode}, rescale {settings.rescale})")
              for a, name in zip(analyses, names)]
    sys.stdout.write("\n\n".join(tables) + f"\n\nresults in {os.path.join(p.output, 'ablation.json')}\n")
    return result


def ablate(config: str, ckpt_path: str, **kwargs: Any) -> dict[str, Any]:
    """Run the ablation of one checkpoint, or of every checkpoint in a directory, and write the results.

    Args:
        config: The fit config the checkpoints were trained with (model and data).
        ckpt_path: A Lightning checkpoint, or a directory of them (``pattern``; ``last*.ckpt`` left out when
            others match).
        **kwargs: ``output`` (default: ``ablation/`` next to the checkpoint, or inside the directory),
            ``fractions`` (shares of each layer's units to drop, in [0, 1)), ``random_repeats`` (>= 1), ``mode``
            (``by_layer``: one layer at a time; ``all_layers``: the same fraction in every layer at once),
            ``rescale`` (``none``; ``inverted``: kept units scaled by ``units / (units - k)``), ``seed``,
            ``thresholds`` (confidence thresholds of the thresholded confusion), ``min_count`` (fewest predictions
            a confusion cell needs for its mean confidence), ``figure_fractions`` (fractions of the confusion
            figures), ``limit_batches`` (first test batches only), ``pattern`` (checkpoint files of a directory),
            ``device``, ``figures``, ``progress``, ``trust_checkpoints`` (read checkpoints holding pickled objects,
            which can run code; refused by default): see `prepare`.

    Returns:
        What ``ablation.json`` holds.

    Raises:
        ValueError, FileNotFoundError: Naming the argument, for bad input, before any work starts.

    Example:
        >>> ablate("configs/quickstart.yaml", "runs/quickstart/version_0/checkpoints",
        ...        fractions="0,0.5,0.9", random_repeats=3)  # doctest: +SKIP
    """
    return run(prepare(config, ckpt_path, **kwargs))


def build_parser():
    """The command's jsonargparse parser (the arguments of `ablate`); parse errors raise ``ArgumentError``."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="lightning-probes ablate", description=__doc__.split("\n\n")[0],
                            default_env=False, exit_on_error=False)
    parser.add_argument("--config", type=str, required=True, help="The fit config the checkpoints were trained with.")
    parser.add_argument("--ckpt_path", type=str, required=True,
                        help="A Lightning checkpoint, or a directory of them (see --pattern).")
    parser.add_argument("--output", type=Optional[str], default=None,
                        help="Output directory (default: ablation/ next to the checkpoint or in the directory).")
    parser.add_argument("--fractions", type=str, default=_DEFAULT_FRACTIONS,
                        help="Comma-separated shares of each layer's units to drop, each in [0, 1).")
    parser.add_argument("--random_repeats", type=int, default=5, help="Seeded random orders averaged, >= 1.")
    parser.add_argument("--mode", type=str, default="by_layer",
                        help="by_layer (one layer at a time) or all_layers (every layer at once).")
    parser.add_argument("--rescale", type=str, default="none",
                        help="none, or inverted: kept units scaled by units / (units - dropped).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random orders (layer i uses seed + i).")
    parser.add_argument("--thresholds", type=str, default="0.5,0.9",
                        help="Comma-separated confidence thresholds of the thresholded confusion matrices.")
    parser.add_argument("--min_count", type=int, default=5,
                        help="Fewest predictions a confusion cell needs for its mean confidence to be reported.")
    parser.add_argument("--figure_fractions", type=Optional[str], default=None,
                        help="Fractions shown in the confusion figures (default: the one nearest 0.5 and the largest).")
    parser.add_argument("--limit_batches", type=Optional[int], default=None, help="Use only the first test batches.")
    parser.add_argument("--pattern", type=str, default="*.ckpt", help="Checkpoint files of a directory.")
    parser.add_argument("--device", type=str, default="cpu", help="Torch device (cpu, cuda, ...).")
    parser.add_argument("--figures", action=ActionYesNo, default=True, help="Write the figures.")
    parser.add_argument("--progress", action=ActionYesNo, default=True, help="Show a progress bar.")
    parser.add_argument("--trust_checkpoints", action=ActionYesNo, default=False,
                        help="Read checkpoints holding pickled objects (weights_only=False: can run code).")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-probes ablate ...`` (``argv`` without the ``ablate`` word).

    Raises:
        SystemExit: 2 with one ``error:`` line for a bad argument, config, checkpoint or missing data; 130 on
            ``Ctrl-C``.
    """
    from lightning_probes.commands._errors import one_line_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors("ablate"):
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        prepared = prepare(**{k: v for k, v in vars(args).items() if k in prepare.__code__.co_varnames})
    try:
        run(prepared)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
