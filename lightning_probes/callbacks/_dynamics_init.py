"""`GradientDynamicsMonitor`'s reference weights ``w_0`` for the distance from initialisation: this rank's followed
entries written once to a raw file on disk (never a second model in memory) and streamed back, piece by piece, on
logged steps."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_probes.sharding import local_tensor

#: Entries read from the file at a time (64 MiB of float32): what the distance holds in memory besides the model.
PIECE = 1 << 24


def followed_flat(tensor: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """The followed entries of a (local) tensor, flat: all of them (``index`` ``None``) or those at ``index``."""
    flat = tensor.detach().reshape(-1)
    return flat if index is None else flat[index]


class InitialWeights:
    """The followed weights at the first optimiser step of a fit, in ``path`` (raw, this rank's entries in the order
    of the probe's parameters) with a JSON sidecar (``<path>.json``: sizes, dtype, the step taken).

    Args:
        path: The raw file (one per rank).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sizes: Optional[list[int]] = None
        self.dtype: Optional[np.dtype] = None
        self.step: Optional[int] = None
        self._offsets: list[int] = []
        self._map: Optional[np.memmap] = None
        self._squares: Optional[torch.Tensor] = None  # (P,) float64 ||w_0||^2 per parameter (this rank's entries)

    @property
    def ready(self) -> bool:
        return self._map is not None

    def close(self) -> None:
        self._map = None
        self._squares = None

    def _meta_path(self) -> str:
        return self.path + ".json"

    def open(self, sizes: Sequence[int], dtype: torch.dtype) -> bool:
        """Use the file already on disk (a resumed fit) when it holds these sizes in this dtype; returns whether."""
        try:
            with open(self._meta_path()) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return False
        want = np.dtype(_numpy_dtype(dtype))
        if (meta.get("sizes") != list(sizes) or meta.get("dtype") != want.str or "squares" not in meta
                or os.path.getsize(self.path) != sum(sizes) * want.itemsize):
            return False
        self._attach(list(sizes), want, int(meta.get("step", 0)), meta["squares"])
        return True

    def take(self, tensors: Sequence[torch.Tensor], step: int) -> None:
        """Write the followed entries ``tensors`` (one flat tensor per parameter) as ``w_0`` (at the start of a fit:
        one copy to the host, piece by piece), replacing any earlier file atomically."""
        dtype = np.dtype(_numpy_dtype(_storage_dtype([t.dtype for t in tensors])))
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        squares = []
        with open(tmp, "wb") as f:
            for t in tensors:
                total = 0.0
                for start in range(0, t.numel(), PIECE):
                    piece = t[start:start + PIECE].to("cpu", torch.float64 if dtype.itemsize == 8 else torch.float32)
                    f.write(piece.numpy().astype(dtype, copy=False).tobytes())
                    total += float(piece.double().square().sum())
                squares.append(total)
        os.replace(tmp, self.path)
        sizes = [t.numel() for t in tensors]
        with open(self._meta_path() + ".tmp", "w") as f:
            json.dump({"sizes": sizes, "dtype": dtype.str, "step": int(step), "squares": squares}, f)
        os.replace(self._meta_path() + ".tmp", self._meta_path())
        self._attach(sizes, dtype, step, squares)

    def _attach(self, sizes: list[int], dtype: np.dtype, step: int, squares: list[float]) -> None:
        self.sizes, self.dtype, self.step = sizes, dtype, step
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        # copy-on-write ("c"): the file is never written, and torch.from_numpy gets a writable view (no warning)
        self._map = (np.memmap(self.path, dtype=dtype, mode="c", shape=(sum(sizes),)) if sum(sizes)
                     else np.zeros(0, dtype=dtype))
        self._squares = torch.tensor(squares, dtype=torch.float64)

    def squares(self, tracked: Sequence[int], device: torch.device) -> torch.Tensor:
        """``(P,)`` float64 ``||w_0||^2`` of the ``tracked`` parameters' followed entries on this rank."""
        return self._squares[list(tracked)].to(device)

    def _slice(self, i: int) -> np.ndarray:
        return self._map[self._offsets[i]:self._offsets[i + 1]]

    def squared_distances(self, tensors: Sequence[torch.Tensor], tracked: Sequence[int],
                          device: torch.device) -> torch.Tensor:
        """``(P,)`` float64 ``||w - w_0||^2`` of the followed entries ``tensors`` (flat, one per tracked parameter),
        reading ``w_0`` back piece by piece (on an accelerator through pinned memory, without a host sync)."""
        out = torch.zeros(len(tracked), dtype=torch.float64, device=device)
        pinned = device.type != "cpu" and torch.cuda.is_available()
        for k, (t, i) in enumerate(zip(tensors, tracked)):
            reference = self._slice(i)
            compare = torch.float64 if t.dtype == torch.float64 else torch.float32
            for start in range(0, t.numel(), PIECE):
                host = torch.from_numpy(np.asarray(reference[start:start + PIECE]))
                w0 = host.pin_memory().to(device, non_blocking=True) if pinned else host.to(device)
                diff = t[start:start + PIECE].to(compare) - w0.to(compare)
                out[k] += diff.double().square().sum() if compare == torch.float32 else diff.square().sum()
        return out

    def state(self) -> dict[str, Any]:
        return {"file": os.path.basename(self.path), "step": self.step}


class InitDistance:
    """Mixin of `GradientDynamicsMonitor` (``init_distance=True``): takes ``w_0`` at the first optimiser step of a
    fit (or reopens the file of the fit a checkpoint resumes) and gives a logged step's ``||w - w_0||^2`` and
    ``||w_0||^2`` per tracked tensor, this rank's part (summed over the ranks with the step's block under FSDP2).

    It uses the probe's ``init_distance``, ``_params``, ``_selection_for``, ``_owned``, ``path`` and ``name``.
    """

    _initial: Optional[InitialWeights] = None
    _restored_initial: Optional[dict[str, Any]] = None

    def _ensure_initial(self, trainer: pl.Trainer) -> None:
        """At an optimiser step, before the optimiser moves anything: have ``w_0`` (every computing rank)."""
        if not self.init_distance or (self._initial is not None and self._initial.ready) or not self._params:
            return
        device = local_tensor(self._params[0]).device
        selection = self._selection_for(list(range(len(self._params))), device)
        tensors = [followed_flat(local_tensor(p), index) for p, index in zip(self._params, selection.local_index)]
        initial = InitialWeights(self.path(f"initial_weights.rank{trainer.global_rank}.bin"))
        restored = self._restored_initial
        dtype = _storage_dtype([t.dtype for t in tensors])
        if restored is None or not initial.open([t.numel() for t in tensors], dtype):
            if restored is not None:
                rank_zero_warn(f"{type(self).__name__} {self.name!r}: the initial weights of the resumed run "
                               f"({initial.path}) are missing or do not match the model; `init_distance` is measured "
                               f"from step {trainer.global_step} (the resumed weights) from now on.")
            initial.take(tensors, trainer.global_step)
        self._initial = initial

    def _initial_squares(self, params: list[torch.Tensor], local_index: list[Optional[torch.Tensor]],
                         tracked: list[int], device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(||w - w_0||^2, ||w_0||^2)`` per tracked tensor, this rank's part, after the step (logged steps)."""
        if self._initial is None or not self._initial.ready:
            return None
        flats = [followed_flat(p, index) for p, index in zip(params, local_index)]
        distance = self._initial.squared_distances(flats, tracked, device)
        return self._owned(distance, tracked, device), self._owned(self._initial.squares(tracked, device),
                                                                  tracked, device)

    def _initial_state(self) -> dict[str, Any]:
        return {} if self._initial is None or not self._initial.ready else {"initial_weights": self._initial.state()}

    def _reset_initial(self) -> None:
        if self._initial is not None:
            self._initial.close()
        self._initial, self._restored_initial = None, None


def _numpy_dtype(dtype: torch.dtype) -> Any:
    return np.float64 if dtype == torch.float64 else np.float32


def _storage_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The widest of ``dtypes`` (float64 if any, else float32: 16-bit weights are kept as float32, exactly)."""
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32
