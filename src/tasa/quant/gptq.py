"""GPTQ (Frantar et al., 2022) as pure functions over tensors.

Hessian of the layer-wise objective ||W X - Q X||^2 for inputs X (n tokens, d_in)::

    H = (2 / n) * X^T X                                   # (d_in, d_in)

:func:`accumulate_hessian` keeps this running mean over batches.  Given H,
:func:`gptq_quantize` quantizes W (d_out, d_in) column by column; after each
column it spreads the rounding error over the not-yet-quantized columns through
the upper Cholesky factor U of H^-1 (U^T U = H^-1)::

    for column j:   q_j = Q(w_j);   e_j = (w_j - q_j) / U_jj
                    w_{j+1:} -= e_j U_{j, j+1:}

Updates are applied lazily in blocks of ``block_size`` columns.  With act_order
the columns are visited by decreasing diag(H).  Group grids (scale, zero) are
computed from the *updated* weights when the group's first column is reached,
or up front from the original weights with ``static_groups``.

:func:`gptq_quantize_many` runs this loop for a batch of linears at once (a layer's routed experts, each on its own
H: one set of tensor operations per column for the whole batch) and factorises a Hessian once for the linears that
share it (q/k/v, gate/up); each result is the one :func:`gptq_quantize` gives alone, bit for bit.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import torch

from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.numerics import all_finite, native_bfloat16
from tasa.quant.rtn import (check_finite, check_super_width, compute_super_grid, compute_super_grid_asym,
                            dequantize, dequantize_min, group_bounds, quantize_codes, quantize_codes_min,
                            rtn_quantize_spec, search_grid)
from tasa.quantized import QuantResult

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


def make_empty_hessian(d_in: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(d_in, d_in, dtype=torch.float32, device=device)


def _bfloat16_products(x: torch.Tensor) -> bool:
    """Whether a batch's products (:func:`accumulate_hessian`, :func:`accumulate_shift`) are taken in bfloat16:
    for bfloat16 inputs on a CPU that computes it natively (:func:`tasa.numerics.native_bfloat16`).  The
    products of bfloat16 values are exact and the matrix product sums them in float32, rounding each entry of the
    batch's sum once, to 8 bits (by at most 2^-9 of itself): 3.5x faster on a CPU with AVX512-BF16 than the float32
    product, and a Hessian summed in float32 over such batches is within about 2e-3 of the float32 one (relative
    Frobenius norm; the diagonal's roundings, alike batch after batch, do not average out), inside GPTQ's damping
    of 1% of the mean diagonal (tests/unit/test_gptq.py).  Elsewhere they are float32."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and native_bfloat16("cpu")


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b of two (tokens, d) batches of one dtype (:func:`_bfloat16_products`)."""
    return a.t() @ b if _bfloat16_products(a) else a.float().t() @ b.float()


def accumulate_hessian(hessian: torch.Tensor, n_seen: int, inputs: torch.Tensor) -> int:
    """Fold a batch of inputs (..., d_in) into the running H = 2/n X^T X, in place (:func:`_gram`).

    Returns the new token count.
    """
    x = inputs.reshape(-1, inputs.shape[-1])  # (tokens, d_in)
    total = n_seen + x.shape[0]
    _fold_gram(hessian, n_seen / total, 2.0 / total, x, x)
    return total


GRAM_BAND_BYTES = 256 * 2**20  # a batch's a^T b folded in bands of columns when it would take more at once


def _fold_gram(acc: torch.Tensor, keep: float, alpha: float, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc = keep * acc + alpha * a^T b (:func:`_gram`), in place.  A product larger than :data:`GRAM_BAND_BYTES`
    (a 14336-wide input's: 0.8 GB, beside H and C of the same size) is taken in bands of 1024 columns, each band
    folded in before the next is computed: each entry the same sum over the same tokens, so the same H and C up to
    the matrix product's own rounding (bit for bit with this machine's BLAS at 2500, 3000 and 14336 columns, in
    float32 and bfloat16; tests/unit/test_gptq.py allows a rounding)."""
    cols = acc.shape[1]
    if 4 * acc.shape[0] * cols <= GRAM_BAND_BYTES:
        acc.mul_(keep).add_(_gram(a, b), alpha=alpha)
        return
    for c0 in range(0, cols, 1024):
        acc[:, c0:c0 + 1024].mul_(keep).add_(_gram(a, b[:, c0:c0 + 1024]), alpha=alpha)


def accumulate_shift(shift: torch.Tensor, n_seen: int, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Fold a batch into the running C = 2/n (X_f - X)^T X, in place, where X (..., d_in) are the inputs the
    quantized model feeds a linear and X_f the float model's inputs to it on the same tokens (the asymmetric
    calibration of GPTAQ / GPTQ v2).  ``n_seen`` counts the tokens before this batch, as for
    :func:`accumulate_hessian` (call both with the same count).  Returns the new token count."""
    x = inputs.reshape(-1, inputs.shape[-1])
    if not _bfloat16_products(x):
        x = x.float()
    dx = targets.reshape(-1, targets.shape[-1]).to(x.dtype) - x  # (in bfloat16: rounded to 8 bits of itself)
    total = n_seen + x.shape[0]
    _fold_gram(shift, n_seen / total, 2.0 / total, dx, x)
    return total


def _damp(h: torch.Tensor, damp: float) -> None:
    """GPTQ's damping of a Hessian (d_in, d_in), in place: ``damp`` times the mean of its diagonal added to it."""
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))


def float_output_weights(weight: torch.Tensor, hessian: torch.Tensor, shift: torch.Tensor, alpha: float = 1.0,
                         damp: float = 0.01) -> torch.Tensor:
    """The weights GPTQ should approximate when the layer's quantized model feeds it inputs X but it must reproduce
    the float model's outputs W X_f: W + alpha W C H^-1 (H, C: :func:`accumulate_hessian`, :func:`accumulate_shift`;
    H damped as GPTQ damps it).  At ``alpha`` 1 it is the least-squares solution of min_V ||X V^T - X_f W^T||, so
    ||X Q^T - X_f W^T||^2 = ||X (Q - V)^T||^2 + const: GPTQ of V on H minimises the error to the float outputs
    (GPTAQ's objective, in closed form); smaller ``alpha`` shrinks the correction (fewer calibration tokens than
    inputs: it is estimated with noise).  Inputs that are always zero keep their weights.  For several linears fed
    the same input: :func:`float_output_targets`."""
    return float_output_targets([weight], hessian, [weight.float() @ shift.float()], alpha, damp)[0]


def float_output_targets(weights: list[torch.Tensor], hessian: torch.Tensor, products: list[torch.Tensor],
                         alpha: float = 1.0, damp: float = 0.01) -> list[torch.Tensor]:
    """:func:`float_output_weights` of linears fed the same input (their ``weights``), given their products W C
    instead of C, so that the caller can release C, a (d_in, d_in) matrix, before the solve.

    The damped copy of H is factorised once, in its own storage (seen through its transpose, LAPACK's column-major
    layout, as for :func:`_inverse_cholesky`): ``torch.linalg.solve`` took a second (d_in, d_in) matrix for its
    factors, 0.8 GB for a 14336-wide input.  The same steps as ``torch.linalg.solve``'s, so the same bits."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    _damp(h, damp)
    factors = h.mT
    pivots = torch.empty(h.shape[0], dtype=torch.int32, device=h.device)
    torch.linalg.lu_factor(factors, out=(factors, pivots))
    out = []
    for weight, product in zip(weights, products):
        correction = torch.linalg.lu_solve(factors, pivots, product.t()).t()  # (W C) H^-1, H symmetric
        correction[:, dead] = 0.0
        out.append(correction.mul_(alpha).add_(weight.float()))  # W + alpha * correction, in the correction's memory
        del correction
    return out


def merge_hessians(parts: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    """The H = 2/n X^T X of all tokens from those of shards of them ((H_i, n_i) each, as
    :func:`accumulate_hessian` leaves them): sum n_i H_i / sum n_i, and the token count (data-parallel
    calibration reduces the shards' Hessians this way; shards no token reached, n_i = 0, add nothing)."""
    total = sum(n for _, n in parts)
    merged = torch.zeros_like(parts[0][0], dtype=torch.float32)
    if total:
        for h, n in parts:
            if n:
                merged.add_(h.float(), alpha=n / total)
    return merged, total


GPTQ_BATCH_BYTES = 64 * 2**20  # linears quantized together (:func:`gptq_quantize_many`): their float32 weights, and
# the factors of their Hessians, at most this many bytes a batch (one linear at least)


def _inverse_cholesky(prepared: Callable[[int | None], torch.Tensor], damp: float, names: list[str]) -> torch.Tensor:
    """Upper Cholesky factors of (H_b + damp*mean(diag H_b)*I)^-1 for a batch of Hessians: ``prepared(None)`` gives
    them as one (B, d_in, d_in) tensor (each symmetric), ``prepared(b)`` member b alone; a member that is not
    positive definite is retried alone with more damping (``names[b]`` in the warning and the error).

    Every step overwrites the batch's own storage, seen through its transpose: for a symmetric matrix that is the
    same matrix, laid out column by column as LAPACK wants its operands, so torch takes no transient copy of it
    either (given a row-major output it computes into a column-major temporary and copies back: one more
    (d_in, d_in) matrix at the peak, 0.8 GB for a 14336-wide input).  So one matrix a member is held here: what
    keeps a streamed 8B-shaped layer's GPTQ within its memory budget (benchmarks/large_model.py).  The factors are
    returned as that column-major view (the same values as a row-major computation gives, bit for bit)."""
    h = prepared(None)
    for b in range(h.shape[0]):  # each member's own mean (bit for bit the single-matrix arithmetic)
        _damp(h[b], damp)
    ht = h.mT  # column-major: LAPACK's layout
    info = torch.empty(h.shape[0], dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(ht, out=(ht, info))  # ht: the lower factors
    for b in torch.nonzero(info).flatten().tolist():
        tried = damp
        for attempt in range(1, MAX_DAMP_RETRIES + 1):
            new_damp = min(tried * 10, 0.99) if tried < 0.99 else tried
            if new_damp == tried or attempt == MAX_DAMP_RETRIES:
                raise TasaError(f"{names[b]}: Hessian is not positive definite even with damp={tried:g}; check the "
                                "calibration data")
            log.warning("%s: Hessian not positive definite at damp=%g; retrying with damp=%g", names[b], tried,
                        new_damp)
            tried = new_damp
            if h.shape[0] == 1:  # a fresh batch of one (no second matrix beside it)
                del ht, h
                h = prepared(None)
            else:  # members of a batch are small (GPTQ_BATCH_BYTES): one fresh member beside it
                h[b] = prepared(b)
            _damp(h[b], tried)
            ht = h.mT
            one = torch.empty((), dtype=torch.int32, device=h.device)
            torch.linalg.cholesky_ex(ht[b], out=(ht[b], one))
            if int(one) == 0:
                break
    torch.cholesky_inverse(ht, out=ht)  # ht: the inverses
    return torch.linalg.cholesky(ht, upper=True, out=ht)  # ht: the inverses' upper factors


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str = "weight",
                  keep_rounded: bool = False) -> QuantResult:
    """Quantize ``weight`` (d_out, d_in) with GPTQ under ``spec``, given H (d_in, d_in).  ``keep_rounded``: the
    result also holds the values each code was rounded from (QuantResult.rounded).

    The input tensors are not modified.
    """
    return next(gptq_quantize_many([weight], [hessian], [spec], [name], keep_rounded))[1]


def gptq_quantize_many(weights: list[torch.Tensor], hessians: list[torch.Tensor], specs: list[QuantSpec],
                       names: list[str], keep_rounded: bool = False) -> Iterator[tuple[int, QuantResult, float]]:
    """:func:`gptq_quantize` of several linears, ``weights[i]`` on ``hessians[i]`` under ``specs[i]``, yielding
    ``(i, result, seconds)`` as each is done (not in the order given; ``seconds``: its share of the time spent).

    Linears given the same Hessian tensor (fed the same input: q/k/v, gate/up) and the same damping and column
    order share one factorisation of it.  Linears of the same shape and spec whose Hessians are as wide are
    quantized together, as a batch (a layer's routed experts: each with the Hessian of its own tokens), each column
    one set of tensor operations for the whole batch instead of one per linear; batches and the factors they need
    hold at most :data:`GPTQ_BATCH_BYTES` of each.  Each result is what :func:`gptq_quantize` gives for that linear
    alone (tests/unit/test_gptq.py checks it bit for bit).  A linear whose Hessian is zero (a routed expert no
    calibration token reached) is rounded to nearest on the same grid instead, and logged."""
    keys: dict[tuple, list[int]] = {}  # one factorisation: (the Hessian, damping, column order) -> linears
    reached: dict[int, bool] = {}  # each Hessian checked once, however many linears share it
    for i in range(len(weights)):  # (by index: no loop variable keeps a weight alive past its result)
        if _gptq_input(weights[i], hessians[i], specs[i], names[i], reached):
            keys.setdefault((id(hessians[i]), specs[i].damp, specs[i].act_order), []).append(i)
            continue
        # No calibration token reached the module (a routed expert no token was sent to): GPTQ has nothing to
        # weigh its rounding by, and would zero every weight (all inputs look dead).  RTN on the same grid.
        t = time.perf_counter()
        log.warning("%s: no calibration token reached it (zero Hessian); quantized with RTN instead", names[i])
        result = rtn_quantize_spec(weights[i], specs[i])
        result.rounded = weights[i].detach().float().clone() if keep_rounded else None
        yield i, result, time.perf_counter() - t
        del result
    kinds: dict[tuple, list[tuple]] = {}  # factorisations that can be batched: (width, damping, column order)
    for key, members in keys.items():
        kinds.setdefault((hessians[members[0]].shape[0], key[1], key[2]), []).append(key)
    for (d_in, damp, act_order), factored in kinds.items():
        per = max(1, GPTQ_BATCH_BYTES // (4 * d_in * d_in))
        for c0 in range(0, len(factored), per):
            chunk = [keys[key] for key in factored[c0:c0 + per]]
            yield from _gptq_chunk(weights, [hessians[m[0]] for m in chunk], specs, names, chunk, damp, act_order,
                                   keep_rounded)


def _gptq_input(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str,
                reached: dict[int, bool]) -> bool:
    """Check one linear's input to GPTQ (a clear error naming it); False when its Hessian is zero.  ``reached``:
    what earlier calls found of each Hessian (by id), so that a Hessian shared by several linears is read once."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise TasaError(f"{name}: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    check_finite(weight, name)
    if spec.super_group:
        check_super_width(weight.shape[1], spec.super_group, name)
    if id(hessian) not in reached:
        if not all_finite(hessian):
            raise TasaError(f"{name}: Hessian holds NaN/Inf (non-finite calibration activations)")
        reached[id(hessian)] = bool(torch.any(hessian))
    return reached[id(hessian)]


def _gptq_chunk(weights, hessians, specs, names, chunk: list[list[int]], damp: float, act_order: bool,
                keep_rounded: bool) -> Iterator[tuple[int, QuantResult, float]]:
    """GPTQ of the linears of ``chunk`` (member b: the indices of the linears quantized on ``hessians[b]``), the
    members' Hessians factorised together."""
    t = time.perf_counter()
    diag = torch.stack([torch.diag(h).float() for h in hessians])  # (B, d_in)
    dead = diag == 0  # inputs that are always zero: H's entry becomes 1, the weights' columns 0
    diag[dead] = 1.0
    perm = torch.argsort(diag, dim=1, descending=True) if act_order else None

    def member(b: int) -> torch.Tensor:
        """Member b's H with dead inputs fixed, in the processing order: a new tensor."""
        if perm is None:
            h = hessians[b].detach().float().clone()
            h[dead[b], dead[b]] = 1.0
        else:
            p = perm[b]
            h = hessians[b].detach().float()[p.unsqueeze(1), p]  # one gather: no row-permuted intermediate
            h[dead[b][p], dead[b][p]] = 1.0
        return h

    def prepared(b: int | None) -> torch.Tensor:
        if b is not None:
            return member(b)
        if len(hessians) == 1:
            return member(0).unsqueeze(0)
        out = torch.empty(len(hessians), *hessians[0].shape, dtype=torch.float32, device=hessians[0].device)
        for m in range(len(hessians)):
            out[m] = member(m)
        return out

    u = _inverse_cholesky(prepared, damp, [names[m[0]] for m in chunk])  # (B, d_in, d_in) upper
    factor_share = (time.perf_counter() - t) / sum(len(m) for m in chunk)
    # Batches: linears of one shape and spec, at one place in their members' lists (every gate projection, then
    # every up projection), on consecutive members, so that their factors are a slice of u (a view, not a copy).
    runs: dict[tuple, list[tuple[int, int]]] = {}
    for b, indices in enumerate(chunk):
        for place, i in enumerate(indices):
            runs.setdefault((tuple(weights[i].shape), specs[i], place), []).append((b, i))
    batches: list[tuple[QuantSpec, list[tuple[int, int]]]] = []
    for (shape, spec, _), entries in runs.items():
        per = max(1, GPTQ_BATCH_BYTES // (4 * shape[0] * shape[1]))
        run: list[list[tuple[int, int]]] = []
        for entry in entries:
            if not run or entry[0] != run[-1][-1][0] + 1 or len(run[-1]) == per:
                run.append([])
            run[-1].append(entry)
        batches += [(spec, batch) for batch in run]
    for k, (spec, batch) in enumerate(batches):
        t = time.perf_counter()
        b0, b1 = batch[0][0], batch[-1][0] + 1
        factors = [u[b0:b1]]
        if k == len(batches) - 1:  # its factors are released inside, before the results are built, as u here
            del u
        results = _gptq_batch([weights[i] for _, i in batch], factors, diag[b0:b1], dead[b0:b1],
                              None if perm is None else perm[b0:b1], spec, keep_rounded)
        share = (time.perf_counter() - t) / len(batch) + factor_share
        results.reverse()
        for _, i in batch:  # each result handed over, none kept here
            yield i, results.pop(), share


def _gptq_batch(weights: list[torch.Tensor], factors: list[torch.Tensor], diag: torch.Tensor, dead: torch.Tensor,
                perm: torch.Tensor | None, spec: QuantSpec, keep_rounded: bool) -> list[QuantResult]:
    """GPTQ of B linears of one shape under one ``spec``, member b's inverse-Hessian factor ``u[b]`` (B, d_in, d_in;
    handed over in the list ``factors``, emptied here, so that the caller's last reference can be dropped before the
    results are built: 0.8 GB of a 14336-wide input's), Hessian diagonal ``diag[b]`` (dead inputs' set to 1), dead
    inputs ``dead[b]``, column order ``perm[b]``."""
    u = factors.pop()
    count = len(weights)
    rows, cols = weights[0].shape
    bits, gs, sg = spec.bits, spec.group_size, spec.super_group
    if count == 1:
        w = weights[0].detach().float().clone().unsqueeze(0)  # (B, d_out, d_in)
    else:
        w = torch.stack([weight.detach().float() for weight in weights])
    w.masked_fill_(dead.unsqueeze(1), 0.0)

    def flat(x: torch.Tensor) -> torch.Tensor:
        """(B, d_out, k) -> (B * d_out, k): the rtn functions' rows."""
        return x.reshape(count * rows, x.shape[-1])

    def row_weights(d: torch.Tensor) -> torch.Tensor:
        """The grid search's column weights (B, k) for :func:`flat`'s rows."""
        return d[0] if count == 1 else d.unsqueeze(1).expand(count, rows, d.shape[1]).reshape(count * rows, -1)

    bounds = group_bounds(cols, gs)
    n_groups = len(bounds)
    gsize = bounds[0][1] - bounds[0][0]  # effective group size (cols if one group)
    scales = torch.empty(count, rows, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    supers = torch.empty(count, rows, cols // sg, dtype=torch.float32, device=w.device) if sg else None
    per_super = sg // gsize if sg else 0
    with_mins = bool(sg) and not spec.sym  # llama.cpp's asymmetric K types: scale * code - min
    mins = torch.zeros_like(scales) if with_mins else None
    super_mins = torch.empty_like(supers) if with_mins else None

    steps = spec.scale_search  # each group's range searched, its error weighted by the Hessian's diagonal

    def super_grid(x: torch.Tensor, first_group: int, weights: torch.Tensor) -> None:
        """Fill the grids of the super-group whose first group is ``first_group`` from its weights ``x``."""
        span = slice(first_group, first_group + per_super)
        if with_mins:
            s, mn, d, dmin = compute_super_grid_asym(flat(x), bits, gsize, spec.scale_bits, steps, row_weights(weights))
            scales[:, :, span], mins[:, :, span] = s.view(count, rows, -1), mn.view(count, rows, -1)
            zeros[:, :, span] = 0.0
            super_mins[:, :, first_group // per_super] = dmin.view(count, rows)
        else:
            s, z, d = compute_super_grid(flat(x), bits, gsize, spec.scale_bits, steps, row_weights(weights))
            scales[:, :, span], zeros[:, :, span] = s.view(count, rows, -1), z.view(count, rows, -1)
        supers[:, :, first_group // per_super] = d.view(count, rows)

    if spec.static_groups or n_groups == 1:
        # One grid per row (per channel) comes from the whole row, as in the reference GPTQ.
        if sg:
            for s in range(0, cols, sg):
                super_grid(w[:, :, s:s + sg], s // gsize, diag[:, s:s + sg])
        else:
            for gi, (s, e) in enumerate(bounds):
                scale, zero = search_grid(flat(w[:, :, s:e]), bits, spec.sym, steps, row_weights(diag[:, s:e]))
                scales[:, :, gi], zeros[:, :, gi] = scale.view(count, rows), zero.view(count, rows)
    precomputed = spec.static_groups or n_groups == 1

    if perm is not None:
        w = w.gather(2, perm.unsqueeze(1).expand(count, rows, cols))
    diag_order = diag if perm is None else diag.gather(1, perm)  # the search's weights, in the processing order
    # The group of each processed column, member by member: static groups follow original columns, dynamic groups
    # are formed from consecutive processed columns.
    positions = torch.arange(cols, device=w.device).expand(count, cols)
    if precomputed:
        group_of_pos = torch.div(positions if perm is None else perm, gsize, rounding_mode="floor")
    else:
        group_of_pos = torch.div(positions, gsize, rounding_mode="floor")
    group_cpu = group_of_pos.cpu()
    same_group = (group_cpu == group_cpu[0]).all(dim=0).tolist()  # a column every member takes from one group
    first_group = group_cpu[0].tolist()
    members = torch.arange(count, device=w.device)

    def grid_of(table: torch.Tensor, col: int) -> torch.Tensor:
        """(B, d_out): each member's grid entry for processed column ``col``."""
        if same_group[col]:
            return table[:, :, first_group[col]]
        return table[members, :, group_of_pos[:, col]]

    codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
    rounded = torch.empty_like(w) if keep_rounded else None

    # Blocks hold whole groups (super-groups) so that a dynamic grid sees fully updated weights.
    block = spec.block_size
    if gs != -1 and n_groups > 1:
        unit = sg or gsize
        block = max(1, block // unit) * unit
    cur_scale = cur_zero = cur_min = None
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w_blk = w[:, :, b0:b1].clone()  # (B, d_out, bs)
        err_blk = torch.zeros_like(w_blk)
        u_blk = u[:, b0:b1, b0:b1].contiguous()  # (u is column-major: its rows strided)
        for i in range(b1 - b0):
            col = b0 + i
            gi = first_group[col]
            if precomputed:
                cur_scale, cur_zero = grid_of(scales, col), grid_of(zeros, col)
                cur_min = grid_of(mins, col) if with_mins else None
            elif sg and col % gsize == 0:
                if col % sg == 0:  # the super-group's grids from its weights as updated so far
                    super_grid(w_blk[:, :, i:i + sg], gi, diag_order[:, col:col + sg])
                cur_scale, cur_zero = scales[:, :, gi], zeros[:, :, gi]
                cur_min = mins[:, :, gi] if with_mins else None
            elif col % gsize == 0:
                end = min(i + gsize, b1 - b0)
                scale, zero = search_grid(flat(w_blk[:, :, i:end]), bits, spec.sym, steps,
                                          row_weights(diag_order[:, col:col + end - i]))
                scales[:, :, gi], zeros[:, :, gi] = scale.view(count, rows), zero.view(count, rows)
                cur_scale, cur_zero = scales[:, :, gi], zeros[:, :, gi]
            wcol = w_blk[:, :, i]  # (B, d_out)
            x, s = wcol.reshape(-1, 1), cur_scale.reshape(-1)
            if with_mins:  # the group's offset, as its scale: a group's grid is filled when its super-group's is
                qcode = quantize_codes_min(x, s, cur_min.reshape(-1), bits)
                qcol = dequantize_min(qcode, s, cur_min.reshape(-1)).view(count, rows)
            else:
                qcode = quantize_codes(x, s, cur_zero.reshape(-1), bits)
                qcol = dequantize(qcode, s, cur_zero.reshape(-1)).view(count, rows)
            codes[:, :, col] = qcode.view(count, rows).to(torch.uint8)
            if rounded is not None:
                rounded[:, :, col] = wcol
            err = (wcol - qcol) / u_blk[:, i, i].unsqueeze(1)
            w_blk[:, :, i:] -= err.unsqueeze(2) * u_blk[:, i, i:].unsqueeze(1)
            err_blk[:, :, i] = err
        w[:, :, b1:] -= err_blk @ u[:, b0:b1, b1:]
    del u, w, w_blk, err_blk, u_blk  # before the dequantized results are built: fewer large tensors at the peak

    inv = torch.argsort(perm, dim=1) if perm is not None else None
    out = []
    for b, weight in enumerate(weights):
        def own(x: torch.Tensor | None) -> torch.Tensor | None:  # member b's, in original column order when permuted
            if x is None:
                return None
            return x[b] if count == 1 else x[b].clone()  # not a view into the batch's storage

        if inv is not None:
            member_codes = codes[b][:, inv[b]]
            member_rounded = None if rounded is None else rounded[b][:, inv[b]]
            g_idx = group_of_pos[b][inv[b]].to(torch.int32)
        else:
            member_codes, member_rounded = own(codes), own(rounded)
            g_idx = group_of_pos[b].to(torch.int32)
        result = QuantResult(weight=torch.empty(0), codes=member_codes, scales=own(scales), zeros=own(zeros),
                             g_idx=g_idx, bits=bits, group_size=gs, super_scales=own(supers), mins=own(mins),
                             super_mins=own(super_mins), rounded=member_rounded)
        result.weight = result.dequantize().to(weight.dtype)
        out.append(result)
    return out
