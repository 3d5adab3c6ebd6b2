"""Ablation across checkpoints: finding, checking and loading them, comparing their results; the console table.

Part of the ablation engine (`lightning_probes.analysis.ablation`): `compare_checkpoints` asks whether networks
damaged at different points of training collapse onto the same classes; `accuracy_table` prints one analysis.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from lightning_probes.analysis.ablation import ALL_LAYERS, ORDERS
from lightning_probes.functional.ablation import class_agreement, histogram_overlap
from lightning_probes.io import read_checkpoint

__all__ = ["accuracy_table", "check_checkpoint", "compare_checkpoints", "find_checkpoints", "load_weights",
           "targets_of"]


# -- checkpoints -----------------------------------------------------------------------------------------------
def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


def find_checkpoints(path: str, pattern: str = "*.ckpt") -> list[str]:
    """The checkpoint file ``path``, or the files in directory ``path`` matching ``pattern``, in natural order.

    In a directory, ``last*.ckpt`` (a copy of the newest checkpoint that ``ModelCheckpoint(save_last=True)``
    writes) is left out when other checkpoints match; pass it as a file to analyse it.

    Raises:
        FileNotFoundError: If ``path`` does not exist or the directory holds no matching file; the message
            names ``ckpt_path``.

    Example:
        >>> find_checkpoints("runs/mlp/version_0/checkpoints")  # doctest: +SKIP
        ['.../epoch=0-step=23.ckpt', '.../epoch=1-step=46.ckpt', ..., '.../epoch=10-step=253.ckpt']
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Expected `ckpt_path` to be a checkpoint file or a directory of checkpoints, but "
                                f"{path!r} does not exist (looked for {os.path.abspath(path)!r})")
    found = sorted((os.path.join(path, name) for name in os.listdir(path)
                    if fnmatch.fnmatch(name, pattern) and os.path.isfile(os.path.join(path, name))), key=_natural_key)
    others = [f for f in found if not os.path.basename(f).startswith("last")]
    found = others or found
    if not found:
        raise FileNotFoundError(f"Expected `ckpt_path` to be a checkpoint file or a directory of checkpoints, but "
                                f"{path!r} holds no file matching {pattern!r}")
    return found


def check_checkpoint(model: nn.Module, path: str, trust: bool = False) -> dict[str, Any]:
    """Read the Lightning checkpoint ``path`` and check that its ``state_dict`` fits ``model`` exactly.

    Returns:
        The checkpoint (``state_dict``, ``epoch``, ``global_step``, ...).

    Raises:
        ValueError: If it cannot be read or its keys or shapes differ from the model's (the message lists them).
    """
    checkpoint = read_checkpoint(path, "ckpt_path", trust=trust)
    state, own = checkpoint["state_dict"], model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape]
    if missing or unexpected or resized:
        problems = "; ".join(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" for label, keys in
                             (("missing", missing), ("unexpected", unexpected), ("other shape", resized)) if keys)
        raise ValueError(f"Expected `ckpt_path` {path!r} to hold the weights of the {type(model).__name__} of "
                         f"`config`, but it does not match: {problems}")
    return checkpoint


def load_weights(model: nn.Module, path: str, trust: bool = False) -> dict[str, Any]:
    """Load the checkpoint's weights into ``model`` (strictly); return ``{"checkpoint", "epoch", "global_step"}``.

    ``trust`` reads checkpoints holding pickled objects (see `lightning_probes.io.read_checkpoint`)."""
    checkpoint = check_checkpoint(model, path, trust)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return {"checkpoint": path, "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}


# -- across checkpoints ----------------------------------------------------------------------------------------
def targets_of(analysis: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The damaged-network sections of one analysis: ``{layer or "all_layers": {"high", "low", "random"}}``."""
    targets = {name: layer for name, layer in analysis["layers"].items() if "high" in layer}
    if ALL_LAYERS in analysis:
        targets[ALL_LAYERS] = analysis[ALL_LAYERS]
    return targets


def _collapse_row(section: Mapping[str, Any], order: str, key: str) -> list:
    """Per fraction: ``top_class``/``top_share``/``entropy``/``histogram`` of an order (random: over repeats)."""
    if order == "random" and key in ("top_share", "entropy"):
        key = f"{key}_mean"
    return [c[key] for c in section[order]["collapse"]]


def compare_checkpoints(analyses: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Do networks damaged at different points of training collapse onto the same classes, or scatter?

    Args:
        analyses: `ablate` results of several checkpoints of one model, with the same settings.
        names: A name per checkpoint (its file stem).

    Returns:
        ``{"checkpoints": names, "fractions", "targets": {target: {order: {"top_class", "top_share",
        "entropy"`` (each ``[checkpoint][fraction]``), ``"modal_class", "agreement"`` (per fraction: the class
        most checkpoints collapse onto and the share of checkpoints that do, `class_agreement`) and
        ``"overlap"`` (per fraction: mean pairwise overlap of the checkpoints' predicted-class distributions,
        `histogram_overlap`; 1 identical, 0 disjoint)}}}``.
    """
    if len(analyses) != len(names) or not analyses:
        raise ValueError(f"Expected one name per analysis, but got {len(names)} names for {len(analyses)} analyses")
    fractions = analyses[0]["fractions"]
    if any(a["fractions"] != fractions for a in analyses):
        raise ValueError("Expected analyses run with the same `fractions`")
    per_checkpoint = [targets_of(a) for a in analyses]
    comparison: dict[str, Any] = {}
    for target in per_checkpoint[0]:
        comparison[target] = {}
        for order in ORDERS:
            sections = [t[target] for t in per_checkpoint]
            top_class = [_collapse_row(s, order, "top_class") for s in sections]
            histograms = [_collapse_row(s, order, "histogram") for s in sections]
            agreement = [class_agreement([row[i] for row in top_class]) for i in range(len(fractions))]
            overlap = []
            for i in range(len(fractions)):
                matrix = histogram_overlap(torch.tensor([h[i] for h in histograms]))
                off_diagonal = matrix[~torch.eye(len(names), dtype=torch.bool)]
                overlap.append(float(off_diagonal.mean()) if off_diagonal.numel() else math.nan)
            comparison[target][order] = {
                "top_class": top_class, "top_share": [_collapse_row(s, order, "top_share") for s in sections],
                "entropy": [_collapse_row(s, order, "entropy") for s in sections],
                "modal_class": [a["modal_class"] for a in agreement], "agreement": [a["agreement"] for a in agreement],
                "overlap": overlap}
    return {"checkpoints": list(names), "fractions": list(fractions), "targets": comparison}


# -- console ---------------------------------------------------------------------------------------------------
def accuracy_table(analysis: Mapping[str, Any], title: Optional[str] = None) -> str:
    """Accuracy per target, order and fraction as a fixed-width text table (random: mean +- std)."""
    fractions = analysis["fractions"]
    header = ["layer", "order"] + [f"{f:g}" for f in fractions]
    rows = [["(intact)", "", *([f"{analysis['intact']['acc']:.3f}"] * len(fractions))]]
    for target, section in targets_of(analysis).items():
        for order in ("high", "low"):
            rows.append([target, order, *(f"{a:.3f}" for a in section[order]["acc"])])
        means, stds = section["random"]["acc_mean"], section["random"]["acc_std"]
        rows.append([target, "random", *(f"{m:.3f}" + (f"±{s:.3f}" if s == s else "") for m, s in zip(means, stds))])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    if title:
        lines.insert(0, title)
    return "\n".join(lines)
