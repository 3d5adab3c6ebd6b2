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


# -- the one-pass step (eager reference of `lightning_probes.functional._native`; compiled where asked) --------
#: The weights' before-copy of a compared step (`encode_weights`) for float32 weights: 3 bytes beside the state
#: byte. The 23 mantissa bits go to an ``int16`` plane and the low 7 bits of a ``uint8`` plane, the sign to that
#: plane's top bit, and the exponent as its distance below ``eref``, the largest exponent of the tensor's
#: followed weights, to the state byte's top nibble: exact for distances 0-14, i.e. for every weight of at least
#: ``2**-15`` times the tensor's largest magnitude. Smaller ("tiny", nibble 15) weights keep sign and mantissa,
#: and their exponent is decoded as the one (at most ``eref - 15``) nearest to the weight's after the step; a
#: tiny weight that was +-0 is marked by an all-ones mantissa (`MANT`). 16-bit weights are copied whole
#: (2 bytes), float64 weights too (8 bytes).
MANT = (1 << 23) - 1


def weight_planes(dtype: torch.dtype, n: int, device: torch.device
                  ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Empty ``(p16, p8, c64)`` buffers of `encode_weights` for ``n`` followed entries of ``dtype`` weights."""
    if dtype == torch.float32:
        return (torch.empty(n, dtype=torch.int16, device=device), torch.empty(n, dtype=torch.uint8, device=device),
                None)
    if dtype == torch.float64:
        return None, None, torch.empty(n, dtype=torch.float64, device=device)
    return torch.empty(n, dtype=torch.int16, device=device), None, None


def planes_bytes(dtype: torch.dtype) -> int:
    """Bytes per followed entry of `weight_planes` (besides the state byte)."""
    return {torch.float32: 3, torch.float64: 8}.get(dtype, 2)


def _bits(w: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of ``w`` as non-negative int64."""
    return w.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def exponent_max(w: torch.Tensor) -> torch.Tensor:
    """``eref`` of `encode_weights`: the largest biased exponent of the float32 entries ``w`` (0-d int64; 0 if
    empty)."""
    if w.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=w.device)
    return ((_bits(w) >> 23) & 0xFF).amax()


def encode_weights(w: torch.Tensor, eref: Optional[torch.Tensor] = None
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """The before-copy of flat weights (see `MANT`): ``(p16, p8, c64, nibble)``, ``nibble`` the int64 bits to put
    above the current code in the state byte (0 unless float32). ``eref``: default `exponent_max` of ``w``."""
    if w.dtype == torch.float64:
        return None, None, w.clone(), torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    if w.dtype != torch.float32:
        return w.view(torch.int16).clone(), None, None, torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    u = _bits(w)
    distance = (exponent_max(w) if eref is None else eref) - ((u >> 23) & 0xFF)
    tiny = distance >= 15
    distance = torch.where(tiny, torch.full_like(distance, 15), distance)
    m = torch.where(tiny & ((u & 0x7FFFFFFF) == 0), torch.full_like(u, MANT), u & MANT)
    p16 = (((m & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16)
    p8 = ((m >> 16) | ((u >> 24) & 0x80)).to(torch.uint8)
    return p16, p8, None, distance << 4


def decode_weights(after: torch.Tensor, code: torch.Tensor, p16: Optional[torch.Tensor], p8: Optional[torch.Tensor],
                   c64: Optional[torch.Tensor], eref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weights before the step from `encode_weights` and the weights after it (``code``: the int64 state bytes,
    ``eref`` the one the encoding used).

    float32: exact for every weight of at least ``2**-15`` times the tensor's largest magnitude before the step,
    however far it moved. A smaller weight is exact when its exponent is the nearest (below that bound) to the
    exponent of its value after the step; else its magnitude is off by a power of two, while staying below
    ``2**-14`` times the largest magnitude, so its share of the update norm is off by at most that much, and the
    sign of its update only when the weight after the step is that small too.
    """
    if c64 is not None:
        return c64
    if p8 is None:
        return p16.view(after.dtype)
    m = (p16.to(torch.int64) & 0xFFFF) | ((p8.to(torch.int64) & 0x7F) << 16)
    sign = (p8.to(torch.int64) & 0x80) << 24
    distance = code >> 4
    exact = ((eref - distance) << 23) | m
    ma = _bits(after) & 0x7FFFFFFF
    j = torch.clamp((ma - m + (1 << 22)) >> 23, min=0)
    j = torch.minimum(j, eref - 15)
    small = torch.where(m == MANT, torch.zeros_like(m), (j << 23) | m)
    ub = sign | torch.where(distance == 15, small, exact)
    return ((ub ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32)


def _compare_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dynamics_before_one(grad: torch.Tensor, state: Optional[torch.Tensor], weight: torch.Tensor,
                        zero_threshold: float, release_threshold: float, scale: Optional[torch.Tensor] = None,
                        eref: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[Any, Any, Any]]:
    """One tensor's part of the step before the optimiser (the reference of the C kernel; flat inputs).

    Args:
        grad: The followed gradient entries (flat, any float dtype; compared in float32, float64 for float64).
        state: Their ``int8`` state of the step before (`state_codes` values in ``[0, 27)``), or ``None``.
        weight: The followed weight entries (flat), before the step.
        zero_threshold: Magnitude below which an entry counts as zero.
        release_threshold: Magnitude below which an entry counts as near zero.
        scale: ``1 / loss scale`` when the gradients are still scaled (AMP), else ``None``.
        eref: The tensor's `exponent_max` (default: that of ``weight``; a slice of a tensor passes the tensor's).

    Returns:
        ``(counts, square, byte, planes)``: ``(7,)`` int64 counts (``COUNT_NAMES``, the last six 0 without a
        state), the sum of the squared unscaled gradient (float64), the new ``int8`` state byte (current code, and
        for float32 weights the spare bits of `encode_weights`), and ``(p16, p8, c64)``.
    """
    x = grad.to(_compare_dtype(grad.dtype))
    square = torch.sum(x.double() * x.double())
    if scale is not None:
        x = x * scale.to(x.dtype)
    magnitude = x.abs()
    below = (magnitude < release_threshold).to(torch.int64)
    zero = (magnitude < zero_threshold).to(torch.int64)
    sign = (x > 0).to(torch.int64) - (x < 0).to(torch.int64)
    level = below + zero
    rows = [torch.sum(below * zero)]
    if state is None:
        rows += [torch.zeros((), dtype=torch.int64, device=x.device)] * 6
    else:
        s = state.to(torch.int64)
        previous = (s * 11) >> 5
        moved = s - 3 * previous - 1
        prev_sign = previous - 3 * ((previous * 11) >> 5) - 1
        below_prev = (s >= 9).to(torch.int64)
        product = prev_sign * sign
        flipped = (product < 0).to(torch.int64)
        direction = prev_sign * moved
        rows += [below_prev.sum(), (below_prev * (level == 0)).sum(), (product != 0).sum(), flipped.sum(),
                 (flipped * (direction < 0)).sum(), (flipped * (direction > 0)).sum()]
    p16, p8, c64, nibble = encode_weights(weight, eref)
    byte = ((3 * level + sign + 1) | nibble).to(torch.uint8).view(torch.int8)
    return torch.stack(rows), square, byte, (p16, p8, c64)


def dynamics_after_one(weight: torch.Tensor, byte: torch.Tensor, planes: Sequence[Optional[torch.Tensor]],
                       eref: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tensor's part of the step after the optimiser (the reference of the C kernel; flat inputs).

    Args:
        weight: The followed weight entries after the step (flat).
        byte: Their state bytes from `dynamics_before_one`.
        planes: ``(p16, p8, c64)`` from `dynamics_before_one`.
        eref: The `exponent_max` the encoding used (float32 weights).

    Returns:
        ``(state, update_square, weight_square)``: the new ``int8`` state (`state_codes`: the current code and the
        sign of the update), ``sum (w_after - w_before)**2`` and ``sum w_after**2`` (float64).
    """
    code = byte.view(torch.uint8).to(torch.int64)
    before = decode_weights(weight, code, *planes, eref)
    state = (3 * (code & 15) + (weight > before).to(torch.int64) + (weight >= before).to(torch.int64)).to(torch.int8)
    a = weight.double()
    d = a - before.double()
    return state, torch.sum(d * d), torch.sum(a * a)


def fused_dynamics_before(grads: list[torch.Tensor], states: Optional[list[torch.Tensor]],
                          weights: list[torch.Tensor], zero_threshold: float, release_threshold: float
                          ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[Any]]:
    """`dynamics_before_one` over whole tensors (written for ``torch.compile``: Triton on a GPU).

    Returns:
        ``(counts, squares, bytes, planes, erefs)``: ``(P, 7)`` int64, ``(P,)`` float64, per tensor the state
        bytes and ``(p16, p8, c64)``, and ``(P,)`` int64 `exponent_max` of each tensor's weights.
    """
    rows, squares, codes, planes, erefs = [], [], [], [], []
    for i, grad in enumerate(grads):
        weight = weights[i].reshape(-1)
        eref = exponent_max(weight) if weight.dtype == torch.float32 else torch.zeros((), dtype=torch.int64,
                                                                                        device=weight.device)
        counts, square, byte, plane = dynamics_before_one(grad.reshape(-1), None if states is None else states[i],
                                                          weight, zero_threshold, release_threshold, None, eref)
        rows.append(counts)
        squares.append(square)
        codes.append(byte)
        planes.append(plane)
        erefs.append(eref)
    return torch.stack(rows), torch.stack(squares), codes, planes, torch.stack(erefs)


def fused_dynamics_after(weights: list[torch.Tensor], codes: list[torch.Tensor], planes: list[Any],
                         erefs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """`dynamics_after_one` over whole tensors (written for ``torch.compile``): per tensor the new state, and
    ``(P,)`` float64 squared update and weight norms."""
    states, updates, squares = [], [], []
    for i, (weight, byte, plane) in enumerate(zip(weights, codes, planes)):
        state, update, square = dynamics_after_one(weight.reshape(-1), byte, plane, erefs[i])
        states.append(state)
        updates.append(update)
        squares.append(square)
    return states, torch.stack(updates), torch.stack(squares)


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
    (``total_steps / every_n_steps``; an unknown or infinite length does not) and `compile_supported`, except
    on a CPU where the C loops of `lightning_probes.functional._native` run (faster than Inductor's code: 0.6
    vs 1.5 ms for the MLP's first pass, one thread).

    Example:
        >>> should_compile(1000, 1, torch.device("meta")), should_compile(float("inf"), 1, torch.device("cpu"))
        (False, False)
    """
    if not math.isfinite(total_steps) or total_steps <= 0:
        return False
    if total_steps / every_n_steps < COMPILE_MIN_LOGGED_STEPS or not compile_supported(device):
        return False
    from lightning_probes.functional import _native

    return device.type != "cpu" or not _native.available()


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
