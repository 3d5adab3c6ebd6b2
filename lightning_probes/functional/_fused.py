"""Few-pass kernels behind `GradientStatsMonitor` and `GradientDynamicsMonitor`, eager and (optionally) compiled.

The probes' per-step work is a handful of passes over the flat gradients and weights. Eagerly each pass is one
kernel; `FusedKernel` runs a function through ``torch.compile`` instead when asked (Inductor emits one fused loop
per tensor on CPU, Triton kernels on GPUs) and falls back to the eager function, logging why once, when
compiling is unavailable or fails. The compiled and eager functions give the same integer counts exactly; float
reductions (norms, sums) agree to float rounding (their summation order differs).

Compact dynamics codes (``int8``, one byte per entry; the probe's state between two steps)::

    current = 3 * level + (sign(g) + 1)                              # in [0, 9): the gradient at step t
              level = [|g| < release_threshold] + [|g| < zero_threshold]
    state   = 3 * current_{t-1} + (sign(w_t - w_{t-1}) + 1)          # in [0, 27): step t-1 and its update
    key     = state + 27 * current_t                                 # in [0, 243): one histogram bin

Every count of `lightning_probes.functional.dynamics.COUNT_NAMES` is a sum over keys (`KEY_TABLE`), so the
comparison of two steps is one ``bincount`` per tensor. ``sign(w_t - w_{t-1}) + 1`` is read from two
comparisons (``(w_t > w_{t-1}) + (w_t >= w_{t-1})``): IEEE subtraction of two different finite
numbers is never zero, so it equals the sign of the float difference without forming it.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Number of histogram bins of a dynamics key (`dynamics_keys`).
NUM_KEYS = 243


def _key_table() -> np.ndarray:
    """``(243, 7)`` 0/1 matrix: which of ``COUNT_NAMES`` each key contributes to."""
    table = np.zeros((NUM_KEYS, 7), dtype=np.int64)
    for key in range(NUM_KEYS):
        state, current = key % 27, key // 27
        previous, moved = state // 3, state % 3 - 1  # moved: sign of the update of step t-1
        prev_sign, below_prev = previous % 3 - 1, previous // 3 >= 1
        sign, level = current % 3 - 1, current // 3
        flipped = prev_sign * sign < 0
        direction = prev_sign * moved  # -1: the update moved against the gradient (descent), +1: with it
        table[key] = [level == 2, below_prev, below_prev and level == 0, prev_sign * sign != 0, flipped,
                      flipped and direction == -1, flipped and direction == 1]
    return table


#: Which counts (in the order of ``COUNT_NAMES``) each key of `dynamics_keys` adds to.
KEY_TABLE = _key_table()


def _sign8(x: torch.Tensor) -> torch.Tensor:
    """``int8`` sign, in [-1, 1] even for NaN (whose sign is undefined: such steps are not compared)."""
    return torch.sign(x).to(torch.int8).clamp_(-1, 1)


def current_codes(flat: torch.Tensor, zero_threshold: float, release_threshold: float) -> torch.Tensor:
    """``int8`` ``3 * level + sign(g) + 1`` per entry of the flat gradient (see the module docstring).

    One ``abs``, two comparisons writing bytes, one ``sign`` and in-place ``int8`` arithmetic (a comparison costs
    about twice a ``sign`` on CPU); a NaN entry gets level 0.
    """
    magnitude = flat.abs()
    codes = (magnitude < release_threshold).view(torch.int8)  # a fresh tensor: modified in place below
    if zero_threshold > 0:
        codes += (magnitude < zero_threshold).view(torch.int8)
    del magnitude
    codes *= 3
    codes += _sign8(flat)
    codes += 1
    return codes


def state_codes(current: torch.Tensor, after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The ``int8`` state (``[0, 27)``) of a step from its `current_codes` and the flat weights around it."""
    state = current * 3  # + sign(after - before) + 1, from two comparisons (cheaper than a subtraction and sign)
    state += (after > before).view(torch.int8)
    state += (after >= before).view(torch.int8)
    return state


def _bincount(keys: torch.Tensor) -> torch.Tensor:
    if keys.device.type == "cpu":
        return torch.bincount(keys, minlength=NUM_KEYS)
    # bincount on an accelerator reads the maximum back to the host; histc with fixed bins does not.
    return torch.histc(keys.float(), bins=NUM_KEYS, min=0, max=NUM_KEYS).long()


_SEGMENTS: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def key_histogram(state: Optional[torch.Tensor], current: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``(len(sizes), 243)`` histogram of ``state + 27 * current`` per segment (``state`` ``None``: all 0).

    On CPU one ``bincount`` per segment (measured faster there than one over offset keys). On an accelerator
    one ``histc`` over every segment at once, whatever their number: each key is offset by ``243 * segment``
    (``repeat_interleave`` with a known output size, so no host synchronisation).
    """
    keys = current * 27
    if state is not None:
        keys += state
    keys = keys.view(torch.uint8)
    if keys.device.type == "cpu" or len(sizes) == 1:
        return torch.stack([_bincount(chunk) for chunk in keys.split(list(sizes))])
    return offset_key_histogram(keys, sizes)


def offset_key_histogram(keys: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """`key_histogram` of ``uint8`` keys as one ``histc`` over all segments (the accelerator path; any device)."""
    key = (tuple(sizes), keys.device)
    if key not in _SEGMENTS:
        if len(_SEGMENTS) > 64:
            _SEGMENTS.clear()
        _SEGMENTS[key] = torch.tensor(list(sizes), device=keys.device)
    bases = torch.arange(len(sizes), device=keys.device, dtype=torch.float32) * NUM_KEYS
    offsets = torch.repeat_interleave(bases, _SEGMENTS[key], output_size=keys.numel())
    bins = NUM_KEYS * len(sizes)
    return torch.histc(keys.float() + offsets, bins=bins, min=0, max=bins).long().view(len(sizes), NUM_KEYS)


_TABLES: dict[torch.device, torch.Tensor] = {}


def counts_from_keys(histogram: torch.Tensor) -> torch.Tensor:
    """``(..., 243)`` key histograms to ``(..., 7)`` counts (float64, exact below 2**53), on their device.

    The table is copied to a device once (a copy from host memory at every step would wait for the device).
    """
    table = _TABLES.get(histogram.device)
    if table is None:
        table = _TABLES[histogram.device] = torch.from_numpy(KEY_TABLE).to(histogram.device, torch.float64)
    return histogram.double() @ table


def transition_counts_compact(grad_prev: torch.Tensor, before_prev: torch.Tensor, after_prev: torch.Tensor,
                              grad: torch.Tensor, zero_threshold: float, release_threshold: float,
                              sizes: Optional[Sequence[int]] = None) -> np.ndarray:
    """`lightning_probes.functional.dynamics.transition_counts` through the compact codes (for tests).

    Args:
        grad_prev: Flat gradient of step ``t-1``.
        before_prev: Flat weights before step ``t-1``.
        after_prev: Flat weights after step ``t-1``.
        grad: Flat gradient of step ``t``.
        zero_threshold: Magnitude below which an entry counts as zero.
        release_threshold: Magnitude below which an entry counts as near zero.
        sizes: Segment sizes (default: one segment).

    Returns:
        ``(len(sizes), 7)`` int64 counts in the order of ``COUNT_NAMES`` (``(7,)`` without sizes).
    """
    state = state_codes(current_codes(grad_prev, zero_threshold, release_threshold), after_prev, before_prev)
    current = current_codes(grad, zero_threshold, release_threshold)
    split = list(sizes) if sizes is not None else [grad.numel()]
    counts = counts_from_keys(key_histogram(state, current, split)).round().long().cpu().numpy()
    return counts if sizes is not None else counts[0]


# -- compiled kernels ---------------------------------------------------------------------------------------
# Written for Inductor's CPU code generation: comparisons are widened to int32 at once and the int8 codes are
# narrowed last (float masks turned straight into bytes, and integer division, fall back to slow scalar code);
# every output is per tensor (a concatenation inside the graph becomes masked loads from every input).
def _int(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int32)


def _count(values: torch.Tensor) -> torch.Tensor:
    return values.sum(dtype=torch.int32)  # 0/1 values; a tensor has fewer than 2**31 entries here


def fused_dynamics_before(grads: list[torch.Tensor], states: Optional[list[torch.Tensor]],
                          indices: list[torch.Tensor], zero_threshold: float, release_threshold: float
                          ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """One pass per tensor (written for ``torch.compile``): counts, squared gradient norms and current codes.

    Args:
        grads: The gradients (float32 or float64; any shape).
        states: Per tensor, the flat ``int8`` state of the step before (`state_codes`), or ``None``.
        indices: Per tensor, the positions in its flat gradient of the entries to return as ``sample``.
        zero_threshold: Magnitude below which an entry counts as zero.
        release_threshold: Magnitude below which an entry counts as near zero.

    Returns:
        ``(counts, squares, currents, sample)``: ``(P, 7)`` int32 counts (``COUNT_NAMES``), ``(P,)`` sum of
        ``g**2`` (float64), per tensor the flat ``int8`` `current_codes`, and the sampled entries.
    """
    rows, squares, currents, samples = [], [], [], []
    for i, grad in enumerate(grads):
        g = grad.reshape(-1)
        magnitude = g.abs()
        below = _int(magnitude < release_threshold)
        zero = _int(magnitude < zero_threshold)
        sign = _int(g > 0) + _int(g >= 0) - 1
        currents.append((3 * (below + zero) + sign + 1).to(torch.int8))
        squares.append(torch.sum(g.double() * g.double()))
        samples.append(g[indices[i]])
        if states is None:
            rows.append(torch.stack([_count(zero)] + [torch.zeros((), dtype=torch.int32, device=g.device)] * 6))
            continue
        # Decoded without integer division: s // 3 == (11 * s) >> 5 for 0 <= s < 27.
        s = states[i].to(torch.int32)
        previous = (s * 11) >> 5
        moved = s - 3 * previous - 1
        prev_sign = previous - 3 * ((previous * 11) >> 5) - 1
        below_prev = _int(s >= 9)
        product = prev_sign * sign
        flipped = _int(product < 0)
        direction = prev_sign * moved
        rows.append(torch.stack([_count(zero), _count(below_prev), _count(below_prev * (1 - below)),
                                 _count(_int(product != 0)), _count(flipped), _count(flipped * _int(direction < 0)),
                                 _count(flipped * _int(direction > 0))]))
    return torch.stack(rows), torch.stack(squares), currents, torch.cat(samples)


def fused_dynamics_after(params: list[torch.Tensor], befores: list[torch.Tensor],
                         currents: Optional[list[torch.Tensor]], norms: bool
                         ) -> tuple[Optional[list[torch.Tensor]], torch.Tensor, torch.Tensor]:
    """One pass per tensor (written for ``torch.compile``): the new state and squared update/weight norms.

    Args:
        params: The weights after the step.
        befores: Per tensor, the flat weights before the step.
        currents: Per tensor, the flat `current_codes` of the step's gradients, or ``None`` (no state wanted).
        norms: Compute the squared norms (else zeros are returned).

    Returns:
        ``(states, update_squares, weight_squares)``: per tensor the flat ``int8`` state (or ``None``), and
        ``(P,)`` float64 each.
    """
    states, updates, weights = [], [], []
    for i, param in enumerate(params):
        w = param.reshape(-1)
        b = befores[i]
        if currents is not None:
            states.append((3 * currents[i].to(torch.int32) + _int(w > b) + _int(w >= b)).to(torch.int8))
        if norms:
            d = (w - b).double()
            updates.append(torch.sum(d * d))
            weights.append(torch.sum(w.double() * w.double()))
        else:
            updates.append(torch.zeros((), dtype=torch.float64, device=w.device))
            weights.append(torch.zeros((), dtype=torch.float64, device=w.device))
    return (states if currents is not None else None), torch.stack(updates), torch.stack(weights)


def fused_abs_summary(grads: list[torch.Tensor]) -> torch.Tensor:
    """``(P, 3)`` ``[sum |g|, ||g||_2, max |g|]`` per tensor in one pass each (written for ``torch.compile``)."""
    rows = []
    for grad in grads:
        g = grad.reshape(-1)
        magnitude = g.abs()
        rows.append(torch.stack([magnitude.sum(), torch.sum(g * g).sqrt(), magnitude.amax()]))
    return torch.stack(rows)


#: ``compile="auto"`` compiles when a fit will log at least this many steps (per probe). Measured on the 2-core CI
#: machine (MNIST MLP, both probes every step, 1 thread): compiling took 9-70 s on a quiet to busy machine (144 s
#: at load 13) and saved 5.8-10.6 ms of CPU per logged step, so it pays for itself after about 1,500 (quiet) to
#: 14,000 (load 13) logged steps; the bar sits between them.
COMPILE_MIN_LOGGED_STEPS = 5000


def compile_supported(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device`` here: Inductor with a C++ compiler on CPU, with
    Triton on CUDA."""
    if not hasattr(torch, "compile"):
        return False
    if device.type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def should_compile(total_steps: float, every_n_steps: int, device: torch.device) -> bool:
    """The ``compile="auto"`` rule: compile when the fit will log at least `COMPILE_MIN_LOGGED_STEPS` steps
    (``total_steps / every_n_steps``; an unknown or infinite length does not) and `compile_supported`.

    Example:
        >>> should_compile(1000, 1, torch.device("meta")), should_compile(float("inf"), 1, torch.device("cpu"))
        (False, False)
    """
    if not math.isfinite(total_steps) or total_steps <= 0:
        return False
    return total_steps / every_n_steps >= COMPILE_MIN_LOGGED_STEPS and compile_supported(device)


class FusedKernel:
    """``fn`` compiled with ``torch.compile`` on first use when ``enabled``, else (or when that fails) eager.

    The seconds of every call that builds a graph (the first, and any that meets new shapes) add to
    `compile_seconds`: the one-off cost of tracing, code generation and the C++/Triton build (Inductor caches
    builds on disk, so a later process pays less; graphs are kept per function, so a second probe with the same
    shapes in the same process pays nothing). A failure to
    compile or run the compiled function is logged once (info) and the eager ``fallback`` is used from then on.

    Args:
        fn: The function to compile (plain tensor code).
        fallback: The eager function with the same signature and results (default ``fn``).
        enabled: Try ``torch.compile`` at all.
        name: Name used in the log message.
    """

    def __init__(self, fn: Callable[..., Any], fallback: Optional[Callable[..., Any]] = None, enabled: bool = True,
                 name: str = "kernel") -> None:
        self.fn = fn
        self.fallback = fallback or fn
        self.name = name
        self.compile_seconds = 0.0
        self._compiled: Optional[Callable[..., Any]] = None
        self._failed = not enabled
        self.compilations = 0

    @property
    def active(self) -> bool:
        """Whether calls go to the compiled function."""
        return not self._failed

    def enable(self, enabled: bool) -> None:
        """Compile from the next call on (``True``) or run eagerly (``False``); before the first call."""
        if self._compiled is None:
            self._failed = not enabled

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and deep-copied without the compiled wrapper (rebuilt at the next call)."""
        return {**self.__dict__, "_compiled": None}

    @staticmethod
    def _graphs() -> int:
        """Graphs ``torch.compile`` has built in this process (a growing count means: this call compiled)."""
        try:
            from torch._dynamo.utils import counters

            return int(counters["stats"]["unique_graphs"])
        except Exception:  # noqa: BLE001 - a private counter: without it, only the first call is timed
            return -1

    def __call__(self, *args: Any) -> Any:
        if self._failed:
            return self.fallback(*args)
        try:
            first = self._compiled is None
            if first:
                if not hasattr(torch, "compile"):
                    raise RuntimeError("torch.compile is unavailable")
                self._compiled = torch.compile(self.fn, fullgraph=True)
            graphs = self._graphs()
            start = time.perf_counter()
            out = self._compiled(*args)
            built = self._graphs() != graphs if graphs >= 0 else first
            if built:  # this call traced and built a graph: a one-off cost
                self.compile_seconds += time.perf_counter() - start
                self.compilations += 1
                log.debug("Compiled %s (%d graphs, %.1f s in all)", self.name, self.compilations,
                          self.compile_seconds)
            return out
        except Exception as err:  # noqa: BLE001 - any failure to compile means: run eagerly
            self._failed = True
            log.info("Could not compile %s (%s: %s); running it eagerly.", self.name, type(err).__name__, err)
            return self.fallback(*args)
