"""The analysis pass shared by every probe that runs the model itself: its probe set, its mode, its forward.

Three pieces, each usable alone (`lightning_probes.callbacks.analysis_base.AnalysisProbe` puts them together):

- `ProbeSet.collect`: a fixed, seeded set of validation samples kept as a *batch* (the structure the
  dataloader yields: a tensor, a tuple/list or a dict), class-balanced where the batch carries class labels,
  else the first ``num_samples``. `ProbeSet.chunks` slices it into batches of the same structure.
- `analysis_mode`: ``eval()``, ``no_grad`` and a forked random state; every submodule's own train/eval flag
  is restored on the way out, exceptions included, and training's random stream is left as it was.
- `run_forward`: feeds one probe batch to the model, moved to the module's device and with floating tensors
  cast to its parameters' dtype (the strategy may move or convert the module after ``setup``). Default:
  ``pl_module(inputs)`` with ``inputs`` the batch's first element (or ``batch[input_key]`` for dict batches);
  ``forward_fn(pl_module, batch)`` for anything else (several inputs, keyword inputs).

Batch structure: a tensor, or nested tuples/lists/dicts of them. A tensor whose first dimension is the batch
size holds one row per sample and is sliced; any other value is kept as it is (from the first batch).

Example:
    >>> probe = ProbeSet.collect(trainer, num_samples=64, seed=0, search_batches=10)  # doctest: +SKIP
    >>> with analysis_mode(pl_module):  # doctest: +SKIP
    ...     outputs = [run_forward(pl_module, batch) for batch in probe.chunks(32)]
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_probes.errors import ProbeConfigurationError

log = logging.getLogger(__name__)

#: ``forward_fn(pl_module, batch)``: runs the model on one probe batch (already on the module's device).
ForwardFn = Callable[[Any, Any], Any]

__all__ = [
    "ForwardFn",
    "MissingValidationDataError",
    "ProbeInputError",
    "ProbeSet",
    "analysis_mode",
    "batch_inputs",
    "batch_labels",
    "forked_rng",
    "forward_peak_bytes",
    "module_device_dtype",
    "replace_inputs",
    "run_forward",
    "select_balanced",
    "to_module",
    "validation_loader",
]


class MissingValidationDataError(ValueError):
    """The Trainer has no validation data to draw a probe set from."""


class ProbeInputError(ProbeConfigurationError, TypeError):
    """The probe cannot feed its probe set to the model as configured (``forward_fn``, ``input_key``,
    ``logits_fn``); both a ``ProbeConfigurationError`` (the CLI reports it in one line) and a ``TypeError``."""


# -- the module: where it lives, the analysis mode ------------------------------------------------------
def is_uninitialized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a lazy module's parameter or buffer that its first forward has not shaped yet."""
    return isinstance(tensor, nn.parameter.UninitializedTensorMixin)


def has_uninitialized(module: nn.Module) -> bool:
    """Whether ``module`` holds lazy parameters or buffers (``nn.LazyLinear``, ...) not yet initialised."""
    return any(is_uninitialized(t) for t in (*module.parameters(), *module.buffers()))


def module_device_dtype(module: nn.Module) -> tuple[torch.device, Optional[torch.dtype]]:
    """``(device, floating dtype)`` of the module's first floating parameter (or buffer); ``(cpu, None)`` for a
    module without any."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if not is_uninitialized(t)]
    floating = next((t for t in tensors if t.is_floating_point()), None)
    if floating is not None:
        return floating.device, floating.dtype
    device = tensors[0].device if tensors else getattr(module, "device", torch.device("cpu"))
    return torch.device(device), None


def forked_rng(module: nn.Module):
    """A forked global random state (CPU, and the module's CUDA device): drawing probe sets, noise or
    augmentations inside it leaves training's random stream as it was."""
    device, _ = module_device_dtype(module)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextmanager
def analysis_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``module`` in ``eval()``, under ``no_grad`` and a forked random state.

    On the way out (exceptions included) every submodule gets back its own ``training`` flag, so a module
    that keeps some parts in eval mode (a frozen backbone) is left exactly as it was.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with analysis_mode(net):
        ...     _ = net(torch.ones(1, 2))
        >>> net.training
        True
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        with torch.no_grad(), forked_rng(module):
            module.eval()
            yield module
    finally:
        for m, mode in modes:
            m.training = mode


# -- batches ----------------------------------------------------------------------------------------
def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    tensor = _first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise TypeError(f"Expected a batch holding a tensor with a batch dimension, but got {type(batch).__name__}")
    return tensor.shape[0]


def _map(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def slice_batch(batch: Any, index: Union[slice, torch.Tensor], size: Optional[int] = None) -> Any:
    """The rows ``index`` of every per-sample tensor of ``batch`` (``size``: the batch size, found if ``None``)."""
    size = batch_size(batch) if size is None else size
    return _map(batch, lambda t: t[index] if t.ndim and t.shape[0] == size else t)


def _concat(batches: Sequence[Any], sizes: Sequence[int]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        if first.ndim and all(isinstance(b, torch.Tensor) and b.ndim and b.shape[0] == n
                              for b, n in zip(batches, sizes)):
            return torch.cat(list(batches))
        return first
    if isinstance(first, Mapping):
        return {k: _concat([b[k] for b in batches], sizes) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat([b[i] for b in batches], sizes) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([b[i] for b in batches], sizes) for i in range(len(first)))
    return first


def to_module(batch: Any, module: nn.Module) -> Any:
    """``batch`` on the module's device, floating tensors cast to its parameters' dtype (``precision="64-true"``,
    ``"16-true"``); integer tensors (labels, token ids) keep their dtype."""
    device, dtype = module_device_dtype(module)

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    return _map(batch, move)


def batch_inputs(batch: Any, input_key: Optional[str] = None, argument: str = "forward_fn") -> torch.Tensor:
    """The input tensor of a batch: ``batch[input_key]`` for a dict batch, else the batch itself (a tensor) or
    its first element (a tuple/list). Anything else raises a ``TypeError`` naming ``input_key`` and
    ``argument`` (the argument that would run the model on the whole batch instead)."""
    if input_key is not None:
        if not isinstance(batch, Mapping):
            raise ProbeInputError(f"`input_key={input_key!r}` selects the input of a dict batch, but the batch is a "
                                  f"{type(batch).__name__}; leave `input_key` unset or pass `{argument}=`")
        if input_key not in batch:
            raise ProbeInputError(f"`input_key={input_key!r}` is not a key of the batch; its keys: {list(batch)}")
        inputs = batch[input_key]
        where = f"batch[{input_key!r}]"
    elif isinstance(batch, torch.Tensor):
        return batch
    elif isinstance(batch, Mapping):
        raise ProbeInputError(f"The batch is a dict with keys {list(batch)}: pass `input_key=` to name the input "
                              f"tensor, or `{argument}=` to run the model on the whole batch")
    elif isinstance(batch, (list, tuple)) and batch:
        inputs, where = batch[0], "the batch's first element"
    else:
        raise ProbeInputError(f"Expected a batch given as a tensor, a tuple/list or a dict, but got "
                              f"{type(batch).__name__}; pass `{argument}=` to run the model on it")
    if not isinstance(inputs, torch.Tensor):
        raise ProbeInputError(f"Expected {where} to be the input tensor, but got {type(inputs).__name__}; pass "
                              f"`{argument}=` to run the model on the whole batch"
                              + ("" if input_key is not None else " (or `input_key=` for a dict batch)"))
    return inputs


def replace_inputs(batch: Any, inputs: torch.Tensor, input_key: Optional[str] = None) -> Any:
    """``batch`` with its input tensor (see `batch_inputs`) replaced by ``inputs``."""
    if input_key is not None:
        return {**batch, input_key: inputs}
    if isinstance(batch, torch.Tensor):
        return inputs
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(inputs, *batch[1:])
    return type(batch)([inputs, *batch[1:]])


def batch_labels(batch: Any, target_key: Optional[str] = None) -> Optional[torch.Tensor]:
    """The class labels of a batch, or ``None`` when it has none.

    ``batch[target_key]`` for a dict batch (it must be a 1-D integer tensor); without ``target_key``, the second
    element of a tuple/list batch when that is a 1-D integer tensor with one entry per sample (not, say, the
    next-token targets of a language model). Dict batches have labels only through ``target_key``.
    """
    if target_key is not None:
        if not isinstance(batch, Mapping) or target_key not in batch:
            keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ProbeInputError(f"`target_key={target_key!r}` is not a key of the batch ({keys})")
        labels = batch[target_key]
        if not (isinstance(labels, torch.Tensor) and labels.ndim == 1 and not labels.is_floating_point()):
            raise ProbeInputError(f"Expected batch[{target_key!r}] (`target_key`) to be a 1-D integer tensor of class "
                                  f"labels, but got {getattr(labels, 'shape', type(labels).__name__)}")
        return labels
    if isinstance(batch, (list, tuple)) and not isinstance(batch, torch.Tensor) and len(batch) >= 2:
        labels = batch[1]
        if isinstance(labels, torch.Tensor) and labels.ndim == 1 and not labels.is_floating_point() \
                and not labels.is_complex() and labels.shape[0] == batch_size(batch):
            return labels
    return None


# -- the model --------------------------------------------------------------------------------------
class LayerOutputError(ProbeInputError):
    """A captured layer produced no tensor (raised by the capture hooks, never re-worded as a forward error)."""


def _check_signature(module: nn.Module) -> None:
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a builtin or C forward: nothing to check
        return
    try:
        signature.bind(object())
    except TypeError as err:
        raise ProbeInputError(
            f"{type(module).__name__}.forward{signature} cannot be called with one input tensor ({err}); the "
            "probes call `pl_module(inputs)` by default. Pass `forward_fn=` to run the model on the whole probe "
            "batch, e.g. `forward_fn=lambda module, batch: module(*batch)`") from None


def run_forward(module: nn.Module, batch: Any, forward_fn: Optional[ForwardFn] = None,
                input_key: Optional[str] = None) -> Any:
    """Run the model on one probe batch; returns what the model returns.

    The batch is first moved to the module's device, its floating tensors cast to the parameters' dtype
    (`to_module`). Then ``forward_fn(module, batch)`` if given, else ``module(batch_inputs(batch, input_key))``.
    On the default path a model whose ``forward`` needs more than one input, or that rejects the input with a
    ``TypeError``, raises one `ProbeInputError` (a ``TypeError``) that names ``forward_fn``.

    Args:
        module: The model (a LightningModule or any ``nn.Module``).
        batch: One probe batch (see the module docstring for its structure).
        forward_fn: ``forward_fn(module, batch)``, for models with several inputs or keyword inputs.
        input_key: For dict batches on the default path: the key of the input tensor.
    """
    batch = to_module(batch, module)
    if forward_fn is not None:
        return forward_fn(module, batch)
    inputs = batch_inputs(batch, input_key)
    _check_signature(module)
    try:
        return module(inputs)
    except ProbeInputError:
        raise
    except TypeError as err:
        raise ProbeInputError(f"{type(module).__name__} could not be called on the probe inputs ({err}); the probes "
                              "call `pl_module(inputs)` by default. Pass `forward_fn=` to run the model on the whole "
                              "probe batch, e.g. `forward_fn=lambda module, batch: module(*batch)`") from err


def _storage_key(tensor: torch.Tensor) -> Optional[tuple[int, int]]:
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, some wrappers)
        return None


def forward_peak_bytes(module: nn.Module, run: Callable[[], Any], margin: float = 1.5) -> int:
    """Estimated peak bytes of the activations of one forward pass ``run()`` of ``module`` (under ``no_grad``).

    Forward hooks on every submodule track the module outputs still alive (their storages, each counted once,
    released when the output is freed), and the peak of their sum is taken at every call; ``margin`` covers what
    the hooks do not see (the temporaries inside a module's own forward, a residual sum). On a CUDA device the
    allocator's own peak during ``run()`` is used where it rose above the peak before. The probes divide it by the
    batch's samples to size their forward batches (`AnalysisProbe.plan_forward_batch`).

    Args:
        module: The model (its submodules are hooked for the duration of the call).
        run: Runs one forward pass of ``module``.
        margin: Factor on the hooked peak.

    Returns:
        Bytes (0 when no hooked module gave a tensor, e.g. a compiled model's graph).
    """
    live: dict[tuple[int, int], int] = {}
    peak = [0, 0]  # now, the peak

    def release(key: tuple[int, int]) -> None:
        count = live.get(key, 0) - 1
        if count <= 0:
            if live.pop(key, None) is not None:
                peak[0] -= key[1]
        else:
            live[key] = count

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        values = output if isinstance(output, (tuple, list)) else (output,)
        for value in values:
            key = _storage_key(value) if isinstance(value, torch.Tensor) else None
            if key is None:
                continue
            if key not in live:
                live[key] = 0
                peak[0] += key[1]
            live[key] += 1
            weakref.finalize(value, release, key)
        peak[1] = max(peak[1], peak[0])

    device, _ = module_device_dtype(module)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    before = torch.cuda.max_memory_allocated(device) if cuda else 0
    start = torch.cuda.memory_allocated(device) if cuda else 0
    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    estimate = int(peak[1] * margin)
    if cuda:
        after = torch.cuda.max_memory_allocated(device)
        if after > before:  # the peak of this pass is the allocator's new peak
            estimate = max(estimate, after - start)
    return estimate


# -- the probe set ----------------------------------------------------------------------------------
def select_balanced(labels: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``num_samples`` entries, spread as evenly over the classes as the data allow (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    pools = {int(c): (labels == c).nonzero().flatten() for c in labels.unique()}
    pools = {c: idx[torch.randperm(len(idx), generator=generator)] for c, idx in pools.items()}
    chosen: list[int] = []
    taken = dict.fromkeys(pools, 0)
    target = min(num_samples, len(labels))
    while len(chosen) < target:
        for c in pools:  # round robin over the classes
            if taken[c] < len(pools[c]) and len(chosen) < target:
                chosen.append(int(pools[c][taken[c]]))
                taken[c] += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


def validation_loader(trainer: Any) -> Any:
    """The first validation dataloader, set up if the loop has not done so yet."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
        loop = trainer.fit_loop.epoch_loop.val_loop if fitting or trainer.validate_loop is None \
            else trainer.validate_loop
        source = getattr(loop, "_data_source", None)
        if source is not None and not source.is_defined():  # no `val_dataloader` anywhere
            raise MissingValidationDataError("it needs validation data, but the Trainer has no validation "
                                             "dataloader")
        loop.setup_data()
        loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise MissingValidationDataError("it needs validation data, but the Trainer has no validation dataloader")
    return loaders


@dataclass
class ProbeSet:
    """A fixed set of samples kept as one batch on the CPU.

    Attributes:
        batch: The samples, in the structure the dataloader yields (see the module docstring).
        labels: ``(N,)`` class labels, or ``None`` when the batches carry none (see `batch_labels`).
        indices: ``(N,)`` positions of the samples in the validation loader's order.
    """

    batch: Any
    labels: Optional[torch.Tensor]
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    def select(self, index: Union[Sequence[int], torch.Tensor]) -> ProbeSet:
        """The samples at ``index`` (repeats allowed), as a new probe set."""
        index = torch.as_tensor(index, dtype=torch.long)
        labels = None if self.labels is None else self.labels[index]
        return ProbeSet(slice_batch(self.batch, index, len(self)), labels, self.indices[index])

    def chunks(self, size: int) -> Iterator[Any]:
        """Batches of at most ``size`` samples, in order."""
        for start in range(0, len(self), size):
            yield slice_batch(self.batch, slice(start, start + size), len(self))

    def inputs(self, input_key: Optional[str] = None, argument: str = "forward_fn") -> torch.Tensor:
        """The input tensor of the whole set (see `batch_inputs`)."""
        return batch_inputs(self.batch, input_key, argument)

    @classmethod
    def collect(cls, trainer: Any, num_samples: int, seed: int, search_batches: int,
                target_key: Optional[str] = None) -> ProbeSet:
        """Draw ``num_samples`` samples from the first ``search_batches`` batches of the validation loader.

        With class labels (see `batch_labels`) the choice is seeded and spread evenly over the classes; without,
        it is the first ``num_samples`` samples. Batches are copied to the CPU.

        Raises:
            MissingValidationDataError: The Trainer has no validation dataloader.
            ValueError: The dataloader yields no batch.
        """
        batches, labels, sizes = [], [], []
        for i, batch in enumerate(validation_loader(trainer)):
            batch = _map(batch, lambda t: t.detach().cpu())
            found = batch_labels(batch, target_key)
            batches.append(batch)
            sizes.append(batch_size(batch))
            labels.append(found)
            if i + 1 >= search_batches or (found is None and sum(sizes) >= num_samples):
                break
        if not batches:
            raise ValueError("The validation dataloader yielded no batch")
        total = sum(sizes)
        if total < num_samples:
            log.warning("Only %d validation samples found in %d batches; using all of them (num_samples=%d)",
                        total, len(batches), num_samples)
        everything = _concat(batches, sizes)
        if all(lab is not None for lab in labels):
            indices = select_balanced(torch.cat(labels), num_samples, seed)
        else:
            indices = torch.arange(min(num_samples, total))
        chosen = slice_batch(everything, indices, total)
        return cls(chosen, batch_labels(chosen, target_key) if labels[0] is not None else None, indices)
