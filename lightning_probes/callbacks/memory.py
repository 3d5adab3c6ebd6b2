"""`BudgetUser`: how a probe draws on the memory budget its Trainer's probes share (see `lightning_probes.budget`)."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from lightning_probes.budget import format_bytes, plan_for


class BudgetUser:
    """Mixin of `ProbeCallback`: ``memory_share`` and ``report_memory_plan``.

    A probe that sizes its analyses by memory sets ``uses_memory_budget = True`` and has a ``max_memory_gb``
    attribute (``None``: its share of the Trainer's budget; a number: that many GB, 1e9 bytes, for it alone, outside
    the shared budget). At its pre-flight it asks for `memory_share`, plans inside it and calls
    `report_memory_plan` once.
    """

    #: Whether the probe draws on the Trainer's shared memory budget.
    uses_memory_budget = False
    #: Its explicit allowance in GB (1e9 bytes), or ``None``: its share of the budget.
    max_memory_gb: Optional[float] = None

    def memory_share(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Bytes this probe may plan for: ``max_memory_gb`` when set, else its share of the Trainer's budget."""
        if self.max_memory_gb is not None:
            return int(self.max_memory_gb * 1e9)
        plan = plan_for(trainer, pl_module)
        return plan.shares.get(self.name, plan.total)

    def memory_share_text(self) -> str:
        """How the share was decided, for an error message: the argument to change."""
        if self.max_memory_gb is not None:
            return f"`max_memory_gb`={self.max_memory_gb:g}"
        return "its share of the probes' memory budget (raise it with `lightning_probes.set_memory_budget(...)` or " \
               "give this probe its own `max_memory_gb`)"

    def report_memory_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, planned: int,
                           reduced: Optional[str] = None) -> None:
        """Log (on global rank 0) and keep in the Trainer's plan what this probe plans to hold: ``planned`` bytes
        at its peak, and what it ``reduced`` to fit (``None``: nothing)."""
        share = self.memory_share(trainer, pl_module)
        plan = plan_for(trainer, pl_module)
        entry: dict[str, Any] = {"share": share, "planned": int(planned), "reduced": reduced,
                                 "explicit": self.max_memory_gb is not None}
        plan.planned[self.name] = entry
        source = "max_memory_gb" if entry["explicit"] else "shared budget"
        what = f"reduced: {reduced}" if reduced else "nothing reduced"
        rank_zero_info(f"{type(self).__name__} {self.name!r} memory plan: {format_bytes(planned)} of "
                       f"{format_bytes(share)} ({source}); {what}")
