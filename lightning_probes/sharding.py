"""Sharded parameters (FSDP2 ``DTensor``) for the parameter probes: local shards, their place in the full tensor,
the strategies the probes refuse, and the one all-reduce that turns every rank's partial sums into full-tensor
statistics.

Under FSDP2 (``fully_shard``, e.g. through Lightning's ``ModelParallelStrategy(tensor_parallel_size=1)``) each
parameter and its gradient is a ``DTensor`` sharded on dim 0 over the data-parallel ranks: rank ``r`` holds a
contiguous block of rows, so its local shard is a contiguous slice ``[start, start + local numel)`` of the full
flat tensor. A probe computes its partial sums on the local shard (``to_local()``: no collective) and combines
them with `all_reduce_sum` / `all_reduce_max`, entered by every rank on the same steps. A parameter that is not
a ``DTensor`` while others are (left out of ``fully_shard``) is a full replica on every rank: only global rank 0
contributes it, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ShardLayout", "all_reduce_max", "all_reduce_sum", "check_strategy", "is_dtensor", "local_tensor",
           "shard_layout"]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch: nothing is a DTensor
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated distributed tensor)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's local part of a ``DTensor`` (no collective), or ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's local part of one parameter lies in the full flat tensor.

    Attributes:
        start: Flat index of the local shard's first entry in the full tensor.
        numel: Entries of the local shard.
        full_numel: Entries of the full tensor.
        owner: Whether this rank's partial sums count (a shard, or rank 0's copy of a replicated tensor).
    """

    start: int
    numel: int
    full_numel: int
    owner: bool


def shard_layout(probe: str, name: str, param: torch.Tensor, rank: int, world_size: int) -> ShardLayout:
    """The `ShardLayout` of ``param`` on ``rank``; an error for a layout the probes cannot combine exactly.

    Args:
        probe: The probe's class name (for the error).
        name: The parameter's name (for the error).
        param: The parameter (a ``DTensor`` sharded on dim 0 over all ranks, or a plain tensor).
        rank: This process's global rank.
        world_size: Number of processes.

    Raises:
        ValueError: A ``DTensor`` that is not sharded on dim 0 over a one-dimensional mesh of every rank (tensor
            parallelism, HSDP's replicated dimension).
    """
    if not is_dtensor(param):
        return ShardLayout(0, param.numel(), param.numel(), rank == 0)
    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or mesh.size() != world_size or len(placements) != 1 \
            or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ValueError(
            f"{probe} cannot combine parameter {name!r} across ranks: it is a DTensor with placements {placements} on "
            f"a mesh of shape {tuple(mesh.shape)} ({world_size} processes). Supported: FSDP2 sharding on dim 0 over "
            f"all ranks (`fully_shard` with ModelParallelStrategy(data_parallel_size=<processes>, "
            f"tensor_parallel_size=1)), or DDP.")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    row = 1
    for size in param.shape[1:]:
        row *= int(size)
    numel = 1
    for size in local_shape:
        numel *= int(size)
    return ShardLayout(int(offset[0]) * row if param.dim() else 0, numel, param.numel(), True)


def _reduce(tensor: torch.Tensor, op: Any) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank, in place (every rank must call it on the same step; no-op in one process)."""
    import torch.distributed as dist

    return _reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of ``tensor`` over every rank, in place (every rank must call it; no-op in one process)."""
    import torch.distributed as dist

    return _reduce(tensor, dist.ReduceOp.MAX)


def check_strategy(probe: str, strategy: Any) -> bool:
    """Refuse a strategy under which gradient statistics would be wrong or missing; tell whether it shards.

    Args:
        probe: The probe's class name (for the error).
        strategy: ``trainer.strategy``.

    Returns:
        Whether the strategy may shard parameters (``ModelParallelStrategy``: FSDP2 through ``fully_shard``).

    Raises:
        ValueError: DeepSpeed (its ZeRO stages keep gradients in their own flat buffers: ``.grad`` is ``None``),
            FSDP1 (``FSDPStrategy``: flat parameters, original ``.grad`` missing or a shard of unknown extent),
            and ``ModelParallelStrategy`` with a tensor-parallel size above 1.
    """
    names = [cls.__name__ for cls in type(strategy).__mro__]
    label = str(getattr(strategy, "strategy_name", "") or type(strategy).__name__)
    if any("DeepSpeed" in n for n in names) or label.lower().startswith("deepspeed"):
        raise ValueError(
            f"{probe} does not support the DeepSpeed strategy ({type(strategy).__name__}): DeepSpeed keeps "
            f"gradients in its own partitioned buffers, so every parameter's `.grad` is None where the probe reads "
            f"it. Use strategy='ddp', or FSDP2 (`fully_shard` in `configure_model` with "
            f"ModelParallelStrategy(tensor_parallel_size=1)), or remove the probe.")
    if "FSDPStrategy" in names or label.lower() in ("fsdp", "fsdp_cpu_offload"):
        raise ValueError(
            f"{probe} does not support FSDPStrategy (FSDP1, {type(strategy).__name__}): it flattens parameters, so "
            f"the original parameters' gradients are missing or partial. Use FSDP2 instead: call `fully_shard` in "
            f"`configure_model` and train with ModelParallelStrategy(data_parallel_size=<processes>, "
            f"tensor_parallel_size=1).")
    if "ModelParallelStrategy" in names:
        size = tensor_parallel_size(strategy)
        if size > 1:
            raise ValueError(
                f"{probe} does not support tensor parallelism: ModelParallelStrategy has tensor_parallel_size="
                f"{size}. Use ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) with "
                f"`fully_shard` (FSDP2), or strategy='ddp'.")
        return True
    return False


def tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel size of a ``ModelParallelStrategy`` (1 for any other strategy, or one not resolved)."""
    if "ModelParallelStrategy" not in [c.__name__ for c in type(strategy).__mro__]:
        return 1
    size = getattr(strategy, "_tensor_parallel_size", 1)
    if size == "auto":  # resolved in setup_environment; by then it holds the number of processes per node
        size = getattr(strategy, "num_processes", 1)
    return size if isinstance(size, int) else 1


def owned_rows(layouts: Sequence[ShardLayout], device: torch.device) -> torch.Tensor:
    """``(P, 1)`` 1.0 where this rank's partial sums count, 0.0 where another rank's copy counts instead."""
    return torch.tensor([[1.0 if layout.owner else 0.0] for layout in layouts], dtype=torch.float64, device=device)
