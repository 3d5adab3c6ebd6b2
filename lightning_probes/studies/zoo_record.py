"""One model's rows of the meta-networks' data set, and the settings of the data set (see `studies.zoo`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["CHECKPOINTS", "DEFAULT_LAYERS", "FEATURES", "SCALAR_ARRAYS", "SELECTIONS", "ZooDatasetSettings",
           "batched_logits", "feature_array_names", "feature_arrays", "fit_probes", "model_context", "model_record",
           "noise_bank", "reference_noisy_pred", "seeded"]

DEFAULT_LAYERS = ("pool2", "fc1", "fc2", "fc3")
SCALAR_ARRAYS = ("model_id", "sample_index", "label", "pred", "correct", "ratio")
#: Extra per-sample arrays `model_record` can store (``ZooDatasetSettings.features``).
FEATURES = ("boundary", "context", "probes", "noise_profile")
#: The settings each feature alone reads: a feature added to a built data set may set them afresh.
FEATURE_SETTINGS = {"context": ("context_size",), "probes": ("probe_layers", "probe_train_size"),
                    "noise_profile": ("probe_train_size", "profile_draws")}
#: Features measured on the model's own training images (the first ``probe_train_size`` of its training split).
TRAIN_SET_FEATURES = ("probes", "noise_profile")
SELECTIONS = ("random", "first")
CHECKPOINTS = ("last", "epochs")


@dataclass(frozen=True)
class ZooDatasetSettings:
    """How the data set is built (kept in ``dataset.json``; a rerun must use the same).

    Args:
        sigma: Standard deviation of the Gaussian input noise, in normalised input units.
        num_draws: Noisy copies per sample.
        per_class: Most correctly and most wrongly classified samples per true class and model.
        min_accuracy: Models whose test accuracy is below this are left out.
        layers: Modules whose outputs are stored (their names in the model's network, without ``net.``).
        seed: Seed of the sample choice and of the noise (combined with each model id).
        models_per_shard: Models per ``shard_<k>.npz``.
        selection: ``"random"`` (seeded per model) or ``"first"`` (the first correct and wrong samples per class
            in test-set order: the original study's).
        noise_bank_seed: Seed of one bank of ``num_draws`` noise draws reused for every image and model;
            ``None``: fresh noise per image, seeded by ``seed`` and the model id.
        features: Extra arrays from `FEATURES`: ``"boundary"`` (linearised boundary distances), ``"context"``
            (the model's confidence profile on ``context_size`` reference images), ``"probes"`` (linear probes'
            class scores), ``"noise_profile"`` (the model's stability under the same noise on its own training
            images: `functional.noise_profile_features`).
        context_size: Reference images (the first of the test set) of the ``"context"`` feature.
        probe_layers: The layers of the ``"probes"`` feature.
        probe_train_size: Training images (the first of the trial's own training split) each probe is fitted on
            and the noise profile is measured on.
        profile_draws: Noisy copies of each of those images for the ``"noise_profile"`` feature (noise from a
            generator seeded by ``seed`` and the model id, apart from the label's).
        checkpoints: ``"last"`` (one model per trial, its ``last.ckpt``) or ``"epochs"`` (every epoch checkpoint
            of a trial is a model; the trials must keep them: ``ModelCheckpoint(save_top_k=-1)``).
    """

    sigma: float = 1.0
    num_draws: int = 50
    per_class: int = 10
    min_accuracy: float = 0.6
    layers: tuple[str, ...] = DEFAULT_LAYERS
    seed: int = 0
    models_per_shard: int = 16
    selection: str = "random"
    noise_bank_seed: Optional[int] = None
    features: tuple[str, ...] = ()
    context_size: int = 1000
    checkpoints: str = "last"
    probe_layers: tuple[str, ...] = ("pool2", "fc1", "fc2")
    probe_train_size: int = 2000
    profile_draws: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.sigma, (int, float)) and not isinstance(self.sigma, bool) and self.sigma > 0):
            raise ValueError(f"Expected `sigma` to be a positive number, but got {self.sigma!r}")
        for name in ("num_draws", "per_class", "models_per_shard", "context_size", "probe_train_size",
                     "profile_draws"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}")
        if not 0 <= self.min_accuracy <= 1:
            raise ValueError(f"Expected `min_accuracy` to be in [0, 1], but got {self.min_accuracy!r}")
        if not self.layers or not all(isinstance(n, str) and n for n in self.layers):
            raise ValueError(f"Expected `layers` to be a non-empty list of module names, but got {self.layers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Expected `seed` to be a non-negative integer, but got {self.seed!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"Expected `selection` to be one of {SELECTIONS}, but got {self.selection!r}")
        if self.noise_bank_seed is not None and (isinstance(self.noise_bank_seed, bool)
                                                 or not isinstance(self.noise_bank_seed, int)
                                                 or self.noise_bank_seed < 0):
            raise ValueError(f"Expected `noise_bank_seed` to be None or a non-negative integer, but got "
                             f"{self.noise_bank_seed!r}")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"Expected `features` to be names from {FEATURES}, but got {list(self.features)!r}")
        if self.checkpoints not in CHECKPOINTS:
            raise ValueError(f"Expected `checkpoints` to be one of {CHECKPOINTS}, but got {self.checkpoints!r}")


def feature_array_names(feature: str, settings: ZooDatasetSettings) -> list[str]:
    """The shard arrays one feature of `FEATURES` writes."""
    if feature == "probes":
        return [*(f"probe_{n}" for n in settings.probe_layers), "probe_margin", "probe_agree"]
    return [{"boundary": "boundary_distance"}.get(feature, feature)]


def fit_probes(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, layers: Sequence[str],
               num_classes: int) -> dict[str, Any]:
    """One `fit_linear_probe` per layer on the model's outputs for ``inputs`` (its training images)."""
    from lightning_probes.capture import ActivationCapture, select_modules
    from lightning_probes.functional import fit_linear_probe

    capture = ActivationCapture(select_modules(getattr(model, "net", model), list(layers)), max_features=None)
    with torch.no_grad(), capture.capturing():
        model(inputs)
    outputs = capture.pop()
    return {name: fit_linear_probe(outputs[name].flatten(1), labels, num_classes) for name in layers}


def batched_logits(model: torch.nn.Module, inputs: torch.Tensor, size: int = 2048) -> torch.Tensor:
    """The model's outputs on ``inputs`` in batches of ``size``, without gradients."""
    with torch.no_grad():
        return torch.cat([model(part) for part in inputs.split(size)])


def seeded(seed: int, model_id: int, purpose: str) -> torch.Generator:
    """The CPU generator of one model's sample choice (``purpose="choice"``), label noise (``"noise"``) or noise
    profile (``"profile"``).

    Seeded with ``seed * 1_000_003 + model_id`` for the choice, that plus ``500_001`` for the noise and plus
    ``750_001`` for the profile, so each can be replayed on its own.
    """
    offset = {"choice": 0, "noise": 500_001, "profile": 750_001}[purpose]
    return torch.Generator().manual_seed(seed * 1_000_003 + model_id + offset)


def noise_bank(seed: int, num_draws: int, shape: Sequence[int]) -> torch.Tensor:
    """``(num_draws, *shape)`` standard-normal draws from a CPU generator seeded by ``seed`` (one bank for all)."""
    return torch.randn((num_draws, *shape), generator=torch.Generator().manual_seed(seed))


def model_context(logits: torch.Tensor) -> np.ndarray:
    """A model's confidence profile on reference images: mean and 10/50/90% quantiles of its max softmax, then of
    its top-1 minus top-2 softmax margin (8 float32 values)."""
    p = logits.double().softmax(dim=1)
    top2 = p.topk(2, dim=1).values
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    parts = []
    for values in (top2[:, 0], top2[:, 0] - top2[:, 1]):
        parts.extend([values.mean().reshape(1), torch.quantile(values, q)])
    return torch.cat(parts).float().numpy()


def reference_noisy_pred(model: torch.nn.Module, reference: torch.Tensor, model_id: int,
                         settings: ZooDatasetSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's clean logits ``(M, C)`` and noisy predictions ``(profile_draws, M)`` on its reference images
    (the ``"noise_profile"`` feature's inputs; noise seeded by `seeded` ``"profile"``, sigma ``settings.sigma``)."""
    from lightning_probes.functional import noisy_logits

    clean = batched_logits(model, reference)
    noisy = noisy_logits(model, reference, settings.sigma, settings.profile_draws,
                         generator=seeded(settings.seed, model_id, "profile"), chunk_size=2048)
    return clean, noisy.argmax(dim=-1)


def feature_arrays(model: torch.nn.Module, x: torch.Tensor, clean: torch.Tensor, features: Sequence[str],
                   settings: ZooDatasetSettings, model_id: int, logits: Optional[torch.Tensor] = None,
                   outputs: Optional[Mapping[str, torch.Tensor]] = None, probes: Optional[Mapping[str, Any]] = None,
                   reference: Optional[torch.Tensor] = None) -> dict[str, np.ndarray]:
    """The arrays of ``features`` (names from `FEATURES`) for one model's chosen samples.

    Args:
        model: The classifier, in eval mode.
        x: ``(n, ...)`` the chosen samples' inputs.
        clean: ``(n, C)`` the model's logits on them.
        features: The features to compute.
        settings: The data set's settings.
        model_id: The model's id (seeds the noise profile).
        logits: ``(N, C)`` the model's logits on the whole test set (the ``"context"`` feature reads the first
            ``context_size``).
        outputs: The layer outputs on ``x`` when already captured (``probe_layers`` at least); else captured here.
        probes: The model's fitted probes (`fit_probes`), for ``"probes"``.
        reference: The model's reference (training) images, for ``"noise_profile"``.

    Raises:
        ValueError: If a feature's input (``logits``, ``probes``, ``reference``) is missing.
    """
    from lightning_probes.capture import ActivationCapture, select_modules
    from lightning_probes.functional import boundary_distances, linear_probe_features, noise_profile_features

    record: dict[str, np.ndarray] = {}
    clean_pred = clean.argmax(dim=1)
    num_classes = int(clean.shape[1])
    if "boundary" in features:
        record["boundary_distance"] = boundary_distances(model, x)["distance"].float().numpy()
    if "context" in features:
        if logits is None:
            raise ValueError("The 'context' feature needs the model's logits on the test set")
        record["context"] = np.tile(model_context(logits[: settings.context_size]), (len(x), 1))
    if "probes" in features:
        if probes is None:
            raise ValueError("The 'probes' feature needs the model's fitted probes (`fit_probes`)")
        layers = list(settings.probe_layers)
        if outputs is None or any(n not in outputs for n in layers):
            capture = ActivationCapture(select_modules(getattr(model, "net", model), layers), max_features=None)
            with torch.no_grad(), capture.capturing():
                model(x)
            outputs = capture.pop()
        record.update(linear_probe_features(probes, {n: outputs[n] for n in layers}, clean_pred, num_classes,
                                            layers))
    if "noise_profile" in features:
        if reference is None:
            raise ValueError("The 'noise_profile' feature needs the model's reference (training) images")
        reference_logits, reference_pred = reference_noisy_pred(model, reference, model_id, settings)
        record["noise_profile"] = noise_profile_features(reference_logits, reference_pred, clean)
    return record


def model_record(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, model_id: int,
                 settings: ZooDatasetSettings, logits: Optional[torch.Tensor] = None,
                 group: Optional[int] = None, probes: Optional[Mapping[str, Any]] = None,
                 reference: Optional[torch.Tensor] = None) -> dict[str, np.ndarray]:
    """The data set's rows of one model: chosen samples, their layer outputs, prediction, correctness and ratio.

    Args:
        model: The classifier (a LightningModule whose network is ``model.net``, or a plain module), in eval mode.
        inputs: ``(N, ...)`` normalised test inputs.
        labels: ``(N,)`` their classes.
        model_id: The model's id (seeds the choice and the noise with ``settings.seed``: `seeded`).
        settings: The data set's settings.
        logits: The model's logits on ``inputs`` when already computed.
        group: The id of the model's training run (default: ``model_id``).
        probes: The model's fitted probes (`fit_probes`), needed with the ``"probes"`` feature.
        reference: The model's reference (training) images, needed with the ``"noise_profile"`` feature.

    Returns:
        Array name -> array, one row per chosen sample (see the module's docstring).
    """
    from lightning_probes.capture import ActivationCapture, select_modules
    from lightning_probes.functional import noisy_logits, select_by_correctness, stability_ratio

    net = getattr(model, "net", model)
    if logits is None:
        logits = batched_logits(model, inputs)
    preds = logits.argmax(dim=1)
    chosen = select_by_correctness(labels, preds, settings.per_class, seeded(settings.seed, model_id, "choice"),
                                   num_classes=int(logits.shape[1]), order=settings.selection)
    x = inputs[chosen]
    probe_layers = list(settings.probe_layers) if "probes" in settings.features else []
    captured = list(dict.fromkeys([*settings.layers, *probe_layers]))
    capture = ActivationCapture(select_modules(net, captured), max_features=None)
    with torch.no_grad(), capture.capturing():
        clean = model(x)
    outputs = capture.pop()
    clean_pred = clean.argmax(dim=1)
    bank = (None if settings.noise_bank_seed is None
            else noise_bank(settings.noise_bank_seed, settings.num_draws, inputs.shape[1:]))
    noisy = noisy_logits(model, x, settings.sigma, settings.num_draws,
                         generator=seeded(settings.seed, model_id, "noise"), noise_bank=bank)
    ratio = stability_ratio(clean_pred, noisy.argmax(dim=-1))
    record = {
        "model_id": np.full(len(chosen), model_id, dtype=np.int64),
        "sample_index": chosen.numpy().astype(np.int64),
        "label": labels[chosen].numpy().astype(np.int64),
        "pred": clean_pred.numpy().astype(np.int64),
        "correct": (clean_pred == labels[chosen]).numpy().astype(np.int64),
        "ratio": ratio.numpy().astype(np.float32),
        "group": np.full(len(chosen), model_id if group is None else group, dtype=np.int64),
    }
    for name in settings.layers:
        record[name] = outputs[name].flatten(1).float().numpy()
    record.update(feature_arrays(model, x, clean, settings.features, settings, model_id, logits=logits,
                                 outputs=outputs, probes=probes, reference=reference))
    return record
