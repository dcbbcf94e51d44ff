"""Training-free mixture criteria: pure math on Hessians and gradient sketches (no model here).

A calibration mixture holds a share ``w_k`` of sequences from each source k (general text,
one or more task sources); the weights lie on the simplex.

**Hessian trace** (METHOD.md, stage 1, second-order view).  For one linear input with
Hessians ``H_k = X_k^T X_k / n_k`` of the sources and ``H_test`` of held-out target rows,
the mixture's Hessian is ``H_w = sum_k w_k H_k`` and the expected quantization loss on
the target is proportional to ``f(w) = tr(H_test (H_w + lambda_w I)^-1)``, damped as GPTQ
damps: ``lambda_w = damp * mean(diag(H_w))``.  Damping is linear in ``w``, so
``H_w + lambda_w I = sum_k w_k A_k`` with ``A_k = H_k + damp * mean(diag(H_k)) I``.

For two sources (``w = (alpha, 1 - alpha)``) the curve has a closed form for every alpha:
with ``A_gen = L L^T`` and ``L^-1 A_task L^-T = U diag(mu) U^T``,

    f(alpha) = sum_i c_i / (alpha + (1 - alpha) mu_i),   c = diag(U^T L^-1 H_test L^-T U) >= 0,

one factorisation per input, after which any alpha costs O(d).  Each term is the reciprocal of
a positive linear function times c_i >= 0, so f is convex on [0, 1], strictly wherever some
c_i > 0 has mu_i != 1.  Where the task Hessian is rank-deficient, mu_i is only the damping's
share for its null directions and the terms c_i / mu_i make f blow up as alpha -> 0 (and as
damp -> 0).  With more sources, f is evaluated directly (one Cholesky solve per grid point).

**Gradient alignment.**  The gradient of the mean loss on a mixture is ``g_w = sum_k w_k g_k``
(in expectation over the drawn sequences), so the cosine to the held-out gradient ``g_test``
follows from the Gram matrix of the source and test gradients, for every ``w`` at once.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tasa.errors import TasaError


def simplex_grid(n_sources: int, step: float) -> list[tuple[float, ...]]:
    """All weight vectors on the simplex whose entries are multiples of ``step`` (1/step an integer)."""
    m = round(1 / step)
    if m < 1 or abs(m * step - 1) > 1e-9:
        raise TasaError(f"grid step must divide 1 (e.g. 0.125, 0.25), got {step}")
    if n_sources < 1:
        raise TasaError("a mixture needs at least one source")
    out = []
    for combo in itertools.product(range(m + 1), repeat=n_sources - 1):
        if sum(combo) <= m:
            out.append(tuple(c / m for c in combo) + ((m - sum(combo)) / m,))
    return sorted(out, reverse=True)


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag(H)) I`` (GPTQ's dampening; a zero diagonal gets ``damp``)."""
    mean = float(torch.diagonal(h).mean())
    return h + (damp * (mean if mean > 0 else 1.0)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


@dataclass(frozen=True)
class PencilTrace:
    """The two-source curve ``f(alpha) = sum_i c_i / (alpha + (1 - alpha) mu_i)`` of one input."""

    c: torch.Tensor  # (d,) float64, >= 0
    mu: torch.Tensor  # (d,) float64, > 0

    def __call__(self, alpha) -> torch.Tensor:
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        return (self.c / (a + (1 - a) * self.mu)).sum(-1)


def pencil_trace(h_gen: torch.Tensor, h_task: torch.Tensor, h_test: torch.Tensor, damp: float) -> PencilTrace:
    """Factorise one input's Hessians once so that f(alpha) costs O(d) for every alpha."""
    a = damped(h_gen.double(), damp)
    b = damped(h_task.double(), damp)
    try:
        chol = torch.linalg.cholesky(a)
    except RuntimeError:
        raise TasaError("the general source's damped Hessian is not positive definite; raise the damping") from None
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    linv = torch.linalg.solve_triangular(chol, eye, upper=False)
    mu, u = torch.linalg.eigh(linv @ b @ linv.T)
    m = u.T @ linv
    c = torch.einsum("ij,jk,ik->i", m, h_test.double(), m).clamp_min(0.0)
    return PencilTrace(c=c, mu=mu.clamp_min(torch.finfo(torch.float64).tiny))


def trace_direct(hessians: list[torch.Tensor], h_test: torch.Tensor, weights, damp: float) -> float:
    """``tr(H_test (sum_k w_k H_k + damp * mean(diag) I)^-1)`` by a direct solve (any number of sources)."""
    h = sum(float(w) * hk.double() for w, hk in zip(weights, hessians))
    a = damped(h, damp)
    try:
        chol = torch.linalg.cholesky(a)
    except RuntimeError:
        return float("inf")
    return float(torch.trace(torch.cholesky_solve(h_test.double(), chol)))


def mixture_cosine(gram: torch.Tensor, weights) -> float:
    """Cosine between ``sum_k w_k g_k`` and ``g_test`` from the Gram matrix of ``(g_1, .., g_K, g_test)``."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    k = w.numel()
    if gram.shape != (k + 1, k + 1):
        raise TasaError(f"Gram matrix of shape {tuple(gram.shape)} does not match {k} sources plus the target")
    g = gram.double()
    num = float(w @ g[:k, k])
    den = float(w @ g[:k, :k] @ w) ** 0.5 * float(g[k, k]) ** 0.5
    return num / den if den > 0 else 0.0


def is_convex(values: list[float], rtol: float = 1e-9) -> bool:
    """Non-negative second differences on an equally spaced grid (up to rounding)."""
    scale = max(abs(v) for v in values) or 1.0
    return all(values[i - 1] - 2 * values[i] + values[i + 1] >= -rtol * scale for i in range(1, len(values) - 1))
