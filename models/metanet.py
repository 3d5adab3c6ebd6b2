"""`MetaNet`: reads how a sample's signal flows through a classifier's layers and predicts whether the classifier's
prediction is correct (``classification``) or how stable it is under input noise (``regression``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_probes.functional.boundary import linear_stability
from lightning_probes.functional.metanet import (
    ENCODINGS,
    baseline_scores,
    best_threshold,
    binomial_nll,
    encoded_width,
    error_detection_metrics,
    r2_ceiling,
    regression_metrics,
    stack_encoded,
)

log = logging.getLogger(__name__)

__all__ = ["MetaNet", "compute_baselines", "forward_on_batch"]

Encoder = Literal["rnn", "lstm", "transformer"]
_ENCODERS = ("rnn", "lstm", "transformer")
_TASKS = ("classification", "regression")


def _squash(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) * log1p(|x|)``: keeps order and sign, tames the scale differences between models."""
    return torch.sign(x) * torch.log1p(x.abs())


class MetaNet(pl.LightningModule):
    """Projects each layer's (encoded) outputs to ``d_model`` (its own ``Linear`` + ``LayerNorm``), runs the sequence
    of layers through an RNN, LSTM or Transformer encoder and predicts from the result.

    ``classification`` predicts ``correct`` (one logit, binary cross-entropy); ``regression`` predicts the
    stability ratio (a sigmoid, mean squared error). Per epoch it logs ``train/loss``, ``val/loss`` and the
    metrics of ``lightning_probes.functional``: ``accuracy`` (threshold 0.5), ``auroc``, ``aupr_err`` and
    ``fpr_at_95tpr`` for classification, ``r2``, ``spearman``, ``mse``, ``r2_correct`` and ``r2_wrong`` for
    regression, as ``val/<metric>`` and ``test/<metric>``. ``test`` also logs the baselines that need no meta-network,
    computed from the logits layer (the last of ``layer_dims``) of the same test samples, as
    ``test/baseline/<name>/<metric>``: ``max_softmax``, ``entropy``, ``margin`` and ``doctor`` (their ``accuracy``
    thresholds are the ones that maximise accuracy on the train split); for regression ``isotonic_max_softmax``, an
    isotonic fit of the ratio on the max softmax probability (scikit-learn), fitted on the train split. The
    baselines need the ``ZooDataModule`` (they read its ``arrays``); with another DataModule they are skipped.
    Under DDP the metrics are computed on every process's predictions, gathered (Lightning's ``DistributedSampler``
    pads the last batch, so a few samples may count twice).

    Args:
        encoder: ``"rnn"``, ``"lstm"`` or ``"transformer"``.
        task: ``"classification"`` or ``"regression"``.
        d_model: Width of the projections and the encoder.
        num_layers: Layers of the encoder.
        nhead: Attention heads of the Transformer (must divide ``d_model``).
        dropout: Dropout inside the encoder (and of the Transformer's layers).
        encoding: How each layer's outputs are read (`lightning_probes.functional.encode_layer`): ``"sorted"``
            (each layer's values sorted, the last layer as its sorted softmax: the same for any order of the units,
            so it transfers across models), ``"stats"`` (per-layer moments and quantiles) or ``"raw"``.
        layer_dims: Units of each layer of the data set, in order (LeNet5's ``pool2``, ``fc1``, ``fc2``, ``fc3``:
            400, 120, 84, 10); the last is the logits layer.
        squash: Apply ``sign(x) * log1p(|x|)`` to the encoded hidden layers (not to the softmax), so models whose
            activations differ in scale look alike.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        cosine: Anneal the learning rate to 0 over ``max_epochs`` (cosine).
        aligned_dims: Widths of the class-aligned inputs (`ZooDataModule`'s ``aligned``: boundary distances, linear
            probes, model context), each projected like a layer and read as one more token after the layers, as
            they are (no encoding: their columns mean the same in every model).
        loss: Regression loss: ``"mse"`` or ``"binomial"`` (`functional.binomial_nll`: the cross-entropy with
            the soft target ``k / n``, the likelihood of the ``k`` of ``n`` draws that kept the prediction).

    With ``regression`` the test also logs ``test/r2_ceiling`` (`functional.r2_ceiling`, the label-noise ceiling of
    r2, when the data set's ``dataset.json`` gives ``num_draws``); with a ``boundary_distance`` array and ``sigma``
    in the data set, the baselines gain ``linear_stability`` (``Phi(min_j d_j / sigma)``, no training); with a
    ``noise_profile`` array, ``self_calibrated`` (each model's own isotonic fit of its stability on its max softmax,
    measured on its training images: nothing learnt across models).

    Raises:
        ValueError: For an argument out of range, naming it.
    """

    def __init__(
        self,
        encoder: Encoder = "lstm",
        task: Literal["classification", "regression"] = "classification",
        d_model: int = 64,
        num_layers: int = 2,
        nhead: int = 4,
        dropout: float = 0.1,
        encoding: Literal["sorted", "stats", "raw"] = "sorted",
        layer_dims: Sequence[int] = (400, 120, 84, 10),
        squash: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        cosine: bool = True,
        aligned_dims: Sequence[int] = (),
        loss: Literal["mse", "binomial"] = "mse",
    ) -> None:
        super().__init__()
        if encoder not in _ENCODERS:
            raise ValueError(f"Expected `encoder` to be one of {_ENCODERS}, but got {encoder!r}")
        if task not in _TASKS:
            raise ValueError(f"Expected `task` to be one of {_TASKS}, but got {task!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"Expected `encoding` to be one of {ENCODINGS}, but got {encoding!r}")
        for name, value in (("d_model", d_model), ("num_layers", num_layers), ("nhead", nhead)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}")
        if encoder == "transformer" and d_model % nhead:
            raise ValueError(f"Expected `nhead` to divide `d_model` ({d_model}), but got {nhead}")
        if not 0 <= dropout < 1:
            raise ValueError(f"Expected `dropout` to be in [0, 1), but got {dropout!r}")
        dims = list(layer_dims)
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 2 for d in dims):
            raise ValueError(f"Expected `layer_dims` to be a list of layer widths >= 2 such as [400, 120, 84, 10], "
                             f"but got {layer_dims!r}")
        aligned = list(aligned_dims)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in aligned):
            raise ValueError(f"Expected `aligned_dims` to be a list of positive widths, but got {aligned_dims!r}")
        if loss not in ("mse", "binomial"):
            raise ValueError(f"Expected `loss` to be 'mse' or 'binomial', but got {loss!r}")
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"Expected `lr` > 0 and `weight_decay` >= 0, but got {lr!r} and {weight_decay!r}")
        self.save_hyperparameters()
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(encoded_width(d, encoding), d_model), nn.LayerNorm(d_model)) for d in dims)
        self.aligned_projections = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d_model), nn.LayerNorm(d_model)) for d in aligned)
        if encoder == "transformer":
            self.position = nn.Parameter(torch.zeros(len(dims) + len(aligned), d_model))
            nn.init.normal_(self.position, std=0.02)
            layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2 * d_model, dropout=dropout,
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d_model)
        else:
            rnn = nn.RNN if encoder == "rnn" else nn.LSTM
            self.encoder = rnn(d_model, d_model, num_layers, batch_first=True,
                               dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(d_model, 1)
        self._outputs: dict[str, list[dict[str, torch.Tensor]]] = {"val": [], "test": []}

    # -- the network ---------------------------------------------------------------------------------------
    def encode(self, layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's ``(B, units)`` outputs as the projections read them (encoding, then squash)."""
        dims = self.hparams.layer_dims
        if len(layers) != len(dims) or any(x.flatten(1).shape[1] != d for x, d in zip(layers, dims)):
            got = [x.flatten(1).shape[1] for x in layers]
            raise ValueError(f"Expected {len(dims)} layers of widths {list(dims)} (`layer_dims`), but the batch has "
                             f"widths {got}; set `model.init_args.layer_dims` to the data set's layers")
        encoded = stack_encoded(layers, self.hparams.encoding)
        if self.hparams.squash:
            last = len(encoded) - 1
            encoded = [x if (i == last and self.hparams.encoding != "raw") else _squash(x)
                       for i, x in enumerate(encoded)]
        return encoded

    def forward(self, layers: Sequence[torch.Tensor], aligned: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``(B,)`` raw head outputs: the logit of ``correct``, or the pre-sigmoid ratio."""
        dims = list(self.hparams.get("aligned_dims", ()))
        if len(aligned) != len(dims) or any(x.flatten(1).shape[1] != d for x, d in zip(aligned, dims)):
            got = [x.flatten(1).shape[1] for x in aligned]
            raise ValueError(f"Expected {len(dims)} aligned inputs of widths {dims} (`aligned_dims`), but the batch "
                             f"has widths {got}; set `model.init_args.aligned_dims` to the data set's `aligned`")
        tokens = [proj(x) for proj, x in zip(self.projections, self.encode(layers))]
        tokens += [proj(x.flatten(1)) for proj, x in zip(self.aligned_projections, aligned)]
        tokens = torch.stack(tokens, dim=1)
        if self.hparams.encoder == "transformer":
            hidden = self.norm(self.encoder(tokens + self.position).mean(dim=1))
        else:
            hidden = self.encoder(tokens)[0][:, -1]
        return self.head(hidden).squeeze(-1)

    def predict_scores(self, layers: Sequence[torch.Tensor], aligned: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``(B,)`` predictions in [0, 1]: P(correct), or the predicted ratio."""
        return torch.sigmoid(self(layers, aligned))

    # -- training ------------------------------------------------------------------------------------------
    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.task == "classification":
            return F.binary_cross_entropy_with_logits(out, target)
        if self.hparams.get("loss", "mse") == "binomial":
            return binomial_nll(torch.sigmoid(out), target, 1)  # the same n for every sample: only a scale
        return F.mse_loss(torch.sigmoid(out), target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(forward_on_batch(self, batch), batch["target"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = forward_on_batch(self, batch)
        loss = self._loss(out, batch["target"])
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val",
                 batch_size=len(batch["target"]))
        kept = {"score": torch.sigmoid(out).detach(), "correct": batch["correct"], "ratio": batch["ratio"]}
        self._outputs[stage].append({k: v.cpu() for k, v in kept.items()})
        return {"loss": loss, **kept}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step("test", batch)

    def on_validation_epoch_start(self) -> None:
        self._outputs["val"] = []

    def on_test_epoch_start(self) -> None:
        self._outputs["test"] = []

    def metrics(self, score: torch.Tensor, correct: torch.Tensor, ratio: torch.Tensor) -> dict[str, float]:
        """The task's metrics of predictions ``score`` (in [0, 1]) against the data set's ``correct`` / ``ratio``."""
        if self.hparams.task == "classification":
            return error_detection_metrics(score, correct, threshold=0.5)
        return regression_metrics(score, ratio, groups={"correct": correct > 0.5, "wrong": correct < 0.5})

    def _log_epoch(self, stage: str) -> dict[str, float]:
        outputs = self._outputs[stage]
        if not outputs:
            return {}
        cat = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        if self.trainer.world_size > 1:  # every process's samples (DistributedSampler gives each as many)
            cat = {k: self.all_gather(v.to(self.device)).flatten(0, 1).cpu() for k, v in cat.items()}
        values = self.metrics(cat["score"], cat["correct"], cat["ratio"])
        num_draws = self._settings().get("num_draws")
        if self.hparams.task == "regression" and stage == "test" and isinstance(num_draws, int) and num_draws >= 2:
            values["r2_ceiling"] = r2_ceiling(cat["ratio"], num_draws)
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, rank_zero_only=True)
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        baselines = self.baselines()
        for name, values in (baselines or {}).items():
            for metric, value in values.items():
                self.log(f"test/baseline/{name}/{metric}", value, rank_zero_only=True)

    def _settings(self) -> dict[str, Any]:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return dict(getattr(datamodule, "settings", None) or {})

    def baselines(self) -> Optional[dict[str, dict[str, float]]]:
        """The baselines of the test split (see the class docstring), or ``None`` without a ``ZooDataModule``."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        arrays = getattr(datamodule, "arrays", None)
        if not arrays or "train" not in arrays or "test" not in arrays:
            return None
        logits_layer = datamodule.hparams.layers[-1]
        return compute_baselines(arrays["train"], arrays["test"], logits_layer, self.hparams.task,
                                 sigma=self._settings().get("sigma"))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.cosine or self._trainer is None or not self.trainer.max_epochs \
                or self.trainer.max_epochs < 1:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def compute_baselines(train: dict[str, Any], test: dict[str, Any], logits_layer: str,
                      task: str, sigma: Optional[float] = None) -> dict[str, dict[str, float]]:
    """The confidence baselines of a test split, thresholds and fits learnt on the train split.

    Args:
        train: The train split's arrays (``correct``, ``ratio`` and the logits layer).
        test: The test split's arrays.
        logits_layer: Name of the logits layer (``fc3``).
        task: ``"classification"`` (``max_softmax``, ``entropy``, ``margin``, ``doctor`` with their
            error-detection metrics) or ``"regression"`` (``isotonic_max_softmax`` with the regression metrics).
        sigma: The data set's noise level; with it and a ``boundary_distance`` array, ``linear_stability``
            (``Phi(min_j d_j / sigma)``) is a baseline too: its AUROC and best-threshold accuracy for
            ``correct``, its r2 for the ratio, with nothing fitted.
            With a ``noise_profile`` array, ``self_calibrated`` (its first column: each model's own isotonic fit
            of stability on max softmax, measured on its training images; nothing fitted across models) too.

    Returns:
        Baseline name -> metric -> value.
    """
    train_scores = baseline_scores(torch.as_tensor(train[logits_layer]).double())
    test_scores = baseline_scores(torch.as_tensor(test[logits_layer]).double())
    train_correct = torch.as_tensor(train["correct"])
    test_correct = torch.as_tensor(test["correct"])
    if sigma is not None and "boundary_distance" in train and "boundary_distance" in test:
        for scores, split in ((train_scores, train), (test_scores, test)):
            distance = torch.as_tensor(split["boundary_distance"]).double().min(dim=1).values
            scores["linear_stability"] = linear_stability(distance, float(sigma))
    if "noise_profile" in train and "noise_profile" in test:
        for scores, split in ((train_scores, train), (test_scores, test)):
            scores["self_calibrated"] = torch.as_tensor(split["noise_profile"][:, 0]).double()
    if task == "classification":
        return {name: error_detection_metrics(test_scores[name], test_correct,
                                              threshold=best_threshold(train_scores[name], train_correct))
                for name in test_scores}
    from sklearn.isotonic import IsotonicRegression

    fit = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
    fit.fit(train_scores["max_softmax"].numpy(), train["ratio"].astype("float64"))
    pred = torch.as_tensor(fit.predict(test_scores["max_softmax"].numpy()))
    groups = {"correct": test_correct > 0, "wrong": test_correct == 0}
    out = {"isotonic_max_softmax": regression_metrics(pred, torch.as_tensor(test["ratio"]), groups=groups)}
    for name in ("linear_stability", "self_calibrated"):
        if name in test_scores:
            out[name] = regression_metrics(test_scores[name], torch.as_tensor(test["ratio"]), groups=groups)
    return out


def forward_on_batch(module: MetaNet, batch: dict[str, Any]) -> torch.Tensor:
    """``module(batch["layers"], batch["aligned"])``: the ``forward_fn`` that lets the representation probes run a
    `MetaNet` on a `ZooDataModule` batch (``forward_fn: lightning_probes.models.metanet.forward_on_batch`` in a
    config)."""
    return module(batch["layers"], batch.get("aligned", ()))
