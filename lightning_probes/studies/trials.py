"""A study's trials: the grid x seeds product or the seeded draws of ``sample:``, their ids and labels.

A study file (``lightning_probes.studies.spec``) gives either a ``grid`` of dotted keys, whose cartesian product
times ``seeds`` gives the trials, or ``sample:`` distributions drawn ``num_samples`` times with the semantics of
the Ray Tune search space of the same name. Both give ``Trial`` objects with a stable, file-system-safe id.

Example:
    >>> spec = load_study("configs/studies/quick.yaml")  # doctest: +SKIP
    >>> [t.trial_id for t in expand_trials(spec)]  # doctest: +SKIP
    ['lr=0.1-seed=1', 'lr=0.1-seed=2', 'lr=0.02-seed=1', 'lr=0.02-seed=2']
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_probes.studies.spec import StudySpec, study_error

__all__ = ["Trial", "draw", "expand_trials", "sampled_keys", "scalar_value", "setting_key", "setting_label",
           "trial_id", "tune_search_space"]


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
        raise study_error(spec.path, f"grid values give the same trial id twice: {duplicates[0]!r}")
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




def setting_label(params: Mapping[str, Any]) -> str:
    """``lr=0.05, dropout=0.2``: a setting's grid values by the keys' last dotted component."""
    short = _short_keys(list(params))
    return ", ".join(f"{short[k]}={_value_label(v)}" for k, v in params.items()) or "(base)"


def setting_key(params: Mapping[str, Any]) -> str:
    """A setting's grid values as one hashable key (canonical JSON), to group its seeds."""
    return json.dumps(params, sort_keys=True, default=str)


def scalar_value(value: Any) -> Any:
    """A grid value as a table cell or TensorBoard hparam: a scalar as it is, anything else as JSON."""
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
