"""``lightning-probes zoo-dataset``: the meta-networks' data set from a zoo of trained classifiers.

Usage:
    lightning-probes zoo-dataset --zoo <study output> --data.data_dir <MNIST dir> --output <dir>
                                 [--sigma 1.0] [--num_draws 50] [--per_class 10] [--min_accuracy 0.6]
                                 [--layers pool2,fc1,fc2,fc3] [--seed 0] [--models_per_shard 16]
                                 [--selection random|first] [--noise_bank_seed N]
                                 [--features boundary,context,probes,noise_profile] [--context_size 1000]
                                 [--checkpoints last|epochs] [--profile_draws 4]
    python -m lightning_probes.commands.zoo_dataset ...

Reads every finished trial of the zoo (``lightning-probes study --config configs/studies/lenet_zoo.yaml``), tests
it on its DataModule's test set, and for every model with test accuracy >= ``min_accuracy`` writes the outputs of
``layers`` on up to ``per_class`` correctly and ``per_class`` wrongly classified test samples per digit, with the
prediction, ``correct`` and the noise-stability ratio, as ``<output>/shard_<k>.npz`` plus ``models.csv``.
Rerunning continues: models already in a shard are skipped; a rerun with more ``--features`` adds them to the
shards built so far. Bad arguments give one ``error:`` line and exit status
2 before any work starts. See `lightning_probes.studies.zoo`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

log = logging.getLogger(__name__)

__all__ = ["build_parser", "main", "zoo_dataset"]


def zoo_dataset(zoo: str, output: str, data_dir: Optional[str] = None, sigma: float = 1.0, num_draws: int = 50,
                per_class: int = 10, min_accuracy: float = 0.6, layers: str = "pool2,fc1,fc2,fc3", seed: int = 0,
                models_per_shard: int = 16, progress: bool = True, trust_checkpoints: bool = False,
                selection: str = "random", noise_bank_seed: Optional[int] = None, features: str = "",
                context_size: int = 1000, checkpoints: str = "last", probe_layers: str = "pool2,fc1,fc2",
                probe_train_size: int = 2000, profile_draws: int = 4) -> dict[str, Any]:
    """Build (or continue) the data set of a zoo.

    Args:
        zoo: The zoo's study output directory (``<output>/trials/<trial_id>/``).
        output: Directory of the data set.
        data_dir: ``data_dir`` of the trials' DataModule (default: the one in each trial's ``config.yaml``).
        sigma: Standard deviation of the Gaussian input noise, in normalised input units.
        num_draws: Noisy copies per sample for the stability ratio.
        per_class: Most correctly and most wrongly classified test samples per digit and model.
        min_accuracy: Models with a lower test accuracy are left out (listed in ``excluded.csv``).
        layers: Comma-separated modules of the network whose outputs are stored.
        seed: Seed of the sample choice and the noise (combined with each model's id).
        models_per_shard: Models per ``shard_<k>.npz``.
        progress: Show a progress bar.
        trust_checkpoints: Read checkpoints that hold pickled objects (``torch.load(weights_only=False)``, which
            can run code); by default they are refused with a clear error.
        selection: ``"random"`` (seeded per model) or ``"first"`` (the first correct and wrong test samples per
            class in test-set order, the original study's).
        noise_bank_seed: Seed of one bank of noise draws reused for every image and model (the original study's);
            ``None``: fresh noise per image.
        features: Comma-separated extra arrays: ``boundary`` (linearised boundary distances), ``context`` (the
            model's confidence profile on reference images), ``probes`` (class-aligned linear probes per layer),
            ``noise_profile`` (the model's stability under the same noise on its own training images). A rerun
            with more features adds them to the data set built so far.
        context_size: Reference images (the first of the test set) of ``context``.
        checkpoints: ``"last"`` (a model per trial) or ``"epochs"`` (every epoch checkpoint is a model).
        probe_layers: Comma-separated layers of the ``probes`` feature.
        probe_train_size: Training images each linear probe is fitted on and the noise profile is measured on.
        profile_draws: Noisy copies of each of those images for ``noise_profile``.

    Returns:
        What ``dataset.json`` holds.

    Raises:
        ValueError, FileNotFoundError: Naming the argument, before any model is read.
    """
    from lightning_probes.studies.zoo import ZooDatasetSettings, build_zoo_dataset

    if not os.path.isdir(zoo):
        raise FileNotFoundError(f"Expected `zoo` to be a study output directory, but {zoo!r} is not a directory")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Expected `data.data_dir` to be a directory, but {data_dir!r} is not one")
    names = tuple(n.strip() for n in str(layers).split(",") if n.strip())
    extra = tuple(n.strip() for n in str(features).split(",") if n.strip())
    settings = ZooDatasetSettings(sigma=sigma, num_draws=num_draws, per_class=per_class, min_accuracy=min_accuracy,
                                  layers=names, seed=seed, models_per_shard=models_per_shard, selection=selection,
                                  noise_bank_seed=noise_bank_seed, features=extra, context_size=context_size,
                                  checkpoints=checkpoints,
                                  probe_layers=tuple(n.strip() for n in str(probe_layers).split(",") if n.strip()),
                                  probe_train_size=probe_train_size, profile_draws=profile_draws)
    return build_zoo_dataset(zoo, output, data_dir=data_dir, settings=settings, progress=progress,
                             trust_checkpoints=trust_checkpoints)


def build_parser():
    """The command's jsonargparse parser; parse errors raise ``ArgumentError``."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="lightning-probes zoo-dataset", description=__doc__.split("\n\n")[0],
                            default_env=False, exit_on_error=False)
    parser.add_argument("--zoo", type=str, required=True, help="The zoo's study output directory.")
    parser.add_argument("--output", type=str, required=True, help="Directory of the data set.")
    parser.add_argument("--data.data_dir", type=Optional[str], default=None,
                        help="data_dir of the trials' DataModule (default: the one in their config.yaml).")
    parser.add_argument("--sigma", type=float, default=1.0, help="Gaussian noise std, in normalised input units.")
    parser.add_argument("--num_draws", type=int, default=50, help="Noisy copies per sample.")
    parser.add_argument("--per_class", type=int, default=10,
                        help="Most correctly and most wrongly classified samples per digit and model.")
    parser.add_argument("--min_accuracy", type=float, default=0.6, help="Models below this test accuracy are left out.")
    parser.add_argument("--layers", type=str, default="pool2,fc1,fc2,fc3", help="Comma-separated modules to store.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample choice and of the noise.")
    parser.add_argument("--models_per_shard", type=int, default=16, help="Models per shard file.")
    parser.add_argument("--selection", type=str, default="random",
                        help="random (seeded per model) or first (in test-set order, the original study's).")
    parser.add_argument("--noise_bank_seed", type=Optional[int], default=None,
                        help="Seed of one noise bank reused for every image and model (default: fresh noise).")
    parser.add_argument("--features", type=str, default="",
                        help="Comma-separated extra arrays: boundary, context, probes, noise_profile (a rerun "
                             "with more adds them).")
    parser.add_argument("--context_size", type=int, default=1000, help="Reference images of the context feature.")
    parser.add_argument("--checkpoints", type=str, default="last",
                        help="last (a model per trial) or epochs (every epoch checkpoint is a model).")
    parser.add_argument("--probe_layers", type=str, default="pool2,fc1,fc2", help="Layers of the probes feature.")
    parser.add_argument("--probe_train_size", type=int, default=2000,
                        help="Training images each linear probe is fitted on and the noise profile measured on.")
    parser.add_argument("--profile_draws", type=int, default=4,
                        help="Noisy copies of each training image for the noise_profile feature.")
    parser.add_argument("--progress", action=ActionYesNo, default=True, help="Show a progress bar.")
    parser.add_argument("--trust_checkpoints", action=ActionYesNo, default=False,
                        help="Read checkpoints holding pickled objects (weights_only=False: can run code).")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-probes zoo-dataset ...`` (``argv`` without the command word).

    Raises:
        SystemExit: 2 with one ``error:`` line for a bad argument or a missing zoo; 130 on ``Ctrl-C``.
    """
    from jsonargparse import ArgumentError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        kwargs = {k: v for k, v in vars(args).items() if k != "data"}
        kwargs["data_dir"] = args.data.data_dir if args.get("data") else None
        summary = zoo_dataset(**kwargs)
    except (ArgumentError, ValueError, FileNotFoundError) as err:
        if os.environ.get("LIGHTNING_PROBES_DEBUG"):
            raise
        hint = " (see lightning-probes zoo-dataset --help)" if isinstance(err, ArgumentError) else ""
        sys.stderr.write(f"error: {' '.join(str(err).split())}{hint}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    sys.stdout.write(f"zoo data set: {summary['n_kept']} models kept, {summary['n_excluded']} below "
                     f"min_accuracy, {summary['n_samples']} samples -> {args.output}\n")


if __name__ == "__main__":
    main()
