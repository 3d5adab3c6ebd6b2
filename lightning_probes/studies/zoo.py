"""The meta-networks' data set: every kept model of a zoo (a study's trials), on chosen test samples.

For every finished trial of the zoo (``<zoo>/trials/<trial_id>/`` with ``config.yaml`` and
``checkpoints/last.ckpt``), ``build_zoo_dataset``:

1. loads the model from its last checkpoint (the class named by the trial's ``config.yaml``) in eval mode;
2. classifies the whole test set of the trial's DataModule (``data_dir`` replaced) and keeps the model when its
   test accuracy is at least ``min_accuracy``;
3. picks up to ``per_class`` correctly and ``per_class`` wrongly classified samples per true class
   (``select_by_correctness``, seeded by ``seed`` and the model id);
4. captures the outputs of ``layers`` on them (``ActivationCapture``, the probes' capture mechanism; eval mode, one
   forward pass), the prediction and ``correct``;
5. measures each sample's stability ratio: the share of ``num_draws`` Gaussian-noise copies (``sigma`` in the
   inputs' normalised units) whose prediction equals the clean one (``noisy_logits`` + ``stability_ratio``, the
   ``NoiseRobustnessMonitor`` maths), the noise drawn from a generator seeded by ``seed`` and the model id, or
   taken from one bank of ``num_draws`` draws seeded by ``noise_bank_seed`` and reused for every image and model
   (the original meta-network study's protocol);
6. with ``features`` ``"boundary"``: each sample's linearised distance to the boundary of every competitor class
   (``boundary_distance``, ``(n, C)``, ``+inf`` at the prediction; ``functional.boundary_distances``); with
   ``"context"``: the model's own confidence profile on a fixed reference set (the first ``context_size`` test
   images), the same for every row of the model (``context``, 8 columns: mean, 10/50/90% quantiles of the max
   softmax, then of the top-1 minus top-2 margin), so a score can be read relative to its model; with
   ``"probes"``: a linear probe per layer of ``probe_layers`` fitted on ``probe_train_size`` of the model's own
   training images (``functional.linear_probes``): ``probe_<layer>`` (class log-probabilities, aligned across
   models), ``probe_margin`` and ``probe_agree`` (the first layer whose probe agrees with the prediction); with
   ``"noise_profile"``: the model's stability under the label's noise on those same training images
   (``functional.noise_profile_features``; ``profile_draws`` noisy copies each): ``noise_profile``, 5 columns.

``checkpoints="epochs"`` makes every ``checkpoints/epoch=<e>*.ckpt`` of a trial a model of its own (the original
study's epoch 1-4 models of one training run); every row carries ``group`` (the id of its trial's first model), so
``ZooDataModule(split_by="model_and_image")`` keeps a run's checkpoints on one side.

Shards ``shard_<k>.npz`` hold ``models_per_shard`` models each: ``model_id``, ``sample_index`` (into the test set),
``label``, ``pred``, ``correct`` (0/1), ``ratio``, ``group``, one flattened float32 array per layer and the
``features``' arrays. ``models.csv`` lists the
kept models (``model_id``, ``trial_id``, ``checkpoint``, ``test_accuracy``, ``shard``, ``n_samples`` and the trial's
sampled hyper-parameters and seed); ``excluded.csv`` the models below ``min_accuracy``. Both are rewritten
atomically after every shard, and ``dataset.json`` records the settings. A rerun skips the models already in a
shard or in ``excluded.csv`` and continues with the trials finished since: a model's id never changes.

A rerun with more ``features`` adds them to the data set built so far: each shard lacking a feature's arrays gets
them, computed from its models' checkpoints on the rows' stored ``sample_index``, and is rewritten atomically (an
interrupted run continues with the shards still lacking them); the arrays equal those a fresh build would give.
Features are never removed, and the other settings must stay the same.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
import yaml

from lightning_probes.io import (
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    module_from_checkpoint,
)
from lightning_probes.studies.zoo_record import (
    CHECKPOINTS,
    FEATURE_SETTINGS,
    FEATURES,
    SCALAR_ARRAYS,
    SELECTIONS,
    TRAIN_SET_FEATURES,
    ZooDatasetSettings,
    batched_logits,
    feature_array_names,
    feature_arrays,
    fit_probes,
    model_context,
    model_record,
    noise_bank,
    seeded,
)

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "FEATURES", "SELECTIONS", "ZooDatasetSettings", "ZooModel", "build_zoo_dataset",
           "find_zoo_models", "fit_probes", "load_model", "load_shards", "load_test_set", "load_train_set",
           "model_context", "model_record", "noise_bank", "seeded"]

@dataclass(frozen=True)
class ZooModel:
    """One finished trial of a zoo.

    Args:
        trial_id: The trial's name.
        trial_dir: Its directory.
        checkpoint: Its ``checkpoints/last.ckpt``.
        config: Its resolved ``config.yaml``.
        params: Its sampled hyper-parameters (``status.json``) and ``seed``.
        group: The training run it comes from (the trial's name; with epoch checkpoints several models share it).
    """

    trial_id: str
    trial_dir: str
    checkpoint: str
    config: dict[str, Any]
    params: dict[str, Any]
    group: str = ""


def _epoch_of(path: str) -> int:
    found = re.search(r"epoch=(\d+)", os.path.basename(path))
    return int(found.group(1)) if found else -1


def find_zoo_models(zoo: str, checkpoints: str = "last") -> list[ZooModel]:
    """The finished trials of a zoo (a study output directory, or its ``trials/`` directory), sorted by id.

    With ``checkpoints="epochs"`` every ``checkpoints/epoch=<e>*.ckpt`` of a finished trial is a model of its own
    (``trial_id`` ``<trial>/epoch=<e>``, in epoch order; ``params`` gain ``epoch``), all with the trial as
    ``group``; a trial without epoch checkpoints gives none.

    Raises:
        FileNotFoundError: If ``zoo`` holds no trial directory.
    """
    root = os.path.join(zoo, "trials") if os.path.isdir(os.path.join(zoo, "trials")) else zoo
    dirs = sorted(d for d in glob.glob(os.path.join(root, "*")) if os.path.isfile(os.path.join(d, "config.yaml")))
    if not dirs:
        raise FileNotFoundError(f"Expected `zoo` to be a study output with trials/<trial_id>/config.yaml, but "
                                f"{zoo!r} has none")
    models = []
    for trial_dir in dirs:
        status_path = os.path.join(trial_dir, "status.json")
        checkpoint = os.path.join(trial_dir, "checkpoints", "last.ckpt")
        try:
            with open(status_path, encoding="utf-8") as handle:
                status = json.load(handle)
        except (OSError, ValueError):
            continue
        if status.get("status") != "finished" or not os.path.isfile(checkpoint):
            continue
        with open(os.path.join(trial_dir, "config.yaml"), encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
        params = {**status.get("params", {}), "seed": status.get("seed")}
        trial = os.path.basename(trial_dir)
        if checkpoints == "epochs":
            epochs = sorted((p for p in glob.glob(os.path.join(trial_dir, "checkpoints", "epoch=*.ckpt"))
                             if _epoch_of(p) >= 0), key=_epoch_of)
            models.extend(ZooModel(f"{trial}/epoch={_epoch_of(p)}", trial_dir, p, config,
                                   {**params, "epoch": _epoch_of(p)}, trial) for p in epochs)
        else:
            models.append(ZooModel(trial, trial_dir, checkpoint, config, params, trial))
    return models


def load_model(model: ZooModel, trust: bool = False) -> torch.nn.Module:
    """The trial's LightningModule, rebuilt from its last checkpoint (class from ``config.yaml``), in eval mode.

    The checkpoint is read with ``torch.load(weights_only=True)`` unless ``trust`` (see
    `lightning_probes.io.read_checkpoint`).
    """
    return module_from_checkpoint(model.checkpoint, "zoo", trust=trust, class_path=model.config["model"]["class_path"])


def load_test_set(config: str, data_dir: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole test set of a trial's DataModule, normalised, as ``(inputs, labels)`` tensors.

    Args:
        config: The trial's ``config.yaml``; its DataModule is built as ``lightning fit`` builds it
            (`lightning_probes.build.build_from_config`).
        data_dir: The DataModule's ``data_dir`` instead of the config's (``None``: the config's).
    """
    from lightning_probes.build import build_from_config

    overrides = {"data.init_args.data_dir": data_dir} if data_dir is not None else None
    datamodule = build_from_config(config, overrides)[1]
    datamodule.setup("test")
    test_set = datamodule.test_set
    inputs = test_set.normalize(test_set.images)
    return inputs, test_set.targets.clone()


def load_train_set(config: str, data_dir: Optional[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` images of a trial's own training split (as ``lightning fit`` built it), normalised, with
    their labels."""
    from lightning_probes.build import build_from_config

    overrides = {"data.init_args.data_dir": data_dir} if data_dir is not None else None
    datamodule = build_from_config(config, overrides)[1]
    datamodule.setup("fit")
    train_set = datamodule.train_set
    return train_set.normalize(train_set.images[:size]), train_set.targets[:size].clone()


#: DataModule arguments that shape only the loaders and the training subset, never the test set: trials that differ
#: only in these share one loaded test set.
_LOADER_ONLY = ("batch_size", "num_workers", "train_size")


def _test_set_key(data: Mapping[str, Any]) -> str:
    """A trial's ``data`` config without `_LOADER_ONLY`: the cache key of its test set."""
    init_args = {k: v for k, v in (data.get("init_args") or {}).items() if k not in _LOADER_ONLY}
    return json.dumps({**data, "init_args": init_args}, sort_keys=True)


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_csv(path: str, rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> None:
    import io

    columns = list(first) + sorted({k for r in rows for k in r} - set(first))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    atomic_write_bytes(path, out.getvalue().encode())


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


_MODEL_COLUMNS = ("model_id", "trial_id", "checkpoint", "test_accuracy", "shard", "n_samples")


def _check_settings(output: str, settings: ZooDatasetSettings) -> list[str]:
    """Compare ``settings`` with the data set already in ``output``; return the features ``settings`` adds to it.

    A built data set may gain features (`FEATURES`): the settings only those added features read
    (`FEATURE_SETTINGS`) may then be set afresh; every other setting must match.
    """
    path = os.path.join(output, "dataset.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        previous = json.load(handle).get("settings", {})
    if not previous:
        return []
    mine = _settings_dict(settings)
    mine.pop("models_per_shard")
    previous.pop("models_per_shard", None)
    # Settings added since a data set was built had their defaults then.
    defaults = {**asdict(ZooDatasetSettings()), "features": [], "probe_layers": ["pool2", "fc1", "fc2"]}
    previous = {**{k: defaults[k] for k in mine if k not in previous}, **previous}
    had = list(previous["features"])
    added = [f for f in settings.features if f not in had]
    free = {k for f in added for k in FEATURE_SETTINGS.get(f, ())} - {
        k for f in had for k in FEATURE_SETTINGS.get(f, ())}
    changed = sorted(k for k in mine if k not in free and k != "features" and previous.get(k) != mine[k])
    dropped = [f for f in had if f not in settings.features]
    if dropped:
        changed.append("features")
    if changed:
        raise ValueError(f"Expected the settings of the data set already in {output!r}, but "
                         f"{', '.join(f'`{k}` is {mine[k]!r} (was {previous.get(k)!r})' for k in changed)}; "
                         "use another `output` or the same settings (features may be added, not removed)")
    return added


def build_zoo_dataset(zoo: str, output: str, data_dir: Optional[str] = None,
                      settings: Optional[ZooDatasetSettings] = None, progress: bool = True,
                      trust_checkpoints: bool = False) -> dict[str, Any]:
    """Build (or continue) the data set of a zoo. See the module's docstring for what is written.

    Args:
        zoo: The zoo's study output directory.
        output: Directory of the shards, ``models.csv``, ``excluded.csv`` and ``dataset.json``.
        data_dir: ``data_dir`` of the trials' DataModule (default: the one in their ``config.yaml``).
        settings: How to build it.
        progress: Show a progress bar.

    Returns:
        ``dataset.json``'s content: settings, counts of kept and excluded models and of samples.

    Raises:
        FileNotFoundError: If ``zoo`` has no trials.
        ValueError: If ``output`` holds a data set built with other settings.
    """
    from tqdm.auto import tqdm

    settings = settings or ZooDatasetSettings()
    models = find_zoo_models(zoo, settings.checkpoints)
    os.makedirs(output, exist_ok=True)
    if _check_settings(output, settings):
        with open(os.path.join(output, "dataset.json"), encoding="utf-8") as handle:
            previous = json.load(handle)
        # Record the new settings first: a rerun after a crash must add the features with these same settings.
        atomic_write_json(os.path.join(output, "dataset.json"), {**previous, "settings": _settings_dict(settings)})
    data_cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    _add_features(models, output, data_dir, settings, data_cache, progress, trust_checkpoints)
    kept = _read_csv(os.path.join(output, "models.csv"))
    excluded = _read_csv(os.path.join(output, "excluded.csv"))
    shards = list(iter_shards(output))
    in_shards = set()
    for path in shards:
        with np.load(path) as data:
            in_shards.update(int(i) for i in np.unique(data["model_id"]))
    kept = [row for row in kept if int(row["model_id"]) in in_shards]  # a row whose shard never landed: redo it
    ids = {row["trial_id"]: int(row["model_id"]) for row in [*kept, *excluded]}
    # A run's group id is the id of its first model (kept or not); rows of older data sets have no group.
    groups: dict[str, int] = {}
    for row in sorted([*kept, *excluded], key=lambda r: int(r["model_id"])):
        groups.setdefault(row.get("group") or row["trial_id"], int(row["model_id"]))
    done = {row["trial_id"] for row in [*kept, *excluded]}
    next_id = max(ids.values(), default=-1) + 1
    todo = [m for m in models if m.trial_id not in done]
    next_shard = 1 + max((_shard_number(p) for p in shards), default=-1)
    pending: list[dict[str, np.ndarray]] = []
    pending_rows: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal next_shard
        if pending:
            arrays = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            name = f"shard_{next_shard:04d}.npz"
            atomic_save_npz(os.path.join(output, name), **arrays)
            for row in pending_rows:
                row["shard"] = name
            kept.extend(pending_rows)
            next_shard += 1
            pending.clear()
            pending_rows.clear()
        _write_csv(os.path.join(output, "models.csv"), kept, _MODEL_COLUMNS)
        _write_csv(os.path.join(output, "excluded.csv"), excluded, _MODEL_COLUMNS[:4])

    bar = tqdm(todo, desc="models", unit="model", disable=not progress)
    for zoo_model in bar:
        model_id = next_id
        next_id += 1
        inputs, labels = _test_set(zoo_model, data_dir, data_cache)
        model = load_model(zoo_model, trust=trust_checkpoints)
        logits = batched_logits(model, inputs)
        accuracy = float((logits.argmax(1) == labels).double().mean())
        group = groups.setdefault(zoo_model.group or zoo_model.trial_id, model_id)
        row = {"model_id": model_id, "trial_id": zoo_model.trial_id, "checkpoint": zoo_model.checkpoint,
               "test_accuracy": round(accuracy, 6), "group": zoo_model.group or zoo_model.trial_id,
               **{_short(k): v for k, v in zoo_model.params.items()}}
        if accuracy < settings.min_accuracy:
            excluded.append(row)
            continue
        probes, reference = _train_set_inputs(zoo_model, model, settings.features, settings, data_dir, data_cache,
                                              int(logits.shape[1]))
        record = model_record(model, inputs, labels, model_id, settings, logits=logits, group=group, probes=probes,
                              reference=reference)
        row["n_samples"] = len(record["model_id"])
        pending.append(record)
        pending_rows.append(row)
        bar.set_postfix(kept=len(kept) + len(pending_rows), excluded=len(excluded))
        if len(pending) >= settings.models_per_shard:
            flush()
    flush()
    summary = {
        "zoo": os.path.abspath(zoo),
        "settings": _settings_dict(settings),
        "n_trials_finished": len(models),
        "n_kept": len(kept),
        "n_excluded": len(excluded),
        "n_samples": int(sum(int(r["n_samples"]) for r in kept)),
        "n_correct_samples": 0,
        "shards": [os.path.basename(p) for p in iter_shards(output)],
    }
    for path in iter_shards(output):
        with np.load(path) as data:
            summary["n_correct_samples"] += int(data["correct"].sum())
    atomic_write_json(os.path.join(output, "dataset.json"), summary)
    return summary


def _settings_dict(settings: ZooDatasetSettings) -> dict[str, Any]:
    return {**asdict(settings), "layers": list(settings.layers), "features": list(settings.features),
            "probe_layers": list(settings.probe_layers)}


def _test_set(zoo_model: ZooModel, data_dir: Optional[str],
              cache: dict[Any, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    key = _test_set_key(zoo_model.config["data"])
    if key not in cache:
        cache[key] = load_test_set(os.path.join(zoo_model.trial_dir, "config.yaml"), data_dir)
    return cache[key]


def _train_set_inputs(zoo_model: ZooModel, model: torch.nn.Module, features: Sequence[str],
                      settings: ZooDatasetSettings, data_dir: Optional[str],
                      cache: dict[Any, tuple[torch.Tensor, torch.Tensor]],
                      num_classes: int) -> tuple[Optional[dict[str, Any]], Optional[torch.Tensor]]:
    """The fitted probes and the reference images of the features that read the model's own training images."""
    if not any(f in TRAIN_SET_FEATURES for f in features):
        return None, None
    key = ("train", json.dumps(zoo_model.config["data"], sort_keys=True))
    if key not in cache:
        for old in [k for k in cache if isinstance(k, tuple) and k[0] == "train"]:
            del cache[old]  # trials rarely share a training subset: keep one in memory
        cache[key] = load_train_set(os.path.join(zoo_model.trial_dir, "config.yaml"), data_dir,
                                    settings.probe_train_size)
    images, labels = cache[key]
    probes = fit_probes(model, images, labels, settings.probe_layers, num_classes) if "probes" in features else None
    return probes, (images if "noise_profile" in features else None)


def _add_features(models: Sequence[ZooModel], output: str, data_dir: Optional[str], settings: ZooDatasetSettings,
                  cache: dict[Any, tuple[torch.Tensor, torch.Tensor]], progress: bool, trust: bool) -> None:
    """Give every shard of ``output`` the arrays of ``settings.features`` it lacks (see the module's docstring)."""
    from tqdm.auto import tqdm

    work = []
    for path in iter_shards(output):
        with np.load(path) as data:
            files = set(data.files)
            model_ids = list(dict.fromkeys(int(i) for i in data["model_id"]))
        missing = [f for f in settings.features if not set(feature_array_names(f, settings)) <= files]
        if missing:
            work.append((path, missing, model_ids))
    if not work:
        return
    rows = {int(r["model_id"]): r for r in _read_csv(os.path.join(output, "models.csv"))}
    by_trial = {m.trial_id: m for m in models}
    bar = tqdm(total=sum(len(ids) for _, _, ids in work), desc="adding features", unit="model",
               disable=not progress)
    for path, missing, model_ids in work:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        parts: dict[str, list[np.ndarray]] = {}
        for model_id in model_ids:
            trial_id = rows[model_id]["trial_id"] if model_id in rows else None
            if trial_id not in by_trial:
                raise FileNotFoundError(f"Expected the zoo to hold the trial of model {model_id} of {path!r} "
                                        f"({trial_id!r}) to add the features {missing}, but it does not")
            zoo_model = by_trial[trial_id]
            inputs, _ = _test_set(zoo_model, data_dir, cache)
            model = load_model(zoo_model, trust=trust)
            rows_of_model = np.flatnonzero(arrays["model_id"] == model_id)
            if len(rows_of_model) != rows_of_model[-1] - rows_of_model[0] + 1:
                raise ValueError(f"Expected the rows of model {model_id} in {path!r} to be contiguous")
            x = inputs[torch.as_tensor(arrays["sample_index"][rows_of_model])]
            with torch.no_grad():
                clean = model(x)
            if not np.array_equal(clean.argmax(dim=1).numpy(), arrays["pred"][rows_of_model]):
                raise ValueError(f"Expected model {model_id} ({zoo_model.checkpoint}) to predict what {path!r} "
                                 "holds for it, but it does not: the checkpoint changed since the data set was built")
            probes, reference = _train_set_inputs(zoo_model, model, missing, settings, data_dir, cache,
                                                  int(clean.shape[1]))
            record = feature_arrays(model, x, clean, missing, settings, model_id,
                                    logits=batched_logits(model, inputs) if "context" in missing else None,
                                    probes=probes, reference=reference)
            for name, values in record.items():
                parts.setdefault(name, []).append(values)
            bar.update(1)
        atomic_save_npz(path, **arrays, **{k: np.concatenate(v) for k, v in parts.items()})
    bar.close()


def _shard_number(path: str) -> int:
    return int(re.findall(r"\d+", os.path.basename(path))[0])


def iter_shards(directory: str) -> Iterator[str]:
    """The shard files of a data set, in order."""
    yield from sorted(glob.glob(os.path.join(directory, "shard_*.npz")), key=_shard_number)


def load_shards(directory: str, layers: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Every shard of a data set concatenated: the scalar arrays and the given ``layers`` (default: all).

    ``layers`` may also name the optional arrays (``group``, ``boundary_distance``, ``context``); ``group`` of a
    shard written before it existed is its ``model_id``.

    Raises:
        FileNotFoundError: If the directory holds no ``shard_*.npz``.
    """
    paths = list(iter_shards(directory))
    if not paths:
        raise FileNotFoundError(f"Expected `data_dir` to hold a zoo data set (shard_*.npz, from `lightning-probes "
                                f"zoo-dataset`), but {directory!r} has none")
    parts: dict[str, list[np.ndarray]] = {}
    for path in paths:
        with np.load(path) as data:
            names = [*SCALAR_ARRAYS, *(n for n in data.files if n not in SCALAR_ARRAYS and
                                       (layers is None or n in layers))]
            missing = [n for n in names if n not in data.files]
            if missing:
                raise ValueError(f"shard {path!r} lacks the arrays {missing}; found {sorted(data.files)}")
            arrays = {name: data[name] for name in names}
            if "group" not in arrays and (layers is None or "group" in layers):
                arrays["group"] = data["model_id"]  # shards from before `group`: each model its own run
            for name, values in arrays.items():
                parts.setdefault(name, []).append(values)
    lengths = {k: sum(len(v) for v in vs) for k, vs in parts.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Expected every shard of {directory!r} to hold the same arrays, but their row counts "
                         f"differ: {lengths}")
    return {k: np.concatenate(v) for k, v in parts.items()}
