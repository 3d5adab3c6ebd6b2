"""Helpers shared by the benchmarks: quiet Lightning, random data of real shapes, a wall-clock timer."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def quiet() -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_probes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads (and ``OMP_NUM_THREADS`` of subprocesses). On a shared machine
    whose cores are busy, torch's default (one thread per core) can make small training steps 10x slower
    through oversubscription, far more than the probes' larger operations; ``--threads 1`` compares like with
    like there."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads, also OMP_NUM_THREADS of subprocesses (default: torch's)")


def set_threads(threads: Optional[int]) -> None:
    """Apply ``--threads`` to this process and (through the environment) to its subprocesses."""
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """``--output DIR``: keep what the runs write there; by default it goes to a temporary directory."""
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="keep the runs' files (probe JSONL, figures, logs) in DIR; default: a temporary "
                             "directory, deleted at the end")


def add_smoke_argument(parser: argparse.ArgumentParser) -> None:
    """``--smoke``: the benchmark's smallest setting (seconds), to check that it runs; its numbers mean nothing.
    Everything it writes goes under ``--output`` or a temporary directory, as always."""
    parser.add_argument("--smoke", action="store_true",
                        help="run the smallest setting (seconds) to check that the benchmark works; the numbers "
                             "it prints mean nothing")


def apply_smoke(args: argparse.Namespace, **smallest: object) -> argparse.Namespace:
    """With ``--smoke``, replace the parsed settings by the benchmark's smallest ones (``smallest``)."""
    if getattr(args, "smoke", False):
        for name, value in smallest.items():
            setattr(args, name, value)
    return args


@contextmanager
def output_dir(path: Optional[str]) -> Iterator[str]:
    """Yield ``path`` (created if needed) or, when it is ``None``, a temporary directory removed afterwards."""
    if path is not None:
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lp_bench_") as tmp:
        yield tmp


def random_loader(n: int, shape: tuple[int, ...], batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def bare_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class Stopwatch:
    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


def timed_method(obj, name: str, watch: Stopwatch) -> None:
    """Wrap ``obj.name`` so that the time spent in it adds to ``watch``."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        with watch.timing():
            return original(*args, **kwargs)

    setattr(obj, name, wrapper)
