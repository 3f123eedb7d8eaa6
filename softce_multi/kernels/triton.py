"""Triton kernels for torch tensors on CUDA, behind the contract of ``_core.forward``.

One program handles one row of ``V`` entries and walks the vocabulary in chunks of
``block_size``:

* The **forward kernel** sweeps the row once with an online maximum, accumulating the statistics
  of :func:`softce_multi._core.row_statistics`. It writes the weighted loss of the row and what a
  backward pass needs of it (:class:`softce_multi._core.SavedRows`: the row maximum, the log of
  the sum of exponentials relative to it, and the target mass). With the gradient requested it
  sweeps the row a second time and writes ``row_scale * (sum(p) * softmax(z) - p)`` straight in
  the logits' dtype. The second sweep reads the row the first one just brought in, so it comes
  from L2 while the rows in flight fit there.
* The **backward kernel** recomputes the gradients from the saved row statistics in one sweep:
  to the logits, to the targets (``-row_scale * log_softmax(z)``), or both.

Both take the softmax as ``exp((z - row_max) - log_sum_exp)``, never through a rounded
log-normalizer, so it stays accurate for logits far from 0. A row whose weight (forward) or
scale (backward) is 0 is never read: its outputs are written as zeros, whatever NaN or inf it
holds. The weights, the denominator of the reduction and the final sum run as small torch
operations on the device, so nothing waits on the host. The computation is float32, or float64
when either input is float64; the inputs are never written.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl

from softce_multi import _core, kernels

__all__ = ["gradient_routine", "row_routine"]


@triton.jit
def _gradient_sweep(
    z_row,
    z_col_stride,
    p_row,
    p_col_stride,
    logits_out,
    targets_out,
    n_cols,
    row_max,
    log_sum_exp,
    target_sum,
    scale,
    LOGITS: tl.constexpr,
    TARGETS: tl.constexpr,
    LAST_FIRST: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Write one contiguous row of the logits and/or targets gradients; zeros if scale is 0.

    The row's log-normalizer is ``row_max + log_sum_exp``. Taking ``z - row_max`` first keeps
    the softmax accurate when the logits are far from 0 (where a rounded log-normalizer is not).
    ``LAST_FIRST`` walks the chunks from the end of the row, so that a sweep right after the
    statistics sweep starts with the chunks most recently brought into the cache.
    """
    if scale == 0:
        if LOGITS:
            _zero_row(logits_out, n_cols, BLOCK_SIZE)
        if TARGETS:
            _zero_row(targets_out, n_cols, BLOCK_SIZE)
    else:
        offsets = tl.arange(0, BLOCK_SIZE)
        softmax_scale = scale * target_sum
        n_chunks = tl.cdiv(n_cols, BLOCK_SIZE)
        for i in range(0, n_chunks):
            chunk = n_chunks - 1 - i if LAST_FIRST else i
            cols = chunk * BLOCK_SIZE + offsets
            inside = cols < n_cols
            # Past the row's end: -inf, whose exponential is 0 (nothing is stored there).
            z = tl.load(
                z_row + cols * z_col_stride,
                mask=inside,
                other=float("-inf"),
                eviction_policy="evict_first",
            ).to(COMPUTE)
            if LOGITS:
                p = tl.load(
                    p_row + cols * p_col_stride,
                    mask=inside,
                    other=0.0,
                    eviction_policy="evict_first",
                ).to(COMPUTE)
                # A row with no target mass has a zero softmax term, even with no softmax.
                softmax_term = softmax_scale * tl.exp((z - row_max) - log_sum_exp)
                grad = tl.where(softmax_scale == 0, 0.0, softmax_term) - scale * p
                tl.store(logits_out + cols, grad.to(logits_out.dtype.element_ty), mask=inside)
            if TARGETS:
                grad = scale * (log_sum_exp - (z - row_max))
                tl.store(targets_out + cols, grad.to(targets_out.dtype.element_ty), mask=inside)


@triton.jit
def _zero_row(out_row, n_cols, BLOCK_SIZE: tl.constexpr):
    """Write zeros over one contiguous row."""
    zeros = tl.zeros([BLOCK_SIZE], dtype=out_row.dtype.element_ty)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        tl.store(out_row + cols, zeros, mask=cols < n_cols)


@triton.jit
def _forward_kernel(
    z_ptr,
    z_row_stride,
    z_col_stride,
    p_ptr,
    p_row_stride,
    p_col_stride,
    weight_ptr,
    scale_ptr,
    loss_ptr,
    row_max_ptr,
    log_sum_exp_ptr,
    target_sum_ptr,
    grad_ptr,
    n_cols,
    WITH_GRAD: tl.constexpr,
    STATS_EVICTION: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    p_row = p_ptr + row * p_row_stride
    grad_row = grad_ptr + row * n_cols
    weight = tl.load(weight_ptr + row)
    zero = tl.zeros([], COMPUTE)
    if weight == 0:
        tl.store(loss_ptr + row, zero)
        tl.store(row_max_ptr + row, zero)
        tl.store(log_sum_exp_ptr + row, zero)
        tl.store(target_sum_ptr + row, zero)
        if WITH_GRAD:
            _zero_row(grad_row, n_cols, BLOCK_SIZE)
    else:
        # Running statistics relative to ``shift``: the running maximum where it is finite, else
        # 0 (the convention of _core.row_statistics for rows without a finite maximum).
        running_max = tl.full([], float("-inf"), COMPUTE)
        shift = zero
        sum_exp = zero
        target_sum = zero
        target_dot = zero
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            inside = cols < n_cols
            z = tl.load(
                z_row + cols * z_col_stride,
                mask=inside,
                other=float("-inf"),
                eviction_policy=STATS_EVICTION,
            ).to(COMPUTE)
            p = tl.load(
                p_row + cols * p_col_stride,
                mask=inside,
                other=0.0,
                eviction_policy=STATS_EVICTION,
            ).to(COMPUTE)
            running_max = tl.maximum(running_max, tl.max(z, axis=0))
            new_shift = tl.where(tl.abs(running_max) < float("inf"), running_max, 0.0)
            moved = shift - new_shift
            # The shift only grows while it is the maximum; ``min`` keeps an empty sum at 0 when
            # it leaves the -inf convention (0) for a negative maximum.
            sum_exp = sum_exp * tl.exp(tl.minimum(moved, 0.0))
            sum_exp += tl.sum(tl.exp(z - new_shift), axis=0)
            # sum p * (z - new) = sum p * (z - old) + (old - new) * sum p; p == 0 adds exactly 0
            # (never 0 * -inf, which is NaN).
            target_dot += moved * target_sum
            target_dot += tl.sum(p * tl.where(p == 0, 0.0, z - new_shift), axis=0)
            target_sum += tl.sum(p, axis=0)
            shift = new_shift
        log_sum_exp = tl.log(sum_exp)
        normalizer = tl.where(target_sum == 0, 0.0, target_sum * log_sum_exp)
        tl.store(loss_ptr + row, weight * (normalizer - target_dot))
        tl.store(row_max_ptr + row, shift)
        tl.store(log_sum_exp_ptr + row, log_sum_exp)
        tl.store(target_sum_ptr + row, target_sum)
        if WITH_GRAD:
            _gradient_sweep(
                z_row,
                z_col_stride,
                p_row,
                p_col_stride,
                grad_row,
                grad_row,
                n_cols,
                shift,
                log_sum_exp,
                target_sum,
                tl.load(scale_ptr + row),
                True,
                False,
                True,
                COMPUTE,
                BLOCK_SIZE,
            )


@triton.jit
def _backward_kernel(
    z_ptr,
    z_row_stride,
    z_col_stride,
    p_ptr,
    p_row_stride,
    p_col_stride,
    row_max_ptr,
    log_sum_exp_ptr,
    target_sum_ptr,
    scale_ptr,
    logits_grad_ptr,
    targets_grad_ptr,
    n_cols,
    LOGITS_GRAD: tl.constexpr,
    TARGETS_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _gradient_sweep(
        z_ptr + row * z_row_stride,
        z_col_stride,
        p_ptr + row * p_row_stride,
        p_col_stride,
        logits_grad_ptr + row * n_cols,
        targets_grad_ptr + row * n_cols,
        n_cols,
        tl.load(row_max_ptr + row).to(COMPUTE),
        tl.load(log_sum_exp_ptr + row).to(COMPUTE),
        tl.load(target_sum_ptr + row).to(COMPUTE),
        tl.load(scale_ptr + row).to(COMPUTE),
        LOGITS_GRAD,
        TARGETS_GRAD,
        False,
        COMPUTE,
        BLOCK_SIZE,
    )


def row_routine(
    rows: _core.Rows, /, *, with_logits_grad: bool, block_size: int | None = None
) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the Triton forward kernel.

    For torch tensors on a CUDA device (or on the CPU under ``TRITON_INTERPRET=1``). Rows of
    weight 0 are not read; their entries of :class:`softce_multi._core.SavedRows` are 0 and
    their gradient rows exactly 0.

    Parameters
    ----------
    rows
        The inputs laid out by :func:`softce_multi._core.as_rows`.
    with_logits_grad
        Whether to write the logits gradient (scaled for a unit upstream gradient).
    block_size
        Vocabulary entries per chunk, a power of two; see :func:`softce_multi.kernels.launch_config`.
    """
    z, p = rows.z, rows.p
    n_rows, n_cols = z.shape
    weighted = torch.empty(n_rows, dtype=rows.dtype, device=z.device)
    saved = _core.SavedRows(*(torch.empty_like(weighted) for _ in _core.SavedRows._fields))
    grad = _empty_rows(n_rows if with_logits_grad else 0, n_cols, z.dtype, z.device)
    block, num_warps = kernels.launch_config(n_cols, block_size)
    with _on_device(z):
        _forward_kernel[(n_rows,)](
            z,
            *z.stride(),
            p,
            *p.stride(),
            rows.weights,
            rows.row_scale,
            weighted,
            *saved,
            grad,
            n_cols,
            WITH_GRAD=with_logits_grad,
            # Keep the row in L2 for the gradient sweep that follows.
            STATS_EVICTION="evict_last" if with_logits_grad else "evict_first",
            COMPUTE=_TRITON_DTYPES[rows.dtype],
            BLOCK_SIZE=block,
            num_warps=num_warps,
        )
    return _core.RowResults(weighted, saved, grad if with_logits_grad else None)


def gradient_routine(
    z: torch.Tensor,
    p: torch.Tensor,
    saved: _core.SavedRows,
    row_scale: torch.Tensor,
    /,
    *,
    logits_grad: bool,
    targets_grad: bool,
    block_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of the Triton backward kernel.

    One sweep reads each needed input once; ``p`` is read only for ``logits_grad``. Rows whose
    ``row_scale`` is 0 are not read and get exactly 0. ``block_size`` is as in
    :func:`row_routine`.
    """
    n_rows, n_cols = z.shape
    grad_z = _empty_rows(n_rows if logits_grad else 0, n_cols, z.dtype, z.device)
    grad_p = _empty_rows(n_rows if targets_grad else 0, n_cols, p.dtype, z.device)
    block, num_warps = kernels.launch_config(n_cols, block_size)
    with _on_device(z):
        _backward_kernel[(n_rows,)](
            z,
            *z.stride(),
            p,
            *p.stride(),
            *saved,
            row_scale,
            grad_z,
            grad_p,
            n_cols,
            LOGITS_GRAD=logits_grad,
            TARGETS_GRAD=targets_grad,
            COMPUTE=_TRITON_DTYPES[saved.row_max.dtype],
            BLOCK_SIZE=block,
            num_warps=num_warps,
        )
    return (grad_z if logits_grad else None, grad_p if targets_grad else None)


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _empty_rows(n_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an output of ``n_rows`` rows (0 for a gradient that is not asked for)."""
    return torch.empty((n_rows, n_cols), dtype=dtype, device=device)


def _on_device(x: torch.Tensor) -> Any:
    """Make ``x``'s GPU the current one for a launch (nothing to do for CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
