"""`RepresentationProbe`: the schedule, layer selection and capture pass shared by the representation probes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_probes.budget import format_bytes
from lightning_probes.callbacks.analysis_base import AnalysisProbe
from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, check_plot_every
from lightning_probes.callbacks.shared_pass import SharedSessions, partners, run_shared_pass
from lightning_probes.capture import ActivationCapture, NoLayerError, select_modules, uncompiled
from lightning_probes.checks import check_choice, check_positive_int
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.feature_rows import TOKEN_MODES, FeatureReducer, infer_layouts, recording_calls, rows_per_sample
from lightning_probes.probe_data import ProbeSet, forward_peak_bytes, has_uninitialized
from lightning_probes.probe_data import batch_size as samples_in

#: ``max_features`` when the user leaves it out.
DEFAULT_MAX_FEATURES = 1024


class NothingToAnalyseError(ProbeConfigurationError):
    """The default selection has nothing the probe can analyse in this model: the pre-flight skips the probe."""


class RepresentationProbe(AnalysisProbe):
    """Base of probes that analyse layer outputs on a fixed, seeded set of validation samples.

    The analysis runs at the start of training (labelled epoch 0: the untrained network) and after every
    ``every_n_epochs``-th training epoch (labelled with the number of epochs completed), on global rank 0 only,
    in `lightning_probes.probe_data.analysis_mode` (``eval()``, ``no_grad``, forked random state, modes
    restored); every rank then publishes the probe's headline scalar (see `AnalysisProbe`). Forward hooks
    exist only during that pass and are always removed.

    Pre-flight (before the first training step, after ``configure_model`` and after the strategy has moved and
    converted the module; see `AnalysisProbe`): the layers are selected and checked by one forward of the first
    probe batch (`check_probe`). With the default selection, modules that are never called in the forward pass
    (e.g. the ``out_proj`` of ``nn.MultiheadAttention``, used through its weight) or whose output holds no
    tensor are left out with a message, and a model with nothing to analyse (no layer the probe reads: its
    parameters applied functionally, say) skips the probe with one warning; named ``layers`` that do not exist,
    are never called or give no tensor stop the run with one `ProbeConfigurationError` naming the probe, the
    argument, the value and the fix. A subclass may check the layers' feature widths then (`check_widths`).
    A model with lazy modules (``nn.LazyLinear``, ...) not yet initialised is not run at the pre-flight (that
    forward would initialise them from another random state than training's first step would): the layer check
    and the epoch-0 analysis wait for the first ``on_before_optimizer_step``, where the weights are still the
    untrained ones.

    Args:
        layers: Module names to analyse (as in ``named_modules``); default: the signal as it leaves each block,
            i.e. every activation module plus the last leaf module with parameters (the classifier); every leaf
            module with parameters when the model has no activation module.
        num_samples: Size of the probe set (class-balanced where the batches carry labels, seeded, from the first
            validation batches).
        max_features: Features kept per layer (default 1024); wider outputs are reduced by adaptive average pooling
            (channel-first outputs) and a seeded subsample of the features (see
            `lightning_probes.feature_rows`). Left at its default, a probe with a memory limit may lower it for
            its widest layers (with one warning); set explicitly, a selection that does not fit is an error.
        token_mode: How a ``(batch, tokens, features)`` output becomes feature rows: ``"samples"`` (every token a
            sample of ``features``), ``"mean"`` (the mean over the tokens, one row per sample) or ``"flatten"``
            (one row of ``tokens * features`` per sample). Channel-first outputs ``(batch, C, H, W)`` are not
            token outputs and keep their pooling (see `lightning_probes.feature_rows.infer_layouts`).
        every_n_epochs: Analyse after every n-th epoch.
        plot_every_n_epochs: Draw the matplotlib figures (PNG files and their logger images) every n completed
            epochs and at the end of the fit; 0: none during training (``lightning-probes plot`` draws them from
            the files). Colour-mapped heatmaps go to the image loggers at every analysis.
        batch_size: Probe samples per forward pass.
        seed: Seed of the probe-set choice.
        search_batches: Validation batches searched for the probe set.
        forward_fn: ``forward_fn(pl_module, batch)``: runs the model on one probe batch (several inputs, dict
            batches); default ``pl_module(inputs)``. See `AnalysisProbe`.
        input_key: For dict batches: the key of the input tensor.
        target_key: For dict batches: the key of the class labels that balance the probe set.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default the probe's file stem.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).
    """

    #: Selection without ``layers``: ``"blocks"`` or ``"all"`` (see `lightning_probes.capture.select_modules`).
    default_layers = "blocks"
    #: Whether the probe joins a shared pass (it has ``start_session``; see `lightning_probes.callbacks.shared_pass`).
    shares_pass = False
    #: Whether its sessions consume the layers' inputs (AlignmentMonitor) instead of their outputs.
    captures_inputs = False

    def __init__(
        self,
        layers: Optional[Sequence[str]] = None,
        num_samples: int = 512,
        max_features: Optional[int] = None,
        every_n_epochs: int = 1,
        batch_size: int = 128,
        seed: int = 0,
        search_batches: int = 100,
        forward_fn: Optional[Callable[[Any, Any], Any]] = None,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        plot_every_n_epochs: int = 10,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        token_mode: str = "samples",
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(num_samples, seed, search_batches, forward_fn, input_key, target_key, output_dir, name,
                         flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs, on_error=on_error)
        self.plot_every_n_epochs = check_plot_every(plot_every_n_epochs)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)
                                   or len(layers) == 0):
            raise ValueError(f"Expected `layers` to be None or a non-empty list of module names, but got {layers!r}")
        check_positive_int("max_features", max_features, allow_none=True)
        for argument, value in (("every_n_epochs", every_n_epochs), ("batch_size", batch_size)):
            check_positive_int(argument, value)
        check_choice("token_mode", token_mode, TOKEN_MODES)
        self.layers = None if layers is None else list(layers)
        self.max_features_set = max_features is not None  # an explicit cap is never lowered automatically
        self.max_features = DEFAULT_MAX_FEATURES if max_features is None else max_features
        self.every_n_epochs, self.batch_size, self.token_mode = every_n_epochs, batch_size, token_mode
        self._token_mode_arg = token_mode
        self._deferred = False  # lazy modules: the layer check and epoch-0 analysis wait for the first step
        self._modules: dict[str, torch.nn.Module] = {}
        self._widths: Optional[dict[str, int]] = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._layouts: dict[str, str] = {}
        self._reducers: dict[str, FeatureReducer] = {}
        self._check_batch: Optional[int] = None
        self._forward_bytes = 0.0  # activation bytes per sample of the check forward (forward_peak_bytes)
        self._share: Optional[int] = None  # the memory share, once planned
        self._reduced: Optional[str] = None  # what the plan reduced
        self._shared = SharedSessions()
        self.batch_now: Optional[int] = None  # samples of the batch `for_each_batch` hands to `consume`

    def reset_run(self) -> None:
        super().reset_run()
        self.token_mode = self._token_mode_arg  # a run may have changed it (LayerCorrelationMonitor)
        self._modules, self._widths, self._shapes, self._layouts, self._reducers = {}, None, {}, {}, {}
        self._check_batch = None
        self._shared = SharedSessions()
        self._deferred = False
        self.batch_now = None

    # -- pre-flight ---------------------------------------------------------------------------------
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        # Every rank alike: lazy modules are uninitialised on all of them.
        self._deferred = trainer.state.fn in self.analysis_stages and has_uninitialized(pl_module)
        return super().preflight(trainer, pl_module)

    def check_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet) -> Optional[str]:
        """Select the layers and check them with one forward of the first probe batch (`_prepare`); with lazy
        modules not yet initialised, only the selection (the forward waits for the first optimiser step).

        Returns:
            Why the default selection has nothing to analyse (the probe is skipped), or ``None``.
        """
        try:
            self._select(pl_module)
            if self._deferred:
                rank_zero_info(f"{type(self).__name__}: {type(pl_module).__name__} has lazy modules not initialised "
                               "yet; the layer check and the epoch-0 analysis run at the first optimiser step")
                return None
            self._prepare(trainer, pl_module)
        except NothingToAnalyseError as err:
            return str(err)
        return None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._deferred:
            return
        self._deferred = False  # the lazy modules are initialised by the first training forward
        reason = self.preflight(trainer, pl_module)  # every rank: the outcome is broadcast from rank 0
        if reason is not None:
            self.skip(trainer, reason)
        elif trainer.current_epoch == 0:
            self.run_analysis(trainer, pl_module, epoch=0)  # the weights are still untrained here

    # -- layers -------------------------------------------------------------------------------------
    def _select(self, pl_module: pl.LightningModule) -> None:
        """``self._modules`` from ``layers`` or the default selection."""
        try:
            self._modules = select_modules(pl_module, self.layers, self.default_layers)
        except NoLayerError as err:
            raise NothingToAnalyseError(f"{err}; it has nothing to analyse by default") from None
        except ValueError as err:
            raise ProbeConfigurationError(
                f"{type(self).__name__}: Expected `layers` to name modules of {type(pl_module).__name__}, but got "
                f"{self.layers!r}. {err}") from None
        self._widths = None

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the layers (if the pre-flight did not) and check them with one forward of the first batch."""
        if not self._modules:
            self._select(pl_module)
        if self._widths is not None:
            return
        first = next(self.probe_set(trainer).chunks(self.batch_size))
        capture = ActivationCapture(self._modules, 1, inputs=self.captures_inputs, tolerant=True)
        with capture.capturing(), uncompiled(pl_module), recording_calls(pl_module) as calls:
            peak = forward_peak_bytes(pl_module, lambda: self.forward(pl_module, first))
            outputs = capture.pop(allow_missing=True)
        self._keep_working(pl_module, outputs, capture.invalid)
        self._check_batch = samples_in(first)
        self._forward_bytes = peak / max(1, self._check_batch)
        self._share = self.memory_share(trainer, pl_module) if self.uses_memory_budget else None
        self._reduced = None
        shapes: dict[str, tuple[int, ...]] = {}
        for name, _, shape in calls:
            if name in self._modules:
                shapes.setdefault(name, shape)
        self._shapes = shapes
        self._layouts = infer_layouts(calls, list(self._modules))
        self._reducers = self.make_reducers(self.token_mode)
        full = {n: r.full_width(shapes[n], self._check_batch) for n, r in self._reducers.items()}
        caps = self.fit_caps(full)
        self._reducers = self.make_reducers(self.token_mode, caps)
        widths = {n: r.width(shapes[n], self._check_batch) for n, r in self._reducers.items()}
        self.check_widths(widths)
        self._widths = widths
        self._plan_memory(trainer, pl_module)

    # -- memory -------------------------------------------------------------------------------------
    def accumulator_bytes(self, widths: Sequence[int]) -> int:
        """Peak bytes of the probe's accumulators (and of deriving its results from them) for layers of
        ``widths`` kept features; a probe that draws on the memory budget implements it."""
        return 0

    def held_bytes_per_sample(self) -> float:
        """Bytes the probe's sessions hold per sample of a forward batch besides the model's activations (the
        feature rows of one batch, their temporaries); default none."""
        return 0.0

    #: Whether the statistics depend on the batches (minibatch CKA): the forward batch stays ``batch_size``.
    exact_batch = False

    def available_bytes(self) -> float:
        """Bytes the accumulators may plan for: `accumulator_fraction` of the probe's share."""
        return self.accumulator_fraction * (self._share or 0)

    def fit_caps_in_share(self, caps: dict[str, int], what: str) -> dict[str, int]:
        """``caps`` (``{layer: cap}``), lowered when the accumulators over the features they keep do not fit
        `available_bytes`: left at their defaults (no ``layers``, no ``max_features``), the widest layers keep
        fewer features (the largest common cap that fits; one warning, and the plan's ``reduced``); set, a
        `ProbeConfigurationError` naming the estimate, the share and the arguments to change.

        Args:
            caps: Caps before the budget (e.g. ``max_features`` per layer).
            what: What the accumulators are, for the messages (e.g. "the float32 (F x F) covariance").
        """
        kept = {n: r.width(self._shapes[n], self._check_batch)
                for n, r in self.make_reducers(self.token_mode, caps).items()}
        available = self.available_bytes()
        estimate = self.accumulator_bytes(list(kept.values()))
        if estimate <= available:
            return caps
        explicit = [f"`{a}`" for a, given in (("layers", self.layers is not None),
                                              ("max_features", self.max_features_set)) if given]
        cap = _largest_cap(list(kept.values()), lambda c: self.accumulator_bytes(
            [min(w, c) for w in kept.values()]) <= available)
        widths = dict(sorted(kept.items(), key=lambda kv: -kv[1])[:8])
        if explicit or cap is None:
            raise ProbeConfigurationError(
                f"{type(self).__name__} would need about {format_bytes(estimate)} for {what} over the "
                f"{sum(kept.values())} features of {len(kept)} layers, above the {format_bytes(available)} its "
                f"accumulators may take ({self.accumulator_fraction:.0%} of {self.memory_share_text()}, "
                f"{format_bytes(self._share or 0)}). Select fewer `layers`, lower `max_features` (now "
                f"{self.max_features}), or raise `max_memory_gb` or `lightning_probes.set_memory_budget(...)`"
                f"{' (the set ' + ' and '.join(explicit) + ' are not reduced automatically)' if explicit else ''}. "
                f"Widths: {widths}")
        fitted = {n: min(caps[n], cap) for n in caps}
        after = {n: r.width(self._shapes[n], self._check_batch)
                 for n, r in self.make_reducers(self.token_mode, fitted).items()}
        reduced = {n: f"{kept[n]}->{after[n]}" for n in kept if after[n] < kept[n]}
        self._reduced = (f"{len(reduced)} widest layer(s) keep at most {cap} features, "
                         f"{sum(after.values())} of {sum(kept.values())} in all")
        rank_zero_warn(
            f"{type(self).__name__}: {what} over the {sum(kept.values())} features of {len(kept)} layers would need "
            f"about {format_bytes(estimate)}, above the {format_bytes(available)} its accumulators may take "
            f"({self.accumulator_fraction:.0%} of {self.memory_share_text()}, {format_bytes(self._share or 0)}); the "
            f"{len(reduced)} widest layer(s) keep at most {cap} features (adaptive pooling of channel-first outputs, "
            f"then a seeded subsample of the features), {sum(after.values())} features in all: "
            f"{', '.join(f'{n} {v}' for n, v in reduced.items())}. Set `max_features` or `layers` to choose.")
        return fitted

    def _plan_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Plan the forward batch inside what the accumulators leave of the share and log the plan (once per fit,
        at the pre-flight's layer check)."""
        if not self.uses_memory_budget or self._widths is None:
            return
        accumulators = self.accumulator_bytes(list(self._widths.values()))
        per_sample = self._forward_bytes + self.held_bytes_per_sample()
        if self.exact_batch:
            self.forward_batch = self.batch_size
        else:
            self.plan_forward_batch(self.batch_size, per_sample, (self._share or 0) - accumulators)
        reduced = self._reduced
        if self.forward_batch < self.batch_size:
            batch = f"forward batches of {self.forward_batch} samples (batch_size={self.batch_size})"
            reduced = f"{reduced}; {batch}" if reduced else batch
        self.report_memory_plan(trainer, pl_module, int(accumulators + self.forward_batch * per_sample), reduced)

    def _keep_working(self, pl_module: pl.LightningModule, outputs: dict[str, torch.Tensor],
                      invalid: dict[str, str]) -> None:
        """Leave out the selected layers that the check's forward did not call or that gave no tensor: an error
        for named ``layers``, a message for the default selection (a skip when none is left)."""
        what = "inputs" if self.captures_inputs else "outputs"
        invalid = {n: t for n, t in invalid.items() if n not in outputs}
        missing = [n for n in self._modules if n not in outputs and n not in invalid]
        if self.layers is not None and (missing or invalid):
            problems = ([f"{missing} produced no {what[:-1]} (never called in the forward pass)"] if missing else []) \
                + ([f"{invalid} gave no tensor ({what})"] if invalid else [])
            raise ProbeConfigurationError(
                f"{type(self).__name__}: Expected `layers` to name modules that the forward pass of "
                f"{type(pl_module).__name__} calls with tensors, but of {self.layers!r} the layer(s) "
                f"{'; '.join(problems)}; choose `layers` that it calls (or leave `layers` out)")
        if not outputs:
            raise NothingToAnalyseError(
                f"none of the {len(self._modules)} module(s) it selects by default in {type(pl_module).__name__} "
                f"gives a tensor in the forward pass of a probe batch ({', '.join(list(self._modules)[:10])}); "
                "name the modules to read with `layers`")
        dropped = [n for n in self._modules if n not in outputs]
        if dropped:
            rank_zero_info(f"{type(self).__name__}: {len(dropped)} module(s) not called in the forward pass, or whose "
                           f"{what} hold no tensor, are left out: {', '.join(dropped[:10])}"
                           f"{' ...' if len(dropped) > 10 else ''}")
            self._modules = {n: m for n, m in self._modules.items() if n in outputs}

    def make_reducers(self, token_mode: str, caps: Optional[dict[str, int]] = None) -> dict[str, FeatureReducer]:
        """One `FeatureReducer` per selected layer (cap ``max_features`` unless ``caps`` says otherwise)."""
        caps = caps or {}
        return {n: FeatureReducer(n, self._layouts[n], token_mode, caps.get(n, self.max_features))
                for n in self._modules}

    def rows_per_sample(self) -> dict[str, int]:
        """``{layer: rows one probe sample gives}`` (its tokens with ``token_mode="samples"``, else 1)."""
        return {n: rows_per_sample(self._shapes[n], self._layouts[n], r.token_mode, self._check_batch)
                for n, r in self._reducers.items()}

    def fit_caps(self, widths: dict[str, int]) -> dict[str, int]:
        """``{layer: features kept}`` from ``{layer: features before reduction}``; by default each capped at
        ``max_features``. A probe with a memory limit lowers the caps of its widest layers here."""
        return {n: min(w, self.max_features) for n, w in widths.items()}

    def check_widths(self, widths: dict[str, int]) -> None:
        """Called once with ``{layer: features kept}`` before the first analysis; raise to refuse them."""

    # -- schedule -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.current_epoch == 0 and not self._deferred:
            self.run_analysis(trainer, pl_module, epoch=0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done % self.every_n_epochs == 0:
            self.run_analysis(trainer, pl_module, epoch=done)

    def due(self, epoch: int) -> bool:
        """Whether the probe analyses at the epoch label ``epoch`` (0: the start of training)."""
        return epoch == 0 or epoch % self.every_n_epochs == 0

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> Optional[dict[str, Any]]:
        self._prepare(trainer, pl_module)
        if self.shares_pass:
            session = self._shared.take(epoch, trainer.global_step)  # fed by an earlier probe's pass
            if session is None:
                others = partners(trainer, self, epoch)
                if others:
                    sessions = run_shared_pass(trainer, pl_module, [self, *others])
                    for other, fed in zip(others, sessions[1:]):
                        other._shared.put(epoch, trainer.global_step, fed)
                    session = sessions[0]
            if session is not None:
                return session.finish(trainer, epoch)
        return self.analyse_layers(trainer, pl_module, epoch)

    def analyse_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                       epoch: int) -> Optional[dict[str, Any]]:
        """One analysis of the selected layers (``self._modules``); returns the headline scalars. Default: one
        streamed pass of this probe alone into a new session (`start_session`), then its ``finish``."""
        return run_shared_pass(trainer, pl_module, [self])[0].finish(trainer, epoch)

    # -- the capture pass ---------------------------------------------------------------------------
    def for_each_batch(self, pl_module: pl.LightningModule, batches: Any,
                       consume: Callable[[dict[str, torch.Tensor]], None], raw: bool = False) -> None:
        """Run probe batches (e.g. ``probe_set.chunks(batch_size)``) through the model with `forward`; call
        ``consume({layer: features})`` after each: each layer's feature rows (its `FeatureReducer`), or with
        ``raw`` its output as the layer gave it.

        The hooks exist only inside this call and are removed on the way out, exceptions included.
        """
        capture = ActivationCapture(self._modules, None, reducers=None if raw else self._reducers)
        with capture.capturing(), uncompiled(pl_module):
            for batch in batches:
                capture.batch_size = self.batch_now = samples_in(batch)
                self.forward(pl_module, batch)
                consume(capture.pop())


def _largest_cap(widths: Sequence[int], fits: Callable[[int], bool]) -> Optional[int]:
    """The largest cap ``c`` in ``[1, max(widths)]`` with ``fits(c)`` (``fits`` grows false with ``c``), or ``None``."""
    low, high = 1, max(widths, default=1)
    if not fits(low):
        return None
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low
