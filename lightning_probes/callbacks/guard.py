"""Fail-safe hooks: a probe never raises into the training it watches once the run has started.

Every Lightning hook of a `ProbeCallback` (except ``setup``, where the probe's own checks belong, and
``on_exception``, which already only writes what it can) runs inside a guard installed by
`install_guards`. The guard does three things, in this order:

1. **Pre-flight.** At the first hook of a run after ``setup`` (``on_fit_start`` for ``fit``,
   ``on_validation_start``/``on_test_start``/``on_predict_start`` for the other entry points), the probe's
   `ProbeCallback.preflight` runs once. It checks what the probe will meet (layers, inputs, outputs,
   validation data) before any training step. It either returns ``None`` (the probe runs), returns a reason
   (the probe is *skipped* for this run with one `ProbeSkippedWarning` and a ``{"skipped": true, ...}``
   record), or raises a `lightning_probes.errors.ProbeConfigurationError` naming the probe, the argument and
   the fix (the run stops before any step, whatever ``on_error`` says).
2. **Agreement across ranks.** With several processes, at every epoch-end hook each rank enters one
   all-reduce of its "disabled" flag (the strategy's ``reduce_boolean_decision``) before the hook's body, so a
   probe that failed on one rank is disabled on every rank before any of them enters the probe's own
   collectives of that hook (metric syncs, broadcasts). Once every rank knows, the check stops.
3. **Failure.** An exception raised by the hook's body is, with ``on_error="warn"`` (the default), caught:
   the probe writes a ``{"probe_status": "disabled", "disabled": true, "reason": ..., "hook": ..., "step":
   ..., "epoch": ...}`` record
   (kept, with every record before it, in its JSONL; `lightning_probes.read_probes` shows it), warns once
   with a `ProbeDisabledWarning` that names the probe, the hook and the error and holds the traceback, calls
   `ProbeCallback.on_disable` (hooks removed, files flushed), and does nothing more in this run; training
   goes on. With ``on_error="raise"`` the exception propagates, with a note naming the probe and the hook.
   A configuration error (`ProbeConfigurationError`, `lightning_probes.probe_data.ProbeInputError` included) raised
   before the first training batch of the run also propagates: nothing has been trained yet, and the user
   asked for something that cannot work.

``on_error=None`` (every probe's default) reads the environment variable ``LIGHTNING_PROBES_ON_ERROR``
(``warn`` or ``raise``; the test suite sets ``raise``) and falls back to ``warn``.
"""

from __future__ import annotations

import functools
import logging
import os
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from pytorch_lightning.callbacks import Callback

from lightning_probes.errors import ProbeConfigurationError

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

__all__ = ["ON_ERROR", "ON_ERROR_ENV", "STATUS_KEY", "FailSafe", "ProbeDisabledWarning", "ProbeSkippedWarning",
           "ProbeWarning", "check_on_error", "data_records", "install_guards", "resolve_on_error"]

#: The key of the records that say a probe was skipped or disabled (``"skipped"``/``"disabled"``).
STATUS_KEY = "probe_status"
#: Values of ``on_error``.
ON_ERROR = ("warn", "raise")
#: Environment variable read when ``on_error`` is ``None``.
ON_ERROR_ENV = "LIGHTNING_PROBES_ON_ERROR"
#: Hooks that never run inside the guard: ``setup`` holds the probe's own checks (they raise), ``on_exception``
#: already writes what it can without raising.
_UNGUARDED = frozenset({"setup", "on_exception"})
#: Every Lightning callback hook the guard wraps.
GUARDED_HOOKS = frozenset(n for n in vars(Callback) if n.startswith("on_") or n == "teardown") - _UNGUARDED
#: Hooks at which the pre-flight runs: the first of them reached after ``setup`` starts the entry point (fit,
#: validate, test, predict).
_PREFLIGHT_AT = frozenset({"on_fit_start", "on_validation_start", "on_test_start", "on_predict_start"})
#: Epoch-end hooks where every rank agrees on which probes are disabled (with several processes).
_AGREE_AT = frozenset({"on_train_epoch_end", "on_validation_epoch_end", "on_test_epoch_end",
                       "on_predict_epoch_end"})
#: Hooks that still run for a disabled or skipped probe (they close its files).
_ALWAYS = frozenset({"teardown"})


class ProbeWarning(UserWarning):
    """Base of the warnings a probe gives about itself (skipped, disabled)."""


class ProbeSkippedWarning(ProbeWarning):
    """A probe's analysis does not apply to this model or run: the probe is skipped, training goes on."""


class ProbeDisabledWarning(ProbeWarning):
    """A probe raised after the run started: it disabled itself, training goes on."""


def data_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` without the skip and disable records (``probe_status``), for readers of a probe's data."""
    return [r for r in records if STATUS_KEY not in r]


def check_on_error(value: Any) -> Optional[str]:
    """``on_error``, checked: ``None`` (the environment's or ``"warn"``), ``"warn"`` or ``"raise"``."""
    if value is not None and value not in ON_ERROR:
        raise ValueError(f"Expected `on_error` to be one of {list(ON_ERROR)} or None (then "
                         f"${ON_ERROR_ENV}, else 'warn'), but got {value!r}")
    return value


def resolve_on_error(value: Optional[str]) -> str:
    """The policy in force: ``value``, else ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"``."""
    if value is not None:
        return value
    env = os.environ.get(ON_ERROR_ENV, "").strip().lower()
    if env and env not in ON_ERROR:
        raise ValueError(f"Expected ${ON_ERROR_ENV} to be one of {list(ON_ERROR)} or unset, but got {env!r}")
    return env or "warn"


@dataclass
class GuardState:
    """What the guard knows of one probe in one run (reset at every ``setup``)."""

    depth: int = 0  # > 0 inside a guarded hook: a super() call runs unguarded
    preflight_done: bool = False
    stepping: bool = False  # a training batch of this run has started
    agreed: bool = False  # every rank knows the probe is disabled
    reported: bool = False  # the failure was warned about and recorded


def _note(err: BaseException, text: str) -> None:
    if hasattr(err, "add_note") and text not in getattr(err, "__notes__", ()):
        err.add_note(text)


def _guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` run inside the guard (see the module docstring)."""
    hook_name = hook.__name__

    @functools.wraps(hook)
    def wrapper(self: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        guard = self._guard
        if guard.depth:  # a subclass's override calling super(): the outer guard handles everything
            return hook(self, trainer, *args, **kwargs)
        if hook_name == "on_train_batch_start":
            guard.stepping = True
        if hook_name in _AGREE_AT and getattr(trainer, "world_size", 1) > 1 and not guard.agreed:
            self._agree_disabled(trainer)
        if not guard.preflight_done and hook_name in _PREFLIGHT_AT:
            guard.preflight_done = True
            self._run_preflight(trainer, args[0] if args else kwargs.get("pl_module"))
        if not self.active and hook_name not in _ALWAYS:
            return None
        guard.depth += 1
        try:
            return hook(self, trainer, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the point of the guard
            self._hook_failed(trainer, hook_name, err)
            return None
        finally:
            guard.depth -= 1

    wrapper._guarded = True  # type: ignore[attr-defined]
    return wrapper


def handle_failure(probe: Any, trainer: Any, hook_name: str, err: BaseException) -> None:
    """Raise ``err`` (``on_error="raise"``, or a configuration error before the first training batch) or
    disable ``probe`` with one warning and one record."""
    cls = type(probe).__name__
    _note(err, f"(raised in {cls} {probe.name!r}, hook `{hook_name}`; on_error='warn' would disable the probe "
               "and let training go on)")
    if probe.on_error_policy == "raise" or (isinstance(err, ProbeConfigurationError) and not probe._guard.stepping):
        raise err
    reason = f"{type(err).__name__}: {err}"
    if not probe.active:  # e.g. the teardown of a probe already disabled or skipped: said once already
        log.debug("%s %r (inactive) raised in `%s`: %s", cls, probe.name, hook_name, reason)
        return
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    warnings.warn(ProbeDisabledWarning(
        f"{cls} {probe.name!r} raised in `{hook_name}` and is disabled for the rest of this run; training goes "
        f"on and its records so far are kept (on_error='raise' re-raises). {reason}\n{text}"), stacklevel=2)
    probe.disable(trainer, reason, hook_name)


class FailSafe:
    """The run state of `lightning_probes.callbacks.base.ProbeCallback`: pre-flight, skip, disable, agreement
    across ranks (see the module docstring)."""

    name: str
    on_error: Optional[str]
    _guard: GuardState
    _disabled: Optional[str]
    _skipped_reason: Optional[str]

    def reset_run(self) -> None:
        """Forget what an earlier run (``fit``, ``validate``, ...) of this instance left behind; called at the
        start of every ``setup``, before a resumed checkpoint's state is loaded. Subclasses extend it."""

    @property
    def on_error_policy(self) -> str:
        """``"warn"`` or ``"raise"``: ``on_error``, else ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"``."""
        return resolve_on_error(self.on_error)

    @property
    def active(self) -> bool:
        """Whether the probe works in this run: neither skipped at its pre-flight nor disabled by a failure."""
        return self._disabled is None and self._skipped_reason is None

    @property
    def disabled(self) -> Optional[str]:
        """Why the probe disabled itself in this run (``"<Error>: <message>"``), or ``None``."""
        return self._disabled

    @property
    def skipped(self) -> Optional[str]:
        """Why the pre-flight skipped the probe for this run, or ``None``."""
        return self._skipped_reason

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        """Check, before any training step, what the probe will meet in this run (``trainer.state.fn``).

        Called once per run on every rank, at the first hook after ``setup`` (``on_fit_start``, or
        ``on_validation_start``/``on_test_start``/``on_predict_start``), once the strategy has set up the
        model. It must not change the training: no optimiser step, the random state as it was, no batch taken
        from the training iterator. Ranks must agree: a check that only global rank 0 makes broadcasts its
        outcome.

        Returns:
            ``None`` when the probe can run; else the reason its analysis does not apply, and the probe is
            skipped for this run with one warning.

        Raises:
            ProbeConfigurationError: What the user asked for cannot work; the message names the probe, the
                argument, the value found and what would work.
        """
        return None

    def _run_preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reason = self.preflight(trainer, pl_module)
        if reason is not None:
            self.skip(trainer, reason)

    def skip(self, trainer: pl.Trainer, reason: str) -> None:
        """Skip the probe for the rest of this run: one warning (global rank 0) and a
        ``{"probe_status": "skipped"}`` record."""
        if self._skipped_reason is not None:
            return
        self._skipped_reason = reason
        if trainer.is_global_zero:
            warnings.warn(ProbeSkippedWarning(f"{type(self).__name__} {self.name!r} is skipped for this run: "
                                              f"{reason}"), stacklevel=2)
        self.write_records(trainer, [{STATUS_KEY: "skipped", "reason": reason, "stage": str(trainer.state.fn.value),
                                      "step": trainer.global_step, "epoch": trainer.current_epoch}])
        self._flush_quietly()
        self.on_disable(trainer)

    def disable(self, trainer: pl.Trainer, reason: str, hook: Optional[str] = None) -> None:
        """Disable the probe for the rest of this run after a failure: a ``{"disabled": true}`` record, its
        records so far written, `on_disable`. The guard calls it; a probe may too."""
        if self._disabled is not None:
            return
        self._disabled = reason
        self.write_records(trainer, [{STATUS_KEY: "disabled", "disabled": True, "reason": reason, "hook": hook,
                                      "step": trainer.global_step, "epoch": trainer.current_epoch}])
        self._flush_quietly()
        try:
            self.on_disable(trainer)
        except Exception as err:  # noqa: BLE001 - cleaning up after a failure must not fail the run
            log.warning("%s %r could not clean up after disabling itself: %s", type(self).__name__, self.name, err)

    def on_disable(self, trainer: pl.Trainer) -> None:
        """Called once when the probe is skipped or disabled: remove hooks, free memory (for subclasses)."""

    def _hook_failed(self, trainer: pl.Trainer, hook: str, err: BaseException) -> None:
        handle_failure(self, trainer, hook, err)

    def _agree_disabled(self, trainer: pl.Trainer) -> None:
        """Every rank: one all-reduce of "disabled here"; a probe disabled on any rank is disabled on all."""
        anywhere = trainer.strategy.reduce_boolean_decision(self._disabled is not None, all=False)
        if anywhere:
            if self._disabled is None:
                self.disable(trainer, "disabled on another rank after a failure there", "agreement")
            self._guard.agreed = True

    # Lightning calls these on every callback; defined here so that the guard (and the pre-flight) wraps them.
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        pass


def install_guards(cls: type) -> None:
    """Wrap every Lightning hook defined in ``cls`` itself with the guard (once)."""
    for hook_name in GUARDED_HOOKS:
        method = cls.__dict__.get(hook_name)
        if callable(method) and not getattr(method, "_guarded", False):
            setattr(cls, hook_name, _guarded(method))


install_guards(FailSafe)
