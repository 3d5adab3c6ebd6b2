"""`AnalysisProbe`: the base of every probe that runs the model itself on a fixed probe set."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, ProbeCallback
from lightning_probes.checks import check_positive_int
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.probe_data import (
    MissingValidationDataError,
    ProbeSet,
    analysis_mode,
    forked_rng,
    run_forward,
    validation_loader,
)
from lightning_probes.sharding import is_dtensor


class RemoteProbeError(RuntimeError):
    """A probe's analysis failed on global rank 0; raised on the other ranks so that every rank decides alike."""


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (FSDP2's ``fully_shard``)."""
    return any(is_dtensor(p) for p in module.parameters())


def _no_validation(err: MissingValidationDataError) -> str:
    return f"{err}; add a `val_dataloader` (or a DataModule with one) to run it"


class _TooFewSamplesError(ValueError):
    """The validation data hold fewer samples than the analysis needs (the probe is skipped)."""


class AnalysisProbe(ProbeCallback):
    """Base of probes that run the model themselves (representation and robustness probes).

    It owns the three things those probes share (see `lightning_probes.probe_data`):

    - the probe set: ``num_samples`` validation samples kept as a batch, drawn once (seeded, class-balanced
      where the batches carry labels, else the first ``num_samples``) from the first ``search_batches``
      validation batches, by `probe_set`;
    - the forward: `forward` feeds one probe batch to the model, on its device and in its dtype; by default
      ``pl_module(inputs)`` with ``inputs`` the batch's first element or ``batch[input_key]``, else
      ``forward_fn(pl_module, batch)``;
    - the pass: `run_analysis` calls `analyse` on global rank 0 inside `analysis_mode` (``eval()``,
      ``no_grad``, forked random state, every module's mode restored) and then publishes the headline scalars
      that `analyse` returned on every rank (rank 0's values are broadcast), so ``EarlyStopping`` and
      ``ModelCheckpoint`` can monitor them under DDP too. Without validation data the probe warns once and
      skips the run. Under FSDP2 (a model whose parameters are sharded ``DTensor``s) every forward needs an
      all-gather per layer that every rank must enter: then EVERY rank runs `analyse` on rank 0's probe set
      (broadcast once), in the same order, and only rank 0 writes files and logs.

    Pre-flight (`preflight`, before any training step): in the entry points where the probe analyses
    (`analysis_stages`), it checks that there is validation data, draws the probe set (under a forked random
    state, so training's random stream is untouched), checks that it holds at least `minimum_samples`
    samples, and hands it to `check_probe` (one forward of a probe batch, say). Global rank 0 checks (every
    rank for a sharded model) and broadcasts the outcome, so every rank skips, refuses or runs alike. Missing
    validation data, too few samples and what `check_probe` reports as not applicable skip the probe with one
    warning; a `ProbeConfigurationError` refuses the run; any other exception of the checks skips the probe
    with ``on_error="warn"`` and is raised with ``"raise"``.

    A failure inside `analyse` after the run started is caught on the rank where it happens, before the
    broadcast of the headline, so every rank learns it from the broadcast and takes the same decision
    (`lightning_probes.callbacks.guard`).

    A subclass sets the schedule (calls `run_analysis` from its hooks on every rank) and implements `analyse`.

    Args:
        num_samples: Size of the probe set.
        seed: Seed of the probe-set choice.
        search_batches: Validation batches searched for the probe set.
        forward_fn: ``forward_fn(pl_module, batch)`` runs the model on one probe batch (moved to the module's
            device, floating tensors in its dtype), for models with several inputs or dict batches; its return
            value is ignored by the representation probes (they read layer outputs). Default
            ``pl_module(inputs)``. From a config: the import path of a function, e.g. ``mypackage.probes.forward``.
        input_key: For dict batches: the key of the input tensor (the default forward's input, the tensor that
            is perturbed or augmented).
        target_key: For dict batches: the key of the class labels used to balance the probe set (without it, a
            dict batch's probe set is its first ``num_samples`` samples). Tuple batches: the second element when
            it holds one integer label per sample.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default the probe's file stem.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).
    """

    def __init__(
        self,
        num_samples: int = 512,
        seed: int = 0,
        search_batches: int = 100,
        forward_fn: Optional[Callable[[Any, Any], Any]] = None,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir, name, flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs,
                         on_error=on_error)
        check_positive_int("num_samples", num_samples)
        check_positive_int("search_batches", search_batches)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an integer, but got {seed!r}")
        if forward_fn is not None and not callable(forward_fn):
            raise ValueError(f"Expected `forward_fn` to be None or a callable `forward_fn(pl_module, batch)`, but got "
                             f"{forward_fn!r}")
        for argument, value in (("input_key", input_key), ("target_key", target_key)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"Expected `{argument}` to be None or a string (a key of dict batches), but got "
                                 f"{value!r}")
        self.num_samples, self.seed, self.search_batches = num_samples, seed, search_batches
        self.forward_fn, self.input_key, self.target_key = forward_fn, input_key, target_key
        self._probe: Optional[ProbeSet] = None
        self._every_rank = False  # the model is sharded (FSDP2): every rank runs the analysis's forward passes
        self.forward_batch: Optional[int] = None  # samples per analysis forward, once planned (plan_forward_batch)

    #: Entry points in which the probe analyses (elsewhere its pre-flight has nothing to check).
    analysis_stages: tuple[TrainerFn, ...] = (TrainerFn.FITTING,)
    #: Part of a probe's memory share (`memory_share`) its accumulators plan for; the rest is left to the
    #: activations of one forward batch (`plan_forward_batch`).
    accumulator_fraction = 0.75

    def plan_forward_batch(self, batch_size: int, per_sample_bytes: float, available: float) -> int:
        """The samples of one analysis forward pass: ``batch_size``, capped so that the activations of a batch,
        ``samples * per_sample_bytes``, fit ``available`` bytes (at least one sample).

        The analysis probes that draw on the memory budget call it at their pre-flight with what one sample
        costs in their pass (the model's activations, `lightning_probes.probe_data.forward_peak_bytes` divided
        by the samples of the check forward, plus what the probe itself holds per sample of a batch) and with
        what is left of their share beside their accumulators; the result is kept in ``forward_batch`` (``None``
        until planned) and the probe runs its passes in batches of that size. The statistics do not depend on the
        batch size (the probe streams sums), only the time does: smaller batches, more forward calls.

        Args:
            batch_size: The probe's ``batch_size`` argument (the most samples a pass takes at once).
            per_sample_bytes: Bytes one sample of a batch costs.
            available: Bytes the batch may take.

        Returns:
            The planned batch (also in ``self.forward_batch``).
        """
        batch = int(batch_size)
        if per_sample_bytes > 0:
            batch = max(1, min(batch, int(available // per_sample_bytes)))
        self.forward_batch = batch
        return batch

    def reset_run(self) -> None:
        super().reset_run()
        self._probe = None  # a reused probe draws its probe set from the new Trainer's validation data
        self._every_rank = False
        self.forward_batch = None

    # -- pre-flight ---------------------------------------------------------------------------------
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        if trainer.state.fn not in self.analysis_stages:
            return None
        self._every_rank = is_sharded(pl_module)
        if trainer.limit_val_batches != 0:
            try:  # every rank: setting up the validation loop's data holds a barrier
                validation_loader(trainer)
            except MissingValidationDataError:
                pass  # rank 0's check below says so
        outcome, local = ("ok", ""), None
        if trainer.is_global_zero or self._every_rank:
            outcome, local = self._checked_outcome(trainer, pl_module)
        if trainer.world_size > 1:  # every rank enters the broadcast, failed or not, then decides alike
            outcome = trainer.strategy.broadcast(outcome, src=0)
        kind, message = outcome
        if kind == "error":
            raise ProbeConfigurationError(message)
        if kind == "failed":
            if self.on_error_policy == "raise":
                raise local if local is not None else RuntimeError(f"the pre-flight failed on global rank 0: "
                                                                   f"{message}")
            return f"its pre-flight check failed ({message}); on_error='raise' raises it"
        return message if kind == "skip" else None

    def _checked_outcome(self, trainer: pl.Trainer,
                         pl_module: pl.LightningModule) -> tuple[tuple[str, str], Optional[BaseException]]:
        """``((kind, message), exception)``: kind ``"ok"``, ``"skip"``, ``"error"`` (refused) or ``"failed"``
        (an unexpected exception of the checks, also returned so that this rank can raise it)."""
        try:
            if trainer.limit_val_batches == 0:
                return ("skip", "it analyses validation samples, but `limit_val_batches=0`; give the Trainer "
                                "validation batches to run it"), None
            with forked_rng(pl_module):
                probe = self.probe_set(trainer)
            with analysis_mode(pl_module):
                reason = self.check_probe(trainer, pl_module, probe)
            return (("skip", reason) if reason else ("ok", "")), None
        except MissingValidationDataError as err:
            return ("skip", _no_validation(err)), None
        except _TooFewSamplesError as err:
            return ("skip", str(err)), None
        except ProbeConfigurationError as err:  # ProbeInputError included
            text, name = str(err), type(self).__name__
            return ("error", text if text.startswith(name) else f"{name}: {text}"), None
        except Exception as err:  # noqa: BLE001 - reported to every rank, then skipped or raised
            return ("failed", f"{type(err).__name__}: {err}"), err

    def check_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> Optional[str]:
        """Pre-flight checks on the probe set (inside `analysis_mode`): return why the analysis does not apply
        (the probe is skipped), raise `ProbeConfigurationError` to refuse, ``None`` to run. Default: none."""
        return None

    def probe_set(self, trainer: pl.Trainer) -> ProbeSet:
        """The probe set, collected at the first call."""
        if self._probe is None:
            probe = ProbeSet.collect(trainer, self.num_samples, self.seed, self.search_batches, self.target_key)
            if self._every_rank and trainer.world_size > 1:
                probe = trainer.strategy.broadcast(probe, src=0)  # every rank runs rank 0's samples
            minimum = self.minimum_samples()
            if len(probe) < minimum:
                raise _TooFewSamplesError(f"it needs at least {minimum} probe samples, but the validation data gave "
                                     f"{len(probe)}; give it more validation samples")
            self._probe = probe
        return self._probe

    def minimum_samples(self) -> int:
        """Fewest probe samples the analysis can work with."""
        return 1

    def forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Run the model on one probe batch (see `lightning_probes.probe_data.run_forward`)."""
        return run_forward(pl_module, batch, self.forward_fn, self.input_key)

    def run_analysis(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Analyse on global rank 0, then publish the headline scalars on every rank (call it on every rank).

        An exception of the analysis is held until every rank has entered the broadcast of the headline, then
        raised on every rank (the original on the rank it came from, `RemoteProbeError` elsewhere), so the
        guard disables the probe everywhere or raises everywhere.
        """
        headline: Optional[Mapping[str, Optional[float]]] = None
        failure: Optional[BaseException] = None
        status: Optional[tuple[str, str]] = None
        self._every_rank = is_sharded(pl_module)
        if trainer.is_global_zero or self._every_rank:
            try:
                with analysis_mode(pl_module):
                    headline = self.analyse(trainer, pl_module, epoch)
            except MissingValidationDataError as err:
                status = ("skip", _no_validation(err))
            except Exception as err:  # noqa: BLE001 - raised below, after every rank entered the broadcast
                failure, status = err, ("failed", f"{type(err).__name__}: {err}")
        if headline and trainer.is_global_zero and status is None:
            self.log_scalars(trainer, headline, trainer.global_step)
        remote = self.publish(trainer, headline if trainer.is_global_zero and status is None else None,
                              from_rank_zero=True, status=status)
        kind, message = status or remote or ("ok", "")
        if kind == "skip":
            self.skip(trainer, message)  # on every rank: none is left to enter a broadcast alone
        elif failure is not None:
            raise failure
        elif kind == "failed":
            raise RemoteProbeError(f"the analysis failed on global rank 0: {message}")

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                epoch: int) -> Optional[Mapping[str, Optional[float]]]:
        """One analysis (global rank 0, in `analysis_mode`); returns the headline scalars ``{name: value}``."""
        raise NotImplementedError
