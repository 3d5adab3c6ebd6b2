"""Capturing layer outputs with forward hooks: one shared mechanism for the representation probes."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lightning_probes.naming import clean_name, close_matches
from lightning_probes.probe_data import LayerOutputError

log = logging.getLogger(__name__)

#: Activation modules captured by default, besides every leaf module that has parameters.
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Mish,
               nn.Hardtanh, nn.ReLU6, nn.PReLU, nn.Softmax)
#: Activations with a bounded range, for the saturation share: (low, high).
BOUNDED = {nn.Tanh: (-1.0, 1.0), nn.Sigmoid: (0.0, 1.0), nn.Hardtanh: (-1.0, 1.0), nn.ReLU6: (0.0, 6.0),
           nn.Softmax: (0.0, 1.0)}


def is_parametrization_part(name: str) -> bool:
    """Whether ``name`` is a module of a parametrization (``<layer>.parametrizations.<tensor>...``), not a layer."""
    return "parametrizations" in name.split(".")


def is_layer_leaf(module: nn.Module) -> bool:
    """Whether ``module`` is a leaf layer: no child modules, besides the ``parametrizations`` of a layer wrapped by
    ``torch.nn.utils.parametrize`` (``parametrizations.spectral_norm``, ``weight_norm``, ...)."""
    parametrized = parametrize.is_parametrized(module)
    return not any(True for name, _ in module.named_children() if not (parametrized and name == "parametrizations"))


def has_own_parameters(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters itself, a parametrized tensor (its ``original``) included."""
    return parametrize.is_parametrized(module) or any(True for _ in module.parameters(recurse=False))


@contextmanager
def uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """Swap ``torch.compile``d submodules for their originals for the duration of the block.

    Compiled graphs do not call forward hooks registered after compilation; the eager originals do. The
    parameters are shared, so the outputs are the same.
    """
    swapped = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                original = getattr(child, "_orig_mod", None)
                if isinstance(original, nn.Module):
                    setattr(parent, name, original)
                    swapped.append((parent, name, child))
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


class NoLayerError(ValueError):
    """The default selection found no module to capture (the model applies its parameters functionally)."""


def select_modules(model: nn.Module, names: Optional[Sequence[str]] = None,
                   default: str = "blocks") -> dict[str, nn.Module]:
    """Modules to capture, by clean name (``_orig_mod.`` and leading ``module.`` removed).

    Without ``names``, the ``default`` selection: ``"blocks"``, the signal as it leaves each block (every
    activation module, plus the last leaf module with parameters, the classifier), or every leaf module with
    parameters when the model has no activation module (it applies them functionally); ``"all"``, every leaf
    module with parameters plus every activation module (the pre-activation, normalised and activated signal of
    every block: about three times the features, many of them near-duplicates). With ``names``, each must be a
    module name; an unknown one raises ``ValueError`` listing close matches. A layer wrapped by a parametrization
    (``torch.nn.utils.parametrizations.spectral_norm``, ``weight_norm``) is a leaf layer like a plain one; the
    modules of its ``parametrizations`` are never selected by default.
    """
    if default not in ("blocks", "all"):
        raise ValueError(f"Expected `default` to be 'blocks' or 'all', but got {default!r}")
    modules = {}
    for name, module in model.named_modules():
        name = clean_name(name)
        if name and name not in modules:
            modules[name] = module
    if names is None:
        layers = {n: m for n, m in modules.items() if not is_parametrization_part(n)}
        parametrised = [n for n, m in layers.items() if is_layer_leaf(m) and has_own_parameters(m)]
        activations = [n for n, m in layers.items() if isinstance(m, ACTIVATIONS)]
        if default == "blocks" and activations:
            keep = set(activations) | set(parametrised[-1:])
        else:
            keep = set(parametrised) | set(activations)
        chosen = {n: m for n, m in modules.items() if n in keep}
        if not chosen:
            raise NoLayerError(f"{type(model).__name__} has no leaf module with parameters and no activation module "
                             "to capture; pass `layers` explicitly")
        return chosen
    unknown = [n for n in names if n not in modules]
    if unknown:
        hints = {n: close_matches(n, modules) for n in unknown}
        raise ValueError("Unknown layer name(s): " + "; ".join(
            f"{n!r} (did you mean {', '.join(map(repr, h)) or 'nothing close'}?)" for n, h in hints.items())
            + f". Available: {', '.join(list(modules)[:30])}{' ...' if len(modules) > 30 else ''}")
    return {n: modules[n] for n in names}


def reduce_features(output: torch.Tensor, max_features: int) -> torch.Tensor:
    """Flatten a layer output to ``(batch, features)`` with at most ``max_features`` features.

    Outputs with spatial dimensions ``(batch, C, *spatial)`` wider than ``max_features`` are first reduced by
    adaptive average pooling to the largest square (cube) grid with ``C * grid <= max_features`` (global
    average when even ``C`` features are too many, then only the first ``max_features`` channels are kept).
    Other outputs wider than ``max_features`` keep their first ``max_features`` features.
    """
    if output.ndim > 2 and output[0].numel() > max_features:
        channels, spatial = output.shape[1], output.ndim - 2
        side = max(1, int(math.floor((max_features / channels) ** (1 / spatial))))
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}.get(spatial)
        if pool is not None:
            output = pool(output, side)
    flat = output.reshape(output.shape[0], -1)
    return flat[:, :max_features]


#: Modules already warned about being called more than once in one forward pass.
_WARNED_REPEAT: weakref.WeakSet = weakref.WeakSet()


class ActivationCapture:
    """Forward hooks that keep ``detach().clone()``d, reduced outputs of chosen modules for one forward pass.

    A module called several times in one forward pass contributes its first call (a warning says so, once per
    module);
    a tuple or list output contributes its first tensor; a module whose output holds no tensor raises a
    clear error (`lightning_probes.probe_data.LayerOutputError`, a ``TypeError``), or with ``tolerant`` is
    left out and named in ``invalid``.

    Args:
        modules: ``{name: module}`` to capture, e.g. from `select_modules`.
        max_features: Feature cap per layer (see `reduce_features`); ``None`` keeps the raw output shape.
        inputs: Capture each module's first positional input instead of its output (e.g. the inputs of
            ``Linear``/``Conv2d`` layers, for per-unit alignment).
        reducers: ``{name: reducer(output, batch_size) -> rows}`` per layer (e.g.
            `lightning_probes.feature_rows.FeatureReducer`), used instead of ``max_features``; ``batch_size`` is
            the attribute of that name, set by the caller before each forward (``None``: unknown).
        tolerant: Record a module whose output (input) holds no tensor in ``invalid`` (``{name: type}``) instead
            of raising (the layer check of the default selection leaves such modules out).
    """

    def __init__(self, modules: dict[str, nn.Module], max_features: Optional[int], inputs: bool = False,
                 reducers: Optional[dict[str, Callable[[torch.Tensor, Optional[int]], torch.Tensor]]] = None,
                 tolerant: bool = False) -> None:
        self.modules = modules
        self.max_features = max_features
        self.inputs = inputs
        self.reducers = reducers
        self.batch_size: Optional[int] = None
        self.tolerant = tolerant
        self.invalid: dict[str, str] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._warned_repeat = False

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if name in self.outputs:
                if not self._warned_repeat and module not in _WARNED_REPEAT:
                    self._warned_repeat = True
                    _WARNED_REPEAT.add(module)  # once per module and process, not at every analysis
                    log.warning("Layer %r was called more than once in one forward pass; its first call is used",
                                name)
                return
            value = args if self.inputs else output
            tensor = value
            if isinstance(value, (tuple, list)):
                tensor = next((o for o in value if isinstance(o, torch.Tensor)), None)
            if not isinstance(tensor, torch.Tensor):
                if self.tolerant:
                    self.invalid[name] = type(value).__name__
                    return
                what = "received" if self.inputs else "produced"
                raise LayerOutputError(f"Layer {name!r} ({type(module).__name__}) {what} {type(value).__name__}, "
                                       "which holds no tensor; choose other `layers`")
            # Clone: an in-place op later in the network (ReLU(inplace=True)) must not change what we saw.
            tensor = tensor.detach()
            if self.reducers is not None:
                reduced = self.reducers[name](tensor, self.batch_size)
            else:
                reduced = tensor if self.max_features is None else reduce_features(tensor, self.max_features)
            self.outputs[name] = reduced.clone()

        return hook

    @contextmanager
    def capturing(self) -> Iterator[ActivationCapture]:
        """Register the hooks for the duration of the block; they are removed on exit, exceptions included."""
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def pop(self, allow_missing: bool = False) -> dict[str, torch.Tensor]:
        """The outputs of the last forward pass, in module order; clears them.

        Args:
            allow_missing: Leave out modules that were not called, instead of raising ``ValueError``.
        """
        outputs, self.outputs = self.outputs, {}
        missing = [n for n in self.modules if n not in outputs]
        if missing and not allow_missing:
            raise ValueError(f"Layer(s) {missing} produced no output in the forward pass; are they used?")
        return {n: outputs[n] for n in self.modules if n in outputs}
