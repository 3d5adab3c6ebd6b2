"""Curvature of the loss on a batch: Hessian-vector products, Lanczos, Hutchinson, and Cockpit's alpha.

Everything works on *flat* vectors (the parameters concatenated in ``named_parameters`` order) so that the
algorithms are a few lines of linear algebra and a distributed caller can all-reduce one tensor per product.

- `hvp_operator`: ``v -> H v`` for the Hessian ``H`` of the mean batch loss, by double backward: one forward and
  backward with ``create_graph=True`` builds the gradient's graph once; every product is then one more backward
  through it (``retain_graph``), so ``k`` products cost one forward/backward plus ``k`` backward passes.
- `lanczos`: the extreme eigenvalues of ``H`` from ``k`` products (Lanczos with full re-orthogonalisation: the
  Ritz values of the ``k x k`` tridiagonal matrix). The largest Ritz value converges to ``lambda_max`` much faster
  than power iteration when the top of the spectrum is crowded; with ``k`` equal to the number of parameters it
  is exact.
- `hutchinson_trace`: ``tr H ~ mean_j v_j^T H v_j`` over Rademacher vectors ``v_j``, with its standard error
  ``std_j(v_j^T H v_j) / sqrt(m)``.
- `quadratic_fit` and `local_step_alpha`: Cockpit's alpha (Schneider et al., 2021), the position of a step on the
  one-dimensional quadratic fitted to the loss and the directional derivative at both ends of the step;
  `directional_samples` gives the per-sample losses and derivatives along the step, `alpha_sums` the sums a
  distributed caller all-reduces and `step_alpha` alpha from them.

No function here synchronises with the host: the results stay tensors on the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["alpha_sums", "directional_samples", "flatten", "hutchinson_trace", "hvp_operator", "lanczos",
           "local_step_alpha", "quadratic_fit", "step_alpha", "unflatten"]

log = logging.getLogger(__name__)

#: ``v -> H v`` on flat vectors.
Operator = Callable[[torch.Tensor], torch.Tensor]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector cut back into tensors of the shapes of ``like``."""
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def hvp_operator(module: nn.Module, batch: Any, loss_fn: Callable[[Callable[..., Any], Any], torch.Tensor],
                 params: Optional[Mapping[str, torch.Tensor]] = None,
                 buffers: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[Operator, torch.Tensor, list[str]]:
    """The Hessian-vector product of ``loss_fn`` on ``batch`` with respect to ``params``.

    Args:
        module: The model; put it in the mode you want (the probes use eval mode, see
            `lightning_probes.functional.per_sample.eval_mode`). Its parameters and ``.grad`` are not touched.
        batch: The batch ``loss_fn`` takes.
        loss_fn: ``loss_fn(module_call, batch) -> scalar`` (the mean loss of the batch).
        params: The point, by parameter name (default: the module's trainable parameters, detached).
        buffers: Buffers to use (default the module's own).

    Returns:
        ``(hvp, loss, names)``: ``hvp(v)`` for a flat ``v`` of the parameters' total size and dtype, the loss at
        the point (detached), and the parameter names in the flat order.
    """
    if params is None:
        params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    names = list(params)
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    buffers = dict(module.named_buffers()) if buffers is None else dict(buffers)

    def call(*args: Any, **kwargs: Any) -> Any:
        return functional_call(module, (leaves, buffers), args, kwargs)

    with torch.enable_grad():
        loss = loss_fn(call, batch)
        inputs = [leaves[n] for n in names]
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    pairs = [(g, x) for g, x in zip(grads, inputs)]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        parts = unflatten(v, inputs)
        used = [(g, p) for (g, _), p in zip(pairs, parts) if g is not None and g.requires_grad]
        if not used:
            return torch.zeros_like(v)
        with torch.enable_grad():
            out = torch.autograd.grad([g for g, _ in used], inputs, grad_outputs=[p for _, p in used],
                                      retain_graph=True, allow_unused=True)
        return flatten([torch.zeros_like(x) if o is None else o for o, x in zip(out, inputs)]).detach()

    return hvp, loss.detach(), names


def lanczos(hvp: Operator, size: int, iters: int, generator: torch.Generator, device: torch.device,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Extreme eigenvalues of a symmetric operator by ``iters`` steps of Lanczos, fully re-orthogonalised.

    Args:
        hvp: The operator on flat vectors of ``size`` entries.
        size: The vectors' length (the number of parameters).
        iters: Lanczos steps (operator applications); at most ``size`` are taken.
        generator: Seeds the start vector (a CPU generator: every rank draws the same vector).
        device: Where the vectors live.
        dtype: Their dtype (the parameters').

    Returns:
        ``(ritz, residual)``: the Ritz values in ascending order (``ritz[-1]`` estimates ``lambda_max``,
        ``ritz[0]`` ``lambda_min``) and the residual bound ``|beta_k * s_k|`` of the largest (the error of a Ritz
        value is at most its residual), as float64 tensors on ``device``.

    Example:
        >>> h = torch.diag(torch.tensor([3.0, 1.0, -2.0]))
        >>> ritz, _ = lanczos(lambda v: h @ v, 3, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
        >>> round(float(ritz[-1]), 4), round(float(ritz[0]), 4)
        (3.0, -2.0)
    """
    k = max(1, min(int(iters), int(size)))
    q = torch.randn(size, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    q = q / q.norm()
    basis = torch.zeros(k, size, device=device, dtype=dtype)  # (k, P): the Lanczos vectors
    alphas = torch.zeros(k, device=device, dtype=torch.float64)
    betas = torch.zeros(k, device=device, dtype=torch.float64)
    tiny = torch.finfo(dtype).tiny
    for j in range(k):
        basis[j] = q
        w = hvp(q)
        alphas[j] = torch.dot(w, q).double()
        active = basis[:j + 1]
        for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
            w = w - active.T @ (active @ w)
        beta = w.norm()
        betas[j] = beta.double()
        q = w / beta.clamp_min(tiny)
    tri = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
    ritz, vectors = torch.linalg.eigh(tri)
    residual = (betas[-1] * vectors[-1, -1]).abs()
    return ritz, residual


def hutchinson_trace(hvp: Operator, size: int, samples: int, generator: torch.Generator, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hutchinson's estimate of the trace with Rademacher vectors.

    Returns:
        ``(trace, stderr, quadratic_forms)``: the mean of ``v_j^T H v_j``, its standard error
        ``std(ddof=1) / sqrt(samples)`` (NaN for one sample), and the ``(samples,)`` forms, float64 on ``device``.

    Example:
        >>> h = torch.diag(torch.tensor([3.0, 1.0, -2.0]))
        >>> trace, se, _ = hutchinson_trace(lambda v: h @ v, 3, 4, torch.Generator().manual_seed(0),
        ...                                 torch.device("cpu"))
        >>> float(trace), float(se)  # a diagonal matrix: every Rademacher form is the trace
        (2.0, 0.0)
    """
    forms = torch.zeros(samples, device=device, dtype=torch.float64)
    for j in range(samples):
        v = (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(device=device, dtype=dtype)
        forms[j] = torch.dot(v, hvp(v)).double()
    trace = forms.mean()
    stderr = forms.std() / math.sqrt(samples) if samples > 1 else forms.new_tensor(math.nan)
    return trace, stderr, forms


def quadratic_fit(t: torch.Tensor, fs: torch.Tensor, dfs: torch.Tensor, var_fs: torch.Tensor,
                  var_dfs: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Cockpit's maximum-likelihood quadratic ``w0 + w1 s + w2 s^2`` through two noisy observations.

    The loss ``fs = (f(0), f(t))`` and the directional derivatives ``dfs = (f'(0), f'(t))`` along the step, each
    with its variance (a variance of 0 replaced by ``eps``, as Cockpit does), give four observations of the three
    coefficients; weighted least squares with weights ``1 / variance``. Returns ``(w0, w1, w2)`` (float64).
    """
    t = t.double()
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    phi = torch.stack([torch.stack([one, zero, zero]), torch.stack([one, t, t * t]),
                       torch.stack([zero, one, zero]), torch.stack([zero, one, 2 * t])])  # (4, 3)
    var = torch.cat([var_fs.double(), var_dfs.double()])
    var = torch.where(var == 0, torch.full_like(var, eps), var)
    weights = 1.0 / var  # (4,)
    y = torch.cat([fs.double(), dfs.double()])
    normal = phi.T @ (weights[:, None] * phi)  # (3, 3)
    # solve_ex: no error check, so no host synchronisation (t = 0 makes `normal` singular: see `step_alpha`)
    return torch.linalg.solve_ex(normal, (phi.T @ (weights * y))[:, None], check_errors=False)[0][:, 0]


def local_step_alpha(mu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cockpit's alpha from the fit ``mu`` and the step length ``t``: ``2 t / (-w1 / w2) - 1``.

    ``0``: the step landed at the minimum of the fitted quadratic; ``1``: on its other side, at the height it
    started from; above 1: overshooting; ``-1``: as Cockpit logs it, any concave fit (``w2 < 0``). A step of
    length 0 has no fit (`step_alpha` gives NaN for it).

    Example:
        >>> mu = torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64)  # 1 - 2 s + s^2: the minimum at s = 1
        >>> float(local_step_alpha(mu, torch.tensor(1.0))), float(local_step_alpha(mu, torch.tensor(2.0)))
        (0.0, 1.0)
    """
    alpha_bar = -mu[1] / mu[2]
    alpha = 2 * t.double() / alpha_bar - 1
    return torch.where(mu[2] < 0, torch.full_like(alpha, -1.0), alpha)


def directional_samples(module: nn.Module, batch: Any, params: Mapping[str, torch.Tensor],
                        direction: Sequence[torch.Tensor],
                        loss_fn: Callable[[Callable[..., Any], Any], torch.Tensor],
                        chunk_size: Optional[int] = None,
                        buffers: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses ``l_i`` and per-sample derivatives ``dot(g_i, u)`` along ``direction`` ``u`` at ``params``.

    The losses are ``loss_fn`` on each sample alone (``vmap`` over batches of one sample, as in
    `lightning_probes.functional.per_sample`); the derivatives are the Jacobian-vector product ``J u`` of the
    ``(n,)`` losses, taken in reverse mode by the double-vjp trick (``J^T w`` with a dummy ``w`` and
    ``create_graph=True``, then the derivative of ``(J^T w) . u`` with respect to ``w``): one forward and two
    backward passes, no per-sample gradient held, and it works wherever Hessian-vector products do.

    Args:
        module: The model (put it in the mode you want); nothing of it is changed.
        batch: The batch (every tensor with the samples in dimension 0).
        params: The point, by parameter name; other parameters keep their values.
        direction: One tensor per entry of ``params``, in its order.
        loss_fn: ``loss_fn(module_call, batch) -> scalar`` (called on batches of one sample).
        chunk_size: Samples per chunk (default all at once).
        buffers: Buffers to use (default the module's own).

    Returns:
        Two ``(n,)`` tensors: the losses and the derivatives (detached).
    """
    from torch.func import vmap
    from torch.utils._pytree import tree_map

    from lightning_probes.functional.per_sample import sample_count, slice_samples

    names = list(params)
    buffers = dict(module.named_buffers()) if buffers is None else dict(buffers)

    def sample_loss(leaves: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(module, (leaves, buffers), args, kwargs)

        return loss_fn(call, one)

    n = sample_count(batch)
    size = max(1, n if chunk_size is None else int(chunk_size))
    losses, derivs = [], []
    for start in range(0, n, size):
        chunk = slice_samples(batch, start, min(n, start + size))
        with torch.enable_grad():
            leaves = {k: params[k].detach().requires_grad_(True) for k in names}
            try:
                values = vmap(sample_loss, in_dims=(None, 0), randomness="different")(leaves, chunk)  # (c,)
            except (RuntimeError, NotImplementedError) as err:  # no batching rule (e.g. aten::lstm): one by one
                log.debug("directional_samples: vmap failed (%s); the losses are taken one sample at a time", err)
                values = torch.stack([_one(sample_loss, leaves, chunk, i) for i in range(sample_count(chunk))])
            dummy = torch.zeros_like(values, requires_grad=True)
            inputs = [leaves[k] for k in names]
            grads = torch.autograd.grad(values, inputs, grad_outputs=dummy, create_graph=True, allow_unused=True)
            used = [(g, d) for g, d in zip(grads, direction) if g is not None]
            if used:
                dot = sum((g * d).sum() for g, d in used)
                (jvp,) = torch.autograd.grad(dot, dummy, allow_unused=True)
            else:
                jvp = None
        losses.append(values.detach())
        derivs.append(torch.zeros_like(values).detach() if jvp is None else jvp.detach())
    return torch.cat(losses), torch.cat(derivs)


def _one(sample_loss: Callable[..., torch.Tensor], leaves: dict[str, torch.Tensor], chunk: Any,
         i: int) -> torch.Tensor:
    """``sample_loss`` of sample ``i`` of ``chunk`` (which adds the batch dimension back itself)."""
    from torch.utils._pytree import tree_map

    return sample_loss(leaves, tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, chunk)).reshape(())


def alpha_sums(losses_start: torch.Tensor, derivs_start: torch.Tensor, losses_end: torch.Tensor,
               derivs_end: torch.Tensor) -> torch.Tensor:
    """The sums alpha needs from the per-sample values at both ends of a step (float64, shape ``(9,)``).

    ``[n, sum l0, sum l0^2, sum d0, sum d0^2, sum l1, sum l1^2, sum d1, sum d1^2]`` with ``l`` the per-sample
    losses and ``d`` the per-sample derivatives along the (unnormalised) step at the start (0) and the end (1):
    sums over samples, so a distributed caller all-reduces this one tensor to get those of the union batch.
    """
    parts = [losses_start.double(), derivs_start.double(), losses_end.double(), derivs_end.double()]
    n = parts[0].new_tensor([float(parts[0].numel())])
    return torch.cat([n] + [torch.stack([x.sum(), (x * x).sum()]) for x in parts])


def step_alpha(step_length: torch.Tensor, sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cockpit's alpha of one step from `alpha_sums` (exactly `cockpit.quantities.Alpha`'s fit).

    With ``t = ||theta_1 - theta_0||`` (``step_length``) and the step direction ``u = (theta_1 - theta_0) / t``:
    the observations are the mean losses ``f(0), f(t)``, the variances of the per-sample losses (``ddof=1``),
    the mean directional derivatives ``f'(0), f'(t)`` along ``u`` and the variances of the per-sample ones
    (``ddof=1``), as Cockpit takes them; `quadratic_fit` and `local_step_alpha` do the rest.

    Returns:
        ``{"alpha", "loss_start", "loss_end", "slope_start", "slope_end"}`` (float64 scalars on the device;
        ``alpha`` and the slopes NaN for a step of length 0, where there is nothing to fit; variances of one
        sample are 0, which the fit replaces by Cockpit's ``1e-10``).
    """
    t = step_length.double()
    n = sums[0]
    means = sums[1::2] / n  # (4,): l0, d0, l1, d1
    spread = (sums[2::2] - n * means * means).clamp_min(0.0)
    var = torch.where(n > 1, spread / (n - 1).clamp_min(1.0), torch.zeros_like(spread))
    safe_t = torch.where(t > 0, t, torch.ones_like(t))
    fs = torch.stack([means[0], means[2]])
    dfs = torch.stack([means[1], means[3]]) / safe_t
    var_fs = torch.stack([var[0], var[2]])
    var_dfs = torch.stack([var[1], var[3]]) / (safe_t * safe_t)
    alpha = local_step_alpha(quadratic_fit(safe_t, fs, dfs, var_fs, var_dfs), safe_t)
    nan = torch.full_like(alpha, math.nan)
    moved = t > 0
    return {"alpha": torch.where(moved, alpha, nan), "loss_start": fs[0], "loss_end": fs[1],
            "slope_start": torch.where(moved, dfs[0], nan), "slope_end": torch.where(moved, dfs[1], nan)}
