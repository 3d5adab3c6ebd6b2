"""One memory budget shared by the probes of a Trainer.

The probes whose memory grows with a choice (the features a representation analysis keeps, the classes a
confusion state tracks, ...) do not each take their own allowance: they share one budget per Trainer. By default
it is 10% of the model's parameter memory, at least 64 MiB; `set_memory_budget` (or the environment variable
``LIGHTNING_PROBES_MEMORY_BUDGET``, read when nothing was set) changes it for every Trainer created afterwards.
Each probe that draws on it gets an equal share (its ``max_memory_gb``, when set, replaces its share and leaves
the budget to the others), plans its analyses inside the share at its pre-flight, and logs one line: the share,
what it plans to use and what it reduced to fit. `memory_plan` reads the plan of a Trainer back.

Example:
    >>> import lightning_probes as lp
    >>> lp.set_memory_budget("256MB")     # 256e6 bytes for all probes of a Trainer
    >>> lp.set_memory_budget(0.05)        # 5% of the model's parameter memory (at least 64 MiB)
    >>> lp.set_memory_budget(None)        # back to the default
"""

from __future__ import annotations

import logging
import math
import os
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

log = logging.getLogger(__name__)

#: Environment variable read when `set_memory_budget` was not called.
ENV = "LIGHTNING_PROBES_MEMORY_BUDGET"
#: The default budget: this fraction of the model's parameter memory ...
DEFAULT_FRACTION = 0.10
#: ... and never less than this many bytes (64 MiB); a fraction budget has the same floor.
FLOOR_BYTES = 64 * 2**20

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)
_VALID = ("an int number of bytes (>= 1), a float in (0, 1] (a fraction of the model's parameter memory), a "
          "string such as '256MB', '1.5GiB' or '10%', or None (the default: 10% of the parameter memory, at least "
          "64 MiB)")

Budget = Union[int, float, str, None]

_setting: Optional[Union[int, float]] = None  # bytes (int) or a fraction (float); None: the environment or default
_set = False


def parse_budget(value: Budget, argument: str = "budget") -> Optional[Union[int, float]]:
    """``value`` as bytes (``int``), a fraction of the parameter memory (``float``) or ``None`` (the default).

    Raises:
        ValueError: naming ``argument`` and the value, when it is none of the valid forms.
    """
    def invalid() -> ValueError:
        return ValueError(f"Expected `{argument}` to be {_VALID}, but got {value!r}")

    if value is None:
        return None
    if isinstance(value, bool):
        raise invalid()
    if isinstance(value, int):
        if value < 1:
            raise invalid()
        return int(value)
    if isinstance(value, float):
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise invalid()
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise invalid()
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit == "%":
            if not 0.0 < number <= 100.0:
                raise invalid()
            return number / 100.0
        if unit not in _UNITS or number * _UNITS[unit] < 1:
            raise invalid()
        return int(number * _UNITS[unit])
    raise invalid()


def set_memory_budget(budget: Budget) -> None:
    """Set the memory budget shared by the probes of every Trainer set up from now on.

    Args:
        budget: Bytes (``int``), a fraction of the model's parameter memory (``float`` in (0, 1], at least
            64 MiB), a string (``"256MB"``, ``"1.5GiB"``, ``"10%"``) or ``None``: back to
            ``$LIGHTNING_PROBES_MEMORY_BUDGET`` or the default (10% of the parameter memory, at least 64 MiB).
    """
    global _setting, _set
    _setting = parse_budget(budget)
    _set = budget is not None


def get_memory_budget() -> Optional[Union[int, float]]:
    """The budget setting in force: bytes (``int``), a fraction (``float``) or ``None`` (the default)."""
    if _set:
        return _setting
    return parse_budget(os.environ.get(ENV) or None, f"${ENV}")


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the model's parameters (each tensor once; a sharded DTensor counts its global size)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        try:
            total += p.numel() * p.element_size()
        except (RuntimeError, ValueError):  # an uninitialised lazy parameter
            continue
    return total


def budget_bytes(setting: Optional[Union[int, float]], params: int) -> tuple[int, str]:
    """``(bytes, how they were decided)`` of the budget ``setting`` for a model of ``params`` parameter bytes."""
    if isinstance(setting, int):
        return setting, f"{format_bytes(setting)}, as set"
    fraction = DEFAULT_FRACTION if setting is None else setting
    share = int(fraction * params)
    how = f"{fraction:.0%} of the parameter memory ({format_bytes(params)})"
    if share < FLOOR_BYTES:
        return FLOOR_BYTES, f"{how} is {format_bytes(share)}, below the floor of {format_bytes(FLOOR_BYTES)}"
    return share, how


def format_bytes(n: float) -> str:
    """``n`` bytes as a short text: ``'64.0 MiB'``, ``'1.50 GiB'``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryPlan:
    """The shared budget of one Trainer and what each probe plans inside it.

    Attributes:
        total: The budget in bytes.
        how: How it was decided (for the log).
        shares: ``{probe name: bytes}`` of the probes that draw on the budget (equal shares).
        planned: ``{probe name: {"share", "planned", "reduced", "explicit"}}`` once each probe planned.
    """

    total: int
    how: str
    shares: dict[str, int]
    planned: dict[str, dict[str, Any]] = field(default_factory=dict)
    module_id: int = 0


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _users(trainer: Any) -> list[Any]:
    return [cb for cb in getattr(trainer, "callbacks", []) if getattr(cb, "uses_memory_budget", False)]


def plan_for(trainer: Any, module: nn.Module) -> MemoryPlan:
    """The Trainer's plan, made at the first request of a fit (and again for another model): the budget and the
    equal shares of the probes that draw on it without an explicit ``max_memory_gb``."""
    plan = _PLANS.get(trainer)
    if plan is not None and plan.module_id == id(module):
        return plan
    total, how = budget_bytes(get_memory_budget(), parameter_bytes(module))
    sharing = [cb for cb in _users(trainer) if getattr(cb, "max_memory_gb", None) is None]
    each = total // max(1, len(sharing))
    plan = MemoryPlan(total, how, {cb.name: each for cb in sharing}, module_id=id(module))
    _PLANS[trainer] = plan
    if sharing:
        log.info("lightning-probes memory budget: %s (%s), shared by %d probe(s), %s each: %s", format_bytes(total),
                 how, len(sharing), format_bytes(each), ", ".join(cb.name for cb in sharing))
    return plan


def forget_plan(trainer: Any) -> None:
    """Drop the Trainer's plan (a new fit plans again)."""
    _PLANS.pop(trainer, None)


def memory_plan(trainer: Any) -> dict[str, dict[str, Any]]:
    """What each probe of ``trainer`` planned inside its share: ``{name: {"share": bytes, "planned": bytes,
    "reduced": text or None, "explicit": bool}}`` (empty before the probes' pre-flight)."""
    plan = _PLANS.get(trainer)
    return {} if plan is None else {k: dict(v) for k, v in plan.planned.items()}
