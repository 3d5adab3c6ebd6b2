"""One-pass CPU kernels of the gradient probes: a small C library built with the system's C compiler at first use.

`lightning_probes.functional._fused` holds the eager reference of every kernel here; these loops give the same
integer counts and codes bit for bit and the same norms to float rounding (summed in float64, in another
order). They read each gradient, weight and state byte once per step (the eager reference takes about twenty
passes), which on one CPU thread is the difference between about 0.4 ms and 4 ms for a 568k-entry MLP.

The library is compiled once per source, compiler and CPU (``cc -O3 -march=native``, about half a second) into
``$LIGHTNING_PROBES_CACHE`` (default ``~/.cache/lightning_probes``) and loaded with `ctypes`. Without a C
compiler, or where the build or the load fails, `available` is false, one info line says why, and the probes
run the eager reference. ``LIGHTNING_PROBES_NATIVE=0`` turns the library off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from lightning_probes.functional._native_src import SOURCE

log = logging.getLogger(__name__)

#: dtype codes of the C kernels.
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (a library built elsewhere is not reused)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("flags", "model name", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> str:
    root = os.environ.get("LIGHTNING_PROBES_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                     "lightning_probes")
    return os.path.join(root, "native")


def _compiler() -> Optional[str]:
    return next((shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c and shutil.which(c)),
                None)


def _build(compiler: str) -> str:
    """The path of the built library (built now unless the cache has it)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    # Reassociation lets the float64 sums run in vector lanes (norms agree with the eager ones to rounding);
    # comparisons stay IEEE (NaN, infinities), no contraction into FMAs.
    flags = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
             "-ffp-contract=off", "-fno-strict-aliasing", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([SOURCE, version, " ".join(flags), _cpu_signature()]).encode()).hexdigest()[:20]
    directory = _cache_dir()
    target = os.path.join(directory, f"lp_kernels_{key}.so")
    if os.path.exists(target):
        return target
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # built aside, then moved in: safe for parallel ranks
        source = os.path.join(tmp, "lp_kernels.c")
        with open(source, "w", encoding="utf-8") as f:
            f.write(SOURCE)
        built = os.path.join(tmp, "lp_kernels.so")
        result = subprocess.run([compiler, *flags, source, "-o", built, "-lm"], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0 and "-march=native" in flags:  # a compiler that does not know the CPU
            flags.remove("-march=native")
            result = subprocess.run([compiler, *flags, source, "-o", built, "-lm"], capture_output=True, text=True,
                                    timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def library() -> Optional[ctypes.CDLL]:
    """The loaded library, building it at the first call; ``None`` where it cannot be had (logged once)."""
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        lib: Optional[ctypes.CDLL] = None
        start = time.perf_counter()
        try:
            if os.environ.get("LIGHTNING_PROBES_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                raise RuntimeError("LIGHTNING_PROBES_NATIVE=0")
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
            lib = ctypes.CDLL(_build(compiler))
            for name in ("lp_dynamics_before", "lp_dynamics_after", "lp_abs_summary", "lp_sample_sums"):
                getattr(lib, name).restype = None
            log.debug("Loaded the gradient probes' C kernels in %.2f s", time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - any failure: the eager reference runs instead
            log.info("The gradient probes' C kernels are unavailable (%s: %s); running their eager torch code.",
                     type(err).__name__, err)
            lib = None
        _STATE["lib"] = lib
        _STATE["seconds"] = time.perf_counter() - start
        return lib


def build_seconds() -> float:
    """Seconds the first `library` call took in this process (building or loading); 0 before it."""
    return float(_STATE.get("seconds", 0.0))  # type: ignore[arg-type]


def available() -> bool:
    """Whether the C kernels can run here (builds them at the first call)."""
    return library() is not None


def supports(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``tensors`` suit the C kernels: on the CPU, contiguous, all of one dtype the kernels know."""
    if not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in DTYPES and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)


def _pointers(tensors: Sequence[Optional[torch.Tensor]]) -> np.ndarray:
    return np.array([0 if t is None else t.data_ptr() for t in tensors], dtype=np.int64)


def _ptr(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


def _tensor_ptr(tensor: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if tensor is None else tensor.data_ptr())


class Group:
    """The fixed part of a kernel call over one tracked set: sizes, offsets and index pointers (built once).

    Args:
        sizes: Per tensor, the number of followed entries.
        indices: Per tensor, the positions (CPU, contiguous; int32 kept as they are when all are int32, else
            int64) of the followed entries in its flat local tensor, or ``None`` for every entry.
        samples: Per tensor, positions in its flat local tensor of the entries to return as the step's sample (the
            sign-map columns); default none.
    """

    def __init__(self, sizes: Sequence[int], indices: Sequence[Optional[torch.Tensor]],
                 samples: Optional[Sequence[torch.Tensor]] = None) -> None:
        samples = samples if samples is not None else [torch.zeros(0, dtype=torch.int64)] * len(sizes)
        self.samples = [t.to(torch.int64).contiguous() for t in samples]  # kept alive
        self.sample_ptrs = _pointers(self.samples)
        self.sample_n = np.asarray([t.numel() for t in self.samples], dtype=np.int64)
        self.n_sample = int(self.sample_n.sum())
        given = [i for i in indices if i is not None]
        self.index64 = not all(i.dtype == torch.int32 for i in given)
        dtype = torch.int64 if self.index64 else torch.int32
        self.indices = [None if i is None else i.to(dtype).contiguous() for i in indices]  # kept alive
        self.n = np.asarray(list(sizes), dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.n)[:-1]]).astype(np.int64)
        self.index_ptrs = _pointers(self.indices)
        self.total = int(self.n.sum())


def dynamics_before(group: Group, grads: Sequence[torch.Tensor], state: torch.Tensor, has_previous: bool,
                    weights: Sequence[torch.Tensor], planes: Sequence[Optional[torch.Tensor]], eref: torch.Tensor,
                    zero_threshold: float, release_threshold: float, scale: Optional[float]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C `lightning_probes.functional._fused.dynamics_before_one` over a group (CPU; `supports` both lists).

    ``state`` (``int8``, ``group.total``) is read (``has_previous``) and overwritten in place with the current
    codes and the weights' exponent nibble; ``planes`` (`weight_planes`) receive the rest of the weights' encoding
    and ``eref`` (``(P,)`` int32) each tensor's `lightning_probes.functional._fused.exponent_max`.

    Returns:
        ``(counts, squares, sample)``: ``(P, 7)`` int64 counts, ``(P,)`` float64 sums of the squared (unscaled)
        gradients, and the float64 values (scaled, as compared) of ``group.samples``' entries, in order.
    """
    lib = library()
    count = len(grads)
    counts = torch.empty(count, 7, dtype=torch.int64)
    squares = torch.empty(count, dtype=torch.float64)
    sample = torch.empty(group.n_sample, dtype=torch.float64)
    p16, p8, c64 = planes
    gptr, wptr = _pointers(grads), _pointers(weights)  # kept alive through the call
    lib.lp_dynamics_before(
        ctypes.c_int64(count), ctypes.c_int(DTYPES[grads[0].dtype]), _ptr(gptr), _ptr(group.index_ptrs),
        ctypes.c_int(int(group.index64)),
        _ptr(group.n), _ptr(group.offsets), _tensor_ptr(state), ctypes.c_int(int(has_previous)),
        ctypes.c_int(DTYPES[weights[0].dtype]), _ptr(wptr), _tensor_ptr(p16), _tensor_ptr(p8),
        _tensor_ptr(c64), _tensor_ptr(eref), ctypes.c_double(zero_threshold), ctypes.c_double(release_threshold),
        ctypes.c_double(1.0 if scale is None else scale), ctypes.c_int(scale is not None),
        _tensor_ptr(counts), _tensor_ptr(squares), _ptr(group.sample_ptrs), _ptr(group.sample_n),
        _tensor_ptr(sample))
    return counts, squares, sample


def dynamics_after(group: Group, weights: Sequence[torch.Tensor], state: torch.Tensor,
                   planes: Sequence[Optional[torch.Tensor]], eref: torch.Tensor, snapshot: bool, norms: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The C `lightning_probes.functional._fused.dynamics_after_one` over a group: ``state`` becomes the new
    state in place (``snapshot``); returns ``(P,)`` float64 squared update and weight norms (zeros unless
    ``norms``) over the followed entries."""
    lib = library()
    count = len(weights)
    updates = torch.zeros(count, dtype=torch.float64)
    squares = torch.zeros(count, dtype=torch.float64)
    p16, p8, c64 = planes
    wptr = _pointers(weights)  # kept alive through the call
    lib.lp_dynamics_after(
        ctypes.c_int64(count), _ptr(group.index_ptrs), ctypes.c_int(int(group.index64)), _ptr(group.n),
        _ptr(group.offsets), _tensor_ptr(state),
        ctypes.c_int(int(snapshot)), ctypes.c_int(DTYPES[weights[0].dtype]), _ptr(wptr),
        _tensor_ptr(p16), _tensor_ptr(p8), _tensor_ptr(c64), _tensor_ptr(eref), ctypes.c_int(int(norms)),
        _tensor_ptr(updates),
        _tensor_ptr(squares))
    return updates, squares


def abs_summary(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(P, 3)`` float64 ``[sum |g|, ||g||_2, max |g|]`` per tensor in one pass each (CPU; `supports`)."""
    lib = library()
    out = torch.empty(len(tensors), 3, dtype=torch.float64)
    gptr, n = _pointers(tensors), np.array([t.numel() for t in tensors], dtype=np.int64)  # alive through the call
    lib.lp_abs_summary(ctypes.c_int64(len(tensors)), ctypes.c_int(DTYPES[tensors[0].dtype]), _ptr(gptr), _ptr(n),
                       _tensor_ptr(out))
    out[:, 1].sqrt_()
    return out


def sample_sums(grads: torch.Tensor, mean: torch.Tensor, edges: Optional[torch.Tensor],
                entries: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass over a tensor's ``(c, n)`` per-sample gradients (CPU, float32 or float64, contiguous; `supports`):
    ``sum_i g_i^2`` per entry, ``g_i . mean`` per sample and ``sum_i ||g_i||^2`` (float64; returned in that order,
    then the histogram and the outside counts), and with ``edges`` (``bins + 1`` float64)
    the 1-D histogram against those exact edges (float64 counts) and the ``(2,)`` counts below and above the range.
    ``entries``: a contiguous float64 ``(n,)`` tensor the per-entry sums are added to (and returned), in place.
    """
    lib = library()
    c, n = grads.shape
    accumulate = entries is not None
    if entries is None:
        entries = torch.empty(n, dtype=torch.float64)
    elif entries.dtype != torch.float64 or not entries.is_contiguous() or entries.numel() != n:
        raise ValueError(f"Expected `entries` to be a contiguous float64 tensor of {n} entries, but got "
                         f"{entries.dtype} {tuple(entries.shape)}")
    proj = torch.empty(c, dtype=torch.float64)
    squares = torch.empty((), dtype=torch.float64)
    bins = 0 if edges is None else int(edges.numel()) - 1
    edges64 = None if edges is None else edges.to(torch.float64).contiguous()
    counts = torch.zeros(max(1, 4 * bins), dtype=torch.int64)
    outside = torch.zeros(2, dtype=torch.int64)
    lib.lp_sample_sums(ctypes.c_int(DTYPES[grads.dtype]), _tensor_ptr(grads), ctypes.c_int64(c), ctypes.c_int64(n),
                       _tensor_ptr(mean), _tensor_ptr(entries), ctypes.c_int(int(accumulate)), _tensor_ptr(proj),
                       _tensor_ptr(squares), ctypes.c_int64(bins),
                       _tensor_ptr(edges64), _tensor_ptr(counts), _tensor_ptr(outside))
    if edges is None:
        return entries, proj, squares, None, None
    return entries, proj, squares, counts.view(4, bins).sum(0).double(), outside.double()
