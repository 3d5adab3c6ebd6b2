"""Study files: parsing, validation, the grid x seeds expansion into trials, and each trial's resolved config.

A study file names a ``base`` fit config, dotted ``overrides`` applied to every trial and a ``grid`` of dotted keys
whose cartesian product, times ``seeds``, gives the trials. Everything is checked before any trial starts: the
study file's own keys and values, the base config, and every dotted key, against the LightningCLI parser of
``lightning_probes.cli`` (parsed, never instantiated). A key must be a key of the resolved config (base config plus
every default, for the trial's model and data classes); an unknown one gives one message that names it and the
closest valid keys.

Example:
    >>> spec = load_study("configs/studies/quick.yaml")  # doctest: +SKIP
    >>> [t.trial_id for t in expand_trials(spec)]  # doctest: +SKIP
    ['lr=0.1-seed=1', 'lr=0.1-seed=2', 'lr=0.02-seed=1', 'lr=0.02-seed=2']
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

log = logging.getLogger(__name__)

__all__ = ["StudyError", "StudySpec", "Trial", "TrialConfigResolver", "draw", "expand_trials", "load_study",
           "sampled_keys", "tune_search_space"]

# Keys of a study file, with their meaning (the error for an unknown key lists them).
STUDY_KEYS = ("name", "base", "overrides", "grid", "sample", "num_samples", "sample_seed", "seeds", "monitor", "mode",
              "smoothing", "test", "output")
# Distributions of `sample:`, each named after the Ray Tune search space it is (`tune.<name>(*args)`).
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "lograndint", "choice")
# Set by the study for every trial: a study file may not override them.
RESERVED_KEYS = ("seed_everything", "trainer.logger", "trainer.default_root_dir", "ckpt_path")


class StudyError(ValueError):
    """A study file is wrong; the message names the file, the key, and what is valid."""


@dataclass(frozen=True)
class StudySpec:
    """A validated study file.

    Args:
        name: Study name (default: the file stem).
        path: Absolute path of the study file.
        base: Absolute path of the base fit config.
        overrides: Dotted keys applied to every trial.
        grid: Dotted key -> list of values; the trials are their cartesian product times ``seeds``.
        seeds: Seeds; every grid point (or sample) runs with every seed (``seed_everything``).
        sample: Instead of a grid, dotted key -> ``(distribution, arguments)`` (``("loguniform", [1e-3, 0.1])``);
            ``num_samples`` seeded draws each give a trial. The key ``seed`` draws each trial's seed (``randint``).
        num_samples: Number of draws of ``sample``.
        sample_seed: Seed of the draws: draw ``i`` uses ``numpy.random.default_rng([sample_seed, i])``, so it is the
            same whatever ``num_samples`` is (a larger study keeps the trials of a smaller one).
        monitor: Epoch metric that picks the best setting (mean over seeds of its final-epoch value).
        mode: ``"max"`` or ``"min"``: whether a larger ``monitor`` is better.
        smoothing: Moving-average window of the plotted curves.
        test: Run ``test`` on each trial's last checkpoint after ``fit``.
        output: Output directory (default ``runs/studies/<name>``, relative to the working directory).
    """

    name: str
    path: str
    base: str
    overrides: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    sample: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)
    num_samples: int = 0
    sample_seed: int = 0
    monitor: str = "val/acc"
    mode: str = "max"
    smoothing: int = 5
    test: bool = True
    output: str = ""


@dataclass(frozen=True)
class Trial:
    """One run of a study: a grid point and a seed.

    Args:
        trial_id: Stable, file-system-safe name built from the grid values and the seed (``lr=0.05-seed=1``).
        params: Grid key -> value of this trial.
        seed: Its seed.
    """

    trial_id: str
    params: dict[str, Any] = field(hash=False)
    seed: int = 0


def _check_distribution(spec_path: str, key: str, value: Any) -> tuple[str, list[Any]]:
    """One ``sample:`` entry (``{loguniform: [1e-3, 0.1]}``) as ``(name, arguments)``, checked."""
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise _fail(spec_path, f"`sample` key `{key}` needs one distribution, one of {', '.join(DISTRIBUTIONS)}, "
                               f"e.g. `{{loguniform: [0.001, 0.1]}}` or `{{choice: [relu, tanh]}}`, but got {value!r}")
    name, args = next(iter(value.items()))
    if name == "choice":
        if not isinstance(args, list) or not args:
            raise _fail(spec_path, f"`sample` key `{key}`: `choice` needs a non-empty list of values, but got {args!r}")
        return name, list(args)
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numbers or not args[0] < args[1]:
        raise _fail(spec_path, f"`sample` key `{key}`: `{name}` needs [low, high] with low < high, but got {args!r}")
    if name in ("randint", "lograndint") and not all(isinstance(a, int) for a in args):
        raise _fail(spec_path, f"`sample` key `{key}`: `{name}` needs integer bounds [low, high) (high excluded, as "
                               f"in Ray Tune), but got {args!r}")
    if name in ("loguniform", "lograndint") and args[0] <= 0:
        raise _fail(spec_path, f"`sample` key `{key}`: `{name}` needs a positive low bound, but got {args!r}")
    if key == "seed" and name != "randint":
        raise _fail(spec_path, f"`sample` key `seed` draws each trial's seed: use `{{randint: [low, high]}}`, but "
                               f"got `{name}`")
    return name, list(args)


def draw(distribution: tuple[str, list[Any]], rng: Any) -> Any:
    """One value of a ``sample:`` distribution, with the semantics of the Ray Tune search space of that name.

    ``uniform``/``loguniform``: a float in ``[low, high)`` (uniform in ``log`` for ``loguniform``); ``randint``:
    an integer in ``[low, high)``; ``lograndint``: an integer in ``[low, high)``, the floor of a log-uniform draw;
    ``choice``: one of the values, each as likely.

    Args:
        distribution: ``(name, arguments)``.
        rng: A ``numpy.random.Generator``.

    Example:
        >>> import numpy as np
        >>> 1e-3 <= draw(("loguniform", [1e-3, 1e-1]), np.random.default_rng(0)) < 1e-1
        True
    """
    import math

    name, args = distribution
    if name == "choice":
        return args[int(rng.integers(len(args)))]
    if name == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if name == "loguniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if name == "randint":
        return int(rng.integers(args[0], args[1]))
    value = int(math.floor(math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))))  # lograndint
    return min(max(value, args[0]), args[1] - 1)


def tune_search_space(spec: StudySpec) -> dict[str, Any]:
    """The study's ``sample:`` as Ray Tune search spaces (``tune.loguniform(...)``, ...), dotted key -> domain.

    The study itself draws its trials once, seeded, before any runs (``expand_trials``), so both engines run the
    same trials and a rerun resumes them; this is the same space for Tune's own search algorithms.

    Raises:
        ImportError: If Ray Tune is not installed.
    """
    from ray import tune

    return {key: getattr(tune, name)(args) if name == "choice" else getattr(tune, name)(*args)
            for key, (name, args) in spec.sample.items()}


def _fail(spec_path: str, message: str) -> StudyError:
    return StudyError(f"study file {spec_path}: {message}")


def _check_dotted(spec_path: str, where: str, mapping: Any) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise _fail(spec_path, f"expected `{where}` to be a mapping of dotted keys, but got {mapping!r}")
    for key in mapping:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise _fail(spec_path, f"`{where}` key {key!r} is not a dotted key like `model.init_args.lr`")
        if key in RESERVED_KEYS:
            raise _fail(spec_path, f"`{where}` may not set {key!r}: the study sets it for every trial "
                                   f"(reserved: {', '.join(RESERVED_KEYS)})")
    return dict(mapping)


def load_study(path: str, output: Optional[str] = None, num_samples: Optional[int] = None) -> StudySpec:
    """Read and validate a study file (its own keys; the dotted keys are checked by ``TrialConfigResolver``).

    Args:
        path: The study YAML file.
        output: Output directory overriding the file's ``output``.
        num_samples: Number of draws overriding the file's ``num_samples`` (a study with ``sample:`` only).

    Returns:
        The ``StudySpec``.

    Raises:
        StudyError: With one message naming the key and what is valid.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise StudyError(f"study file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise _fail(path, f"not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise _fail(path, f"expected a mapping with keys {', '.join(STUDY_KEYS)}, but got {raw!r}")
    unknown = [k for k in raw if k not in STUDY_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), STUDY_KEYS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise _fail(path, f"unknown key `{unknown[0]}`{hint}; valid keys: {', '.join(STUDY_KEYS)}")
    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise _fail(path, f"expected `name` to be a word of letters, digits, '_', '-', '.', but got {name!r}")
    if "base" not in raw or not isinstance(raw["base"], str):
        raise _fail(path, f"missing `base`: the path of a fit config, relative to the study file (got "
                          f"{raw.get('base')!r})")
    base = os.path.normpath(os.path.join(os.path.dirname(path), raw["base"]))
    if not os.path.isfile(base):
        raise _fail(path, f"`base` {raw['base']!r} does not exist (looked for {base})")
    overrides = _check_dotted(path, "overrides", raw.get("overrides"))
    grid = _check_dotted(path, "grid", raw.get("grid"))
    sample_raw = _check_dotted(path, "sample", raw.get("sample"))
    if grid and sample_raw:
        raise _fail(path, "give either `grid` (every combination) or `sample` (random draws), not both")
    if not grid and not sample_raw:
        raise _fail(path, "`grid` is empty: give at least one dotted key with a list of values, e.g. "
                          "`grid: {model.init_args.lr: [0.1, 0.01]}` (or `sample:` with `num_samples:`)")
    sample = {key: _check_distribution(path, key, value) for key, value in sample_raw.items()}
    for key in sample:
        if key in overrides:
            raise _fail(path, f"`{key}` is both in `overrides` and in `sample`")
    n_samples = num_samples if num_samples is not None else raw.get("num_samples", 0 if grid else None)
    if sample and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        where = "--num_samples" if num_samples is not None else "`num_samples`"
        raise _fail(path, f"expected {where} to be a positive integer (the number of draws of `sample`), but got "
                          f"{n_samples!r}")
    if grid and (num_samples is not None or raw.get("num_samples") is not None):
        raise _fail(path, "`num_samples` is for a study with `sample:`; this one has a `grid`")
    sample_seed = raw.get("sample_seed", 0)
    if isinstance(sample_seed, bool) or not isinstance(sample_seed, int) or sample_seed < 0:
        raise _fail(path, f"expected `sample_seed` to be a non-negative integer, but got {sample_seed!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"`grid` key `{key}` needs a non-empty list of values, but got {values!r}")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise _fail(path, f"`grid` key `{key}` repeats a value: {values!r}")
        if key in overrides:
            raise _fail(path, f"`{key}` is both in `overrides` and in `grid`")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise _fail(path, f"expected `seeds` to be a non-empty list of distinct integers, but got {seeds!r}")
    monitor = raw.get("monitor", "val/acc")
    if not isinstance(monitor, str) or not monitor:
        raise _fail(path, f"expected `monitor` to be a metric name such as 'val/acc', but got {monitor!r}")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise _fail(path, f"expected `mode` to be 'max' or 'min', but got {mode!r}")
    smoothing = raw.get("smoothing", 5)
    if isinstance(smoothing, bool) or not isinstance(smoothing, int) or smoothing < 1:
        raise _fail(path, f"expected `smoothing` to be a positive integer, but got {smoothing!r}")
    test = raw.get("test", True)
    if not isinstance(test, bool):
        raise _fail(path, f"expected `test` to be true or false, but got {test!r}")
    out = output or raw.get("output") or os.path.join("runs", "studies", name)
    if not isinstance(out, str):
        raise _fail(path, f"expected `output` to be a directory path, but got {out!r}")
    if "seed" in sample and "seeds" in raw:
        raise _fail(path, "`sample` draws `seed`; drop `seeds` (or drop `seed` from `sample`)")
    return StudySpec(name=name, path=path, base=base, overrides=overrides, grid=grid, seeds=list(seeds),
                     sample=sample, num_samples=n_samples or 0, sample_seed=sample_seed, monitor=monitor, mode=mode,
                     smoothing=smoothing, test=test, output=os.path.abspath(out))


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The last component of each dotted key, or the whole key where two keys share their last component."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _value_label(value: Any) -> str:
    if isinstance(value, Mapping) and "class_path" in value:  # a whole component: `DropoutNet+dropout=0.6`
        init_args = value.get("init_args") or {}
        return "+".join([_value_label(str(value["class_path"])), *(f"{k}={_value_label(v)}"
                                                                   for k, v in init_args.items())])
    if isinstance(value, str):
        # A class path names its class (`lightning_probes.models.MLP` -> `MLP`); a file name stays whole.
        return value.rsplit(".", 1)[-1] if re.fullmatch(r"\w+(\.\w+)*\.[A-Z]\w*", value) else value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "_"


def trial_id(params: Mapping[str, Any], seed: int, short: Optional[Mapping[str, str]] = None) -> str:
    """A stable, file-system-safe trial name from its grid values and seed.

    Args:
        params: Grid key -> value.
        seed: The seed.
        short: Display name of each key (default: its last dotted component).

    Returns:
        E.g. ``"lr=0.05-seed=1"``.

    Example:
        >>> trial_id({"model.init_args.lr": 0.05}, 1)
        'lr=0.05-seed=1'
    """
    short = short or _short_keys(list(params))
    parts = [f"{short[k]}={_value_label(v)}" for k, v in params.items()]
    return _sanitize("-".join([*parts, f"seed={seed}"]))


def expand_trials(spec: StudySpec) -> list[Trial]:
    """The grid's cartesian product times the seeds, grid-point-major, in the order of the study file; or, for a
    study with ``sample:``, its ``num_samples`` draws (times the seeds unless ``seed`` is drawn), ids
    ``sample=<i>-seed=<seed>``.

    Raises:
        StudyError: If two trials get the same id (values that differ only in characters a path cannot hold).
    """
    if spec.sample:
        return _sampled_trials(spec)
    keys = list(spec.grid)
    short = _short_keys(keys)
    trials = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        params = dict(zip(keys, values))
        for seed in spec.seeds:
            trials.append(Trial(trial_id(params, seed, short), params, seed))
    ids = [t.trial_id for t in trials]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise _fail(spec.path, f"grid values give the same trial id twice: {duplicates[0]!r}")
    return trials


def _sampled_trials(spec: StudySpec) -> list[Trial]:
    import numpy as np

    width = max(4, len(str(spec.num_samples - 1)))
    trials = []
    for i in range(spec.num_samples):
        rng = np.random.default_rng([spec.sample_seed, i])
        params = {key: draw(dist, rng) for key, dist in spec.sample.items()}
        seeds = [params.pop("seed")] if "seed" in params else spec.seeds
        for seed in seeds:
            trials.append(Trial(_sanitize(f"sample={i:0{width}d}-seed={seed}"), params, seed))
    return trials


def sampled_keys(spec: StudySpec) -> list[str]:
    """The dotted keys that vary between trials: the grid's, or the drawn ones (``seed`` excepted)."""
    return list(spec.grid) if spec.grid else [k for k in spec.sample if k != "seed"]


def _key_paths(tree: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted path of a nested mapping, inner nodes included (lists are leaves)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _key_paths(value, path)


def _cli_value(value: Any) -> str:
    """A value as jsonargparse reads it on the command line (JSON is YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def _is_checkpoint_callback(entry: Any) -> bool:
    return isinstance(entry, Mapping) and str(entry.get("class_path", "")).endswith("ModelCheckpoint")


def config_digest(config: Mapping[str, Any]) -> str:
    """A short hash of a resolved config, kept in ``status.json`` to notice a study file changed under a trial."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrialConfigResolver:
    """Resolves and validates trial configs with the LightningCLI ``fit`` parser, without instantiating anything.

    Building the parser imports every model, DataModule and probe (seconds); parsing one trial takes
    milliseconds.

    Args:
        spec: The study.

    Raises:
        StudyError: If the base config does not parse.
    """

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self._parser = _fit_parser(spec.base, spec.path)
        base_config = self._parse(spec.base, [])
        self._base_keys = set(_key_paths(base_config))

    def _parse(self, base: str, args: list[str]) -> dict[str, Any]:
        from argparse import ArgumentError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                namespace = self._parser.parse_args(["--config", base, *args])
            except (ArgumentError, SystemExit) as err:
                raise _ParseError(str(err)) from None
            dumped = self._parser.dump(namespace, skip_link_targets=False, skip_none=False)
        return yaml.safe_load(dumped)

    def _unknown_key_error(self, key: str, where: str, known: set[str]) -> StudyError:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k for k in known if k.rsplit(".", 1)[0] == parent and "." in k) if parent else []
        close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
        valid = f" Valid keys under `{parent}`: {', '.join(s.rsplit('.', 1)[-1] for s in siblings)}" if siblings else ""
        return _fail(self.spec.path, f"unknown key `{key}` in `{where}`{hint}{valid}")

    def resolve(self, trial: Trial, trial_dir: str) -> dict[str, Any]:
        """The trial's full config: base, overrides, grid values, seed, loggers and checkpoints in ``trial_dir``.

        Args:
            trial: The trial.
            trial_dir: Its directory (absolute); TensorBoard and CSV logs and checkpoints go there.

        Returns:
            The resolved config (a plain dict, as ``lightning fit --print_config`` would print it).

        Raises:
            StudyError: For an unknown dotted key or a value the parser rejects.
        """
        settings = [("overrides", k, v) for k, v in self.spec.overrides.items()]
        settings += [("sample" if self.spec.sample else "grid", k, v) for k, v in trial.params.items()]
        args: list[str] = []
        for _, key, value in settings:
            args += [f"--{key}", _cli_value(value)]
        args += ["--seed_everything", str(trial.seed), "--trainer.default_root_dir", trial_dir,
                 "--trainer.logger", json.dumps(trial_loggers(trial_dir))]
        if "trainer.enable_progress_bar" not in self.spec.overrides:
            args += ["--trainer.enable_progress_bar", "false"]  # the trial's log is a file
        try:
            config = self._parse(self.spec.base, args)
        except _ParseError as err:
            for where, key, _ in settings:
                if key not in self._base_keys:
                    raise self._unknown_key_error(key, where, self._base_keys) from None
            message = str(err).strip().splitlines()
            raise _fail(self.spec.path, f"trial {trial.trial_id}: {' '.join(s.strip() for s in message[:6])}") \
                from None
        known = set(_key_paths(config))
        for where, key, _ in settings:
            if key not in known:  # jsonargparse accepts abbreviations and `model.lr` for `model.init_args.lr`
                raise self._unknown_key_error(key, where, known | self._base_keys)
        _checkpoints_into(config, trial_dir)
        return config


class _ParseError(Exception):
    pass


def trial_loggers(trial_dir: str, csv_dir: Optional[str] = None) -> list[dict[str, Any]]:
    """A TensorBoardLogger and a CSVLogger writing straight into ``trial_dir`` (``csv_dir`` for the CSV).

    ``name`` and ``version`` are empty, so ``trainer.log_dir`` is the trial directory itself and a resumed run
    keeps writing there. Lightning saves the CSV after its own logging calls; the probes log their scalars straight
    to the loggers, so ``flush_logs_every_n_steps=1`` writes those rows at once too (appending; the file is
    rewritten only when new columns appear) instead of holding up to 100 steps of them in memory.
    """
    return [
        {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
         "init_args": {"save_dir": trial_dir, "name": "", "version": "", "default_hp_metric": False}},
        {"class_path": "pytorch_lightning.loggers.CSVLogger",
         "init_args": {"save_dir": csv_dir or trial_dir, "name": "", "version": "", "flush_logs_every_n_steps": 1}},
    ]


def _checkpoints_into(config: dict[str, Any], trial_dir: str) -> None:
    """Point every ``ModelCheckpoint`` at ``<trial_dir>/checkpoints`` with ``save_last``; add one if none."""
    trainer = config.setdefault("trainer", {})
    callbacks = trainer.get("callbacks")
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, Mapping):
        callbacks = [callbacks]
    checkpoint_dir = os.path.join(trial_dir, "checkpoints")
    found = False
    for entry in callbacks:
        if _is_checkpoint_callback(entry):
            found = True
            init_args = entry.setdefault("init_args", {}) or {}
            entry["init_args"] = init_args
            init_args["dirpath"] = checkpoint_dir
            init_args["save_last"] = True
    if not found:
        callbacks.append({"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": checkpoint_dir, "save_last": True}})
    trainer["callbacks"] = callbacks
    trainer["enable_checkpointing"] = True


def _fit_parser(base: str, spec_path: str) -> Any:
    """The ``fit`` parser of the project's LightningCLI, built once, raising instead of exiting."""
    from argparse import ArgumentError

    import pytorch_lightning as pl

    from lightning_probes.cli import ProbesCLI

    class _ParseOnlyCLI(ProbesCLI):
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cli = _ParseOnlyCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                                subclass_mode_data=True, args=["fit", "--config", base],
                                parser_kwargs={"default_env": False}, save_config_kwargs={"overwrite": True})
        except (ArgumentError, SystemExit, ValueError) as err:
            raise _fail(spec_path, f"`base` {base} is not a valid fit config: {err}") from None
    parser = cli._subcommand_parsers["fit"]
    parser.exit_on_error = False
    return parser
