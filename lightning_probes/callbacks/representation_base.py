"""`RepresentationProbe`: the schedule, probe set and capture pass shared by the representation probes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_probes.callbacks.base import ProbeCallback, check_positive_int
from lightning_probes.capture import ActivationCapture, select_modules, uncompiled
from lightning_probes.probe_data import MissingValidationDataError, collect_probe_set, forked_rng


class RepresentationProbe(ProbeCallback):
    """Base of probes that analyse layer outputs on a fixed, seeded set of validation samples.

    The analysis runs at the start of training (labelled epoch 0: the untrained network) and after every
    ``every_n_epochs``-th training epoch (labelled with the number of epochs completed), on global rank 0 only,
    with the model in ``eval()`` and ``no_grad`` (the previous mode is restored). Forward hooks exist only
    during that pass and are always removed.

    Args:
        layers: Module names to analyse (as in ``named_modules``); default: every leaf module with parameters
            plus activation modules.
        num_samples: Size of the probe set (class-balanced, seeded, from the first validation batches).
        max_features: Features kept per layer; wider outputs are reduced by adaptive average pooling.
        every_n_epochs: Analyse after every n-th epoch.
        batch_size: Probe samples per forward pass.
        seed: Seed of the probe-set choice.
        search_batches: Validation batches searched for the probe set.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
    """

    def __init__(
        self,
        layers: Optional[Sequence[str]] = None,
        num_samples: int = 512,
        max_features: int = 1024,
        every_n_epochs: int = 1,
        batch_size: int = 128,
        seed: int = 0,
        search_batches: int = 100,
        output_dir: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)
                                   or len(layers) == 0):
            raise ValueError(f"Expected `layers` to be None or a non-empty list of module names, but got {layers!r}")
        for name, value in (("num_samples", num_samples), ("max_features", max_features),
                            ("every_n_epochs", every_n_epochs), ("batch_size", batch_size),
                            ("search_batches", search_batches)):
            check_positive_int(name, value)
        self.layers = None if layers is None else list(layers)
        self.num_samples, self.max_features = num_samples, max_features
        self.every_n_epochs, self.batch_size, self.seed = every_n_epochs, batch_size, seed
        self.search_batches = search_batches
        self._modules: dict[str, torch.nn.Module] = {}
        self._inputs: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._skipped = False

    def _state_config(self) -> dict[str, Any]:
        return {"layers": self.layers, "output_dir": self._output_dir_arg}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._modules = select_modules(pl_module, self.layers)

    def probe_set(self, trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe inputs and labels (collected once)."""
        if self._inputs is None:
            self._inputs, self._labels, _ = collect_probe_set(trainer, self.num_samples, self.seed,
                                                              self.search_batches)
            minimum = self.minimum_samples()
            if len(self._inputs) < minimum:
                raise ValueError(f"{type(self).__name__} needs at least {minimum} probe samples, but the validation "
                                 f"data gave {len(self._inputs)}")
        return self._inputs, self._labels

    def minimum_samples(self) -> int:
        return 2

    # -- schedule -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self._run(trainer, pl_module, epoch=0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done % self.every_n_epochs == 0:
            self._run(trainer, pl_module, epoch=done)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if not trainer.is_global_zero or self._skipped:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), forked_rng(pl_module):
                self.analyse(trainer, pl_module, epoch)
        except MissingValidationDataError as err:
            self._skipped = True
            rank_zero_warn(f"{type(self).__name__} is skipped for this run: {err}.")
        finally:
            pl_module.train(was_training)

    def for_each_batch(self, pl_module: pl.LightningModule, inputs: torch.Tensor, max_features: Optional[int],
                       consume: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Run ``inputs`` through the model in chunks; call ``consume({layer: features})`` after each chunk.

        The hooks exist only inside this call and are removed on the way out, exceptions included.
        """
        capture = ActivationCapture(self._modules, max_features)
        with capture.capturing(), uncompiled(pl_module):
            for chunk in inputs.split(self.batch_size):
                pl_module(chunk.to(pl_module.device))
                consume(capture.pop())

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        raise NotImplementedError
