"""Study files: reading and validating one into a ``StudySpec``.

A study file names a ``base`` fit config, dotted ``overrides`` applied to every trial and either a ``grid`` of
dotted keys whose cartesian product, times ``seeds``, gives the trials, or ``sample:`` distributions drawn
``num_samples`` times (``lightning_probes.studies.trials`` expands either into trials). Everything is checked
before any trial starts: here the study file's own keys and values; the dotted keys against the LightningCLI parser
in ``lightning_probes.studies.trial_config``.

Example:
    >>> spec = load_study("configs/studies/quick.yaml")  # doctest: +SKIP
    >>> spec.grid  # doctest: +SKIP
    {'model.init_args.lr': [0.1, 0.02]}
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

__all__ = ["DISTRIBUTIONS", "RESERVED_KEYS", "STUDY_KEYS", "StudyError", "StudySpec", "load_study", "study_error"]

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



def _check_distribution(spec_path: str, key: str, value: Any) -> tuple[str, list[Any]]:
    """One ``sample:`` entry (``{loguniform: [1e-3, 0.1]}``) as ``(name, arguments)``, checked."""
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise study_error(spec_path, f"`sample` key `{key}` needs one distribution, one of "
                                     f"{', '.join(DISTRIBUTIONS)}, e.g. `{{loguniform: [0.001, 0.1]}}` or "
                                     f"`{{choice: [relu, tanh]}}`, but got {value!r}")
    name, args = next(iter(value.items()))
    if name == "choice":
        if not isinstance(args, list) or not args:
            raise study_error(spec_path, f"`sample` key `{key}`: `choice` needs a non-empty list of values, but got "
                                         f"{args!r}")
        return name, list(args)
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numbers or not args[0] < args[1]:
        raise study_error(spec_path, f"`sample` key `{key}`: `{name}` needs [low, high] with low < high, but got "
                                     f"{args!r}")
    if name in ("randint", "lograndint") and not all(isinstance(a, int) for a in args):
        raise study_error(spec_path, f"`sample` key `{key}`: `{name}` needs integer bounds [low, high) (high "
                                     f"excluded, as in Ray Tune), but got {args!r}")
    if name in ("loguniform", "lograndint") and args[0] <= 0:
        raise study_error(spec_path, f"`sample` key `{key}`: `{name}` needs a positive low bound, but got {args!r}")
    if key == "seed" and name != "randint":
        raise study_error(spec_path, f"`sample` key `seed` draws each trial's seed: use `{{randint: [low, high]}}`, "
                                     f"but got `{name}`")
    return name, list(args)


def study_error(spec_path: str, message: str) -> StudyError:
    """A ``StudyError`` whose message starts with the study file's path."""
    return StudyError(f"study file {spec_path}: {message}")


def _check_dotted(spec_path: str, where: str, mapping: Any) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise study_error(spec_path, f"expected `{where}` to be a mapping of dotted keys, but got {mapping!r}")
    for key in mapping:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise study_error(spec_path, f"`{where}` key {key!r} is not a dotted key like `model.init_args.lr`")
        if key in RESERVED_KEYS:
            raise study_error(spec_path, f"`{where}` may not set {key!r}: the study sets it for every trial "
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
            raise study_error(path, f"not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise study_error(path, f"expected a mapping with keys {', '.join(STUDY_KEYS)}, but got {raw!r}")
    unknown = [k for k in raw if k not in STUDY_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), STUDY_KEYS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise study_error(path, f"unknown key `{unknown[0]}`{hint}; valid keys: {', '.join(STUDY_KEYS)}")
    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise study_error(path, f"expected `name` to be a word of letters, digits, '_', '-', '.', but got {name!r}")
    if "base" not in raw or not isinstance(raw["base"], str):
        raise study_error(path, f"missing `base`: the path of a fit config, relative to the study file (got "
                                f"{raw.get('base')!r})")
    base = os.path.normpath(os.path.join(os.path.dirname(path), raw["base"]))
    if not os.path.isfile(base):
        raise study_error(path, f"`base` {raw['base']!r} does not exist (looked for {base})")
    overrides = _check_dotted(path, "overrides", raw.get("overrides"))
    grid = _check_dotted(path, "grid", raw.get("grid"))
    sample_raw = _check_dotted(path, "sample", raw.get("sample"))
    if grid and sample_raw:
        raise study_error(path, "give either `grid` (every combination) or `sample` (random draws), not both")
    if not grid and not sample_raw:
        raise study_error(path, "`grid` is empty: give at least one dotted key with a list of values, e.g. "
                                "`grid: {model.init_args.lr: [0.1, 0.01]}` (or `sample:` with `num_samples:`)")
    sample = {key: _check_distribution(path, key, value) for key, value in sample_raw.items()}
    for key in sample:
        if key in overrides:
            raise study_error(path, f"`{key}` is both in `overrides` and in `sample`")
    n_samples = num_samples if num_samples is not None else raw.get("num_samples", 0 if grid else None)
    if sample and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        where = "--num_samples" if num_samples is not None else "`num_samples`"
        raise study_error(path, f"expected {where} to be a positive integer (the number of draws of `sample`), but got "
                                f"{n_samples!r}")
    if grid and (num_samples is not None or raw.get("num_samples") is not None):
        raise study_error(path, "`num_samples` is for a study with `sample:`; this one has a `grid`")
    sample_seed = raw.get("sample_seed", 0)
    if isinstance(sample_seed, bool) or not isinstance(sample_seed, int) or sample_seed < 0:
        raise study_error(path, f"expected `sample_seed` to be a non-negative integer, but got {sample_seed!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise study_error(path, f"`grid` key `{key}` needs a non-empty list of values, but got {values!r}")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise study_error(path, f"`grid` key `{key}` repeats a value: {values!r}")
        if key in overrides:
            raise study_error(path, f"`{key}` is both in `overrides` and in `grid`")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise study_error(path, f"expected `seeds` to be a non-empty list of distinct integers, but got {seeds!r}")
    monitor = raw.get("monitor", "val/acc")
    if not isinstance(monitor, str) or not monitor:
        raise study_error(path, f"expected `monitor` to be a metric name such as 'val/acc', but got {monitor!r}")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise study_error(path, f"expected `mode` to be 'max' or 'min', but got {mode!r}")
    smoothing = raw.get("smoothing", 5)
    if isinstance(smoothing, bool) or not isinstance(smoothing, int) or smoothing < 1:
        raise study_error(path, f"expected `smoothing` to be a positive integer, but got {smoothing!r}")
    test = raw.get("test", True)
    if not isinstance(test, bool):
        raise study_error(path, f"expected `test` to be true or false, but got {test!r}")
    out = output or raw.get("output") or os.path.join("runs", "studies", name)
    if not isinstance(out, str):
        raise study_error(path, f"expected `output` to be a directory path, but got {out!r}")
    if "seed" in sample and "seeds" in raw:
        raise study_error(path, "`sample` draws `seed`; drop `seeds` (or drop `seed` from `sample`)")
    return StudySpec(name=name, path=path, base=base, overrides=overrides, grid=grid, seeds=list(seeds),
                     sample=sample, num_samples=n_samples or 0, sample_seed=sample_seed, monitor=monitor, mode=mode,
                     smoothing=smoothing, test=test, output=os.path.abspath(out))


