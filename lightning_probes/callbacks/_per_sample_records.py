"""The records and histogram files of `PerSampleGradientMonitor`, made on the host from an analysed step's block."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from lightning_probes.functional.gradient_tests import GRADIENT_TEST_FIELDS, HistogramSpec


@dataclass(frozen=True)
class RecordContext:
    """What the records of an analysed step need to know of the probe and the run, taken when it is analysed."""

    output_dir: str
    name: str
    layers: list[str]
    numels: list[int]
    epoch: int
    spec: Optional[HistogramSpec]
    vectorized: bool
    no_curvature: Optional[str]
    rank_one_tensors: int


def record_producer(context: RecordContext, shapes: Mapping[str, tuple[int, ...]], step: int,
                    lr: float) -> Callable[[torch.Tensor], list[dict[str, Any]]]:
    """The function that turns the step's block (on the host, at the flush) into its records and npz file."""
    layers, numels, spec = context.layers, context.numels, context.spec
    rows, columns = len(layers) + 1, len(GRADIENT_TEST_FIELDS)

    def value(v: float) -> Optional[float]:
        return v if math.isfinite(v) else None

    def produce(host: torch.Tensor) -> list[dict[str, Any]]:
        data = host.numpy()
        table = data[:rows * columns].reshape(rows, columns)
        at = rows * columns
        outside = data[at:at + 2 * rows].reshape(rows, 2)
        at += 2 * rows
        loss, count = float(data[at]), int(round(float(data[at + 1])))
        at += 2
        arrays: dict[str, Any] = {}
        for key, shape in shapes.items():
            size = int(np.prod(shape))
            arrays[key] = data[at:at + size].reshape(shape)
            at += size
        relative = None
        if arrays and spec is not None:
            relative = os.path.join(context.name, "histograms", f"step_{step:08d}.npz")
            path = os.path.join(context.output_dir, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            extra: dict[str, Any] = {"layers": np.array(layers), "step": np.array(step)}
            if "hist_1d" in arrays:
                extra.update(hist_1d=arrays["hist_1d"], hist_1d_total=arrays["hist_1d"].sum(0),
                             edges_1d=spec.edges_1d().numpy(), outside_1d=outside[:-1, 0])
            if "hist_2d" in arrays:
                x_edges, y_edges = spec.edges_2d()
                extra.update(hist_2d=arrays["hist_2d"], hist_2d_total=arrays["hist_2d"].sum(0),
                             edges_2d_grad=x_edges.numpy(), edges_2d_param=y_edges.numpy(),
                             outside_2d=outside[:-1, 1])
            np.savez(path, **extra)
        records = []
        for r in range(rows):
            record: dict[str, Any] = {"step": step, "epoch": context.epoch,
                                      "layer": layers[r] if r < len(layers) else "__total__",
                                      "numel": numels[r] if r < len(layers) else sum(numels),
                                      "num_samples": count}
            record.update({f: value(float(v)) for f, v in zip(GRADIENT_TEST_FIELDS, table[r])})
            record["hist_outside_1d"] = value(float(outside[r, 0]))
            record["hist_outside_2d"] = value(float(outside[r, 1]))
            if r == len(layers):
                record.update(loss=value(loss), lr=value(lr), vectorized=context.vectorized,
                              rank_one_tensors=context.rank_one_tensors,
                              histograms=relative)
                if context.no_curvature is not None:
                    record["curvature_unavailable"] = context.no_curvature
            records.append(record)
        return records

    return produce
