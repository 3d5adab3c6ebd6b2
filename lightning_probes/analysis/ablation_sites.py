"""Where an ablation drops units: the hidden layers of a network, their drop points and the masking hooks.

Part of the ablation engine (`lightning_probes.analysis.ablation`): `find_sites` finds the units (the outputs of
every hidden ``nn.Linear`` / ``nn.Conv2d``; the classifier, the last in module order, is left alone) and where each
is dropped (the first activation module after its layer, else the layer's own output); `drop_units` masks them for
the duration of a block with forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_probes.capture import ACTIVATIONS as _PROBE_ACTIVATIONS
from lightning_probes.naming import clean_name

__all__ = ["ACTIVATIONS", "LAYERS", "UnitSite", "drop_units", "find_sites"]

#: Layers whose outputs are the units.
LAYERS = (nn.Linear, nn.Conv2d)
#: Element-wise activation modules a unit is dropped after (softmax-like modules normalise across units: not
#: drop points).
ACTIVATIONS = tuple(a for a in _PROBE_ACTIVATIONS if a is not nn.Softmax) + (
    nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink, nn.Threshold, nn.RReLU)


@dataclass(frozen=True)
class UnitSite:
    """A hidden layer whose output units are dropped, and where.

    Attributes:
        layer: Name of the ``nn.Linear`` / ``nn.Conv2d`` (as in ``model.named_modules()``, wrapper prefixes
            removed), e.g. ``"net.fc1"``.
        drop_at: Name of the module whose output is masked, e.g. ``"net.relu1"`` (``layer`` itself when no
            activation follows it).
        units: Output features / channels of the layer.
        kind: ``"linear"`` or ``"conv2d"``.
        layer_module: The layer.
        drop_module: The module masked.
    """

    layer: str
    drop_at: str
    units: int
    kind: Literal["linear", "conv2d"]
    layer_module: nn.Module = field(compare=False, repr=False)
    drop_module: nn.Module = field(compare=False, repr=False)


def find_sites(model: nn.Module) -> list[UnitSite]:
    """The hidden ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` in module order, each with its drop point.

    The last Linear/Conv in module order (the classifier) is excluded. A layer's drop point is the first
    activation module (`ACTIVATIONS`) registered after it and before the next Linear/Conv; the layer itself
    when there is none.

    Raises:
        ValueError: If the model has no hidden Linear/Conv2d layer.

    Example:
        >>> from lightning_probes.models.components import MLPNet
        >>> [(s.layer, s.drop_at, s.units) for s in find_sites(MLPNet(16, 3, (8, 6, 4)))][0]
        ('fc1', 'relu1', 8)
    """
    named = [(clean_name(name), module) for name, module in model.named_modules() if name]
    layer_positions = [i for i, (_, module) in enumerate(named) if isinstance(module, LAYERS)]
    if len(layer_positions) < 2:
        raise ValueError(f"Expected {type(model).__name__} to have hidden nn.Linear / nn.Conv2d layers besides its "
                         f"final classifier, but found {len(layer_positions)} Linear/Conv2d layer(s)")
    sites = []
    for start, stop in zip(layer_positions[:-1], layer_positions[1:]):
        name, layer = named[start]
        drop_name, drop = next(((n, m) for n, m in named[start + 1:stop] if isinstance(m, ACTIVATIONS)), (name, layer))
        linear = isinstance(layer, nn.Linear)
        sites.append(UnitSite(layer=name, drop_at=drop_name, units=layer.out_features if linear else layer.out_channels,
                              kind="linear" if linear else "conv2d", layer_module=layer, drop_module=drop))
    return sites


def _masker(site: UnitSite, mask: torch.Tensor, armed: list[bool]) -> Callable:
    unit_dim = 1 if site.kind == "conv2d" else -1

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not armed[0]:
            return None
        armed[0] = site.drop_module is site.layer_module  # an activation waits for its layer again
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Expected the drop point {site.drop_at!r} of {site.layer!r} to output a tensor, but it "
                            f"gave {type(output).__name__}")
        if output.ndim < 2 or output.shape[unit_dim] != mask.numel():
            raise ValueError(f"Expected the output of {site.drop_at!r} to have {mask.numel()} units (those of "
                             f"{site.layer!r}) along dim {unit_dim}, but got shape {tuple(output.shape)}")
        shape = [1] * output.ndim
        shape[unit_dim] = mask.numel()
        return output * mask.to(device=output.device, dtype=output.dtype).view(shape)

    return hook


@contextmanager
def drop_units(model: nn.Module, sites: Sequence[UnitSite], masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply the drop point of each layer in ``masks`` by its mask for the duration of the block.

    Args:
        model: The network (only used for its modules' hooks).
        sites: The sites (`find_sites`).
        masks: ``{layer name: (units,) multiplier}`` (`lightning_probes.functional.unit_mask`); layers not in
            it are left intact.

    The hooks are removed on exit, exceptions included. A hook registered on a drop module inside the block, after
    this one, sees the masked output.
    """
    handles = []
    unknown = sorted(set(masks) - {s.layer for s in sites})
    if unknown:
        raise ValueError(f"Expected `masks` for layers among the sites, but got {unknown}")
    try:
        for site in sites:
            if site.layer not in masks:
                continue
            mask = masks[site.layer]
            if mask.shape != (site.units,):
                raise ValueError(f"Expected the mask of {site.layer!r} of shape ({site.units},), but got "
                                 f"{tuple(mask.shape)}")
            armed = [site.drop_module is site.layer_module]
            if site.drop_module is not site.layer_module:
                def arm(module: nn.Module, args: Any, output: Any, armed: list[bool] = armed) -> None:
                    armed[0] = True

                handles.append(site.layer_module.register_forward_hook(arm))
            handles.append(site.drop_module.register_forward_hook(_masker(site, mask, armed)))
        yield
    finally:
        for handle in handles:
            handle.remove()
