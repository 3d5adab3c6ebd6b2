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
  one-dimensional quadratic fitted to the loss and the directional derivative at both ends of the step.

No function here synchronises with the host: the results stay tensors on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["directional_samples", "flatten", "hutchinson_trace", "hvp_operator", "lanczos", "local_step_alpha",
           "quadratic_fit", "unflatten"]

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
    return torch.linalg.solve(normal, phi.T @ (weights * y))


def local_step_alpha(mu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cockpit's alpha from the fit ``mu`` and the step length ``t``: ``2 t / (-w1 / w2) - 1``.

    ``0``: the step landed at the minimum of the fitted quadratic; ``1``: on its other side, at the height it
    started from; above 1: overshooting; ``-1``: no move, and (as Cockpit logs it) any concave fit (``w2 < 0``).
    """
    alpha_bar = -mu[1] / mu[2]
    alpha = 2 * t.double() / alpha_bar - 1
    return torch.where(mu[2] < 0, torch.full_like(alpha, -1.0), alpha)


def directional_samples(module: nn.Module, batch: Any, params: Mapping[str, torch.Tensor],
                        direction: Sequence[torch.Tensor],
                        loss_fn: Callable[[Callable[..., Any], Any], torch.Tensor],
                        chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses and per-sample derivatives along ``direction`` (tensors in ``params``' order).

    The derivative of sample ``i`` is ``g_i . direction`` with ``g_i`` its gradient
    (`lightning_probes.functional.per_sample.per_sample_gradients`, chunked). Returns two ``(n,)`` tensors.
    """
    from lightning_probes.functional.per_sample import per_sample_gradients

    losses, derivs = [], []
    names = list(params)
    for grads, loss in per_sample_gradients(module, batch, params, loss_fn, chunk_size):
        dot = sum((grads[n].flatten(1) * d.reshape(1, -1)).sum(1) for n, d in zip(names, direction))
        losses.append(loss.detach())
        derivs.append(dot.detach())
    return torch.cat(losses), torch.cat(derivs)
