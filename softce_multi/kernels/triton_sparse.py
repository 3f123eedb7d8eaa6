"""Triton kernels of sparse targets, for torch tensors on CUDA, as ``torch.library`` operators.

One program per row, as the dense kernels of :mod:`softce_multi.kernels.triton`. A row's ``K``
slots (ids and probabilities) are loaded once, as one block of ``next_pow2(K)`` lanes, together
with the logits at the ids (a gather of ``K`` entries), before anything is written:

* the forward kernel sweeps the row for its online maximum and sum of exponentials, and takes the
  target mass and the target-weighted logits from the slots; with the gradient asked for, a
  second sweep writes ``coefficient * exp(z - row_max)`` (the softmax term) over the whole row;
* then, after a barrier, the *fix-up* writes each target entry whole: the softmax term of its
  logit minus the row scale times its mass, the mass summed over the slots that share the id (a
  ``K x K`` comparison). Every slot of an id stores the same value, so duplicates neither race
  nor need atomics, and a 16-bit gradient is rounded once, from float32, at the target entries
  as everywhere else;
* the backward kernel does the same from the saved statistics, and writes the ``[N, K]`` targets
  gradient, ``-scale * log_softmax(z)`` at the ids.

A slot of probability 0 is never used, whatever its id. An id outside ``[0, V)`` with mass makes
the row's loss NaN, and its gradient NaN at the target entries and at entry 0. The operators
``softce_multi::triton_sparse_row_routine`` and ``softce_multi::triton_sparse_gradient_routine``
(and the ``_`` variants that write the logits gradient over the logits, for the chunks of the
linear loss) have the arguments and results of those of :mod:`softce_multi.kernels.torch_sparse`,
with fake implementations and vmap rules. Without a GPU they run in Triton's interpreter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from softce_multi import _core, kernels
from softce_multi.kernels.triton import addressable, check_contiguous, launchable, zero_row

__all__ = [
    "gradient_routine",
    "gradient_routine_over_logits",
    "row_routine",
    "row_routine_over_logits",
    "triton_sparse_gradient_routine",
    "triton_sparse_gradient_routine_",
    "triton_sparse_row_routine",
    "triton_sparse_row_routine_",
]


@triton.jit
def _load_slots(
    ids_row,
    ids_stride,
    p_row,
    p_stride,
    z_row,
    z_col_stride,
    n_slots,
    n_cols,
    COMPUTE: tl.constexpr,
    SLOTS: tl.constexpr,
):
    """A row's slots: ids (0 where outside the row), probabilities, whether each is used (mass
    and a slot of the row), whether its id is in ``[0, V)``, and the logit at the id."""
    slots = tl.arange(0, SLOTS)
    in_row = slots < n_slots
    ids = tl.load(ids_row + slots * ids_stride, mask=in_row, other=0).to(tl.int64)
    p = tl.load(p_row + slots * p_stride, mask=in_row, other=0.0).to(COMPUTE)
    used = in_row & (p != 0)
    valid = (ids >= 0) & (ids < n_cols)
    safe_ids = tl.where(valid, ids, 0)
    z_at = tl.load(z_row + safe_ids * z_col_stride, mask=in_row & valid, other=0.0).to(COMPUTE)
    return safe_ids, p, used, valid, z_at


@triton.jit
def _softmax_sweep(
    z_row,
    z_col_stride,
    grad_row,
    n_cols,
    row_max,
    coefficient,
    COMPUTE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Write ``coefficient * exp(z - row_max)`` over one contiguous row of the gradient."""
    offsets = tl.arange(0, BLOCK_SIZE)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offsets
        inside = cols < n_cols
        z = tl.load(z_row + cols * z_col_stride, mask=inside, other=float("-inf")).to(COMPUTE)
        grad = coefficient * tl.exp(z - row_max)
        tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty), mask=inside)


@triton.jit
def _fix_targets(grad_row, safe_ids, p, used, valid, z_at, row_max, coefficient, scale):
    """Write each target entry whole: its softmax term minus ``scale`` times the mass of every
    slot with its id; NaN at the targets and at entry 0 if a slot with mass has a bad id."""
    same = (safe_ids[:, None] == safe_ids[None, :]) & (used & valid)[None, :]
    mass = tl.sum(tl.where(same, p[None, :], 0.0), axis=1)
    bad = tl.max(tl.where(used & ~valid, 1, 0), axis=0)
    value = coefficient * tl.exp(z_at - row_max) - scale * mass
    value = tl.where(bad > 0, float("nan"), value)
    tl.debug_barrier()  # the sweep's stores come first
    tl.store(grad_row + safe_ids, value.to(grad_row.dtype.element_ty), mask=used & valid)
    tl.store(grad_row + safe_ids * 0, value.to(grad_row.dtype.element_ty), mask=used & ~valid)


@triton.jit
def _sparse_forward_kernel(
    z_ptr,
    z_row_stride,
    z_col_stride,
    ids_ptr,
    ids_row_stride,
    ids_col_stride,
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
    n_slots,
    WITH_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLOTS: tl.constexpr,
):
    compute = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    grad_row = grad_ptr + row * n_cols
    weight = tl.load(weight_ptr + row)
    zero = tl.zeros([], compute)
    if weight == 0:
        tl.store(loss_ptr + row, zero)
        tl.store(row_max_ptr + row, zero)
        tl.store(log_sum_exp_ptr + row, zero)
        tl.store(target_sum_ptr + row, zero)
        if WITH_GRAD:
            zero_row(grad_row, n_cols, BLOCK_SIZE)
    else:
        safe_ids, p, used, valid, z_at = _load_slots(
            ids_ptr + row * ids_row_stride,
            ids_col_stride,
            p_ptr + row * p_row_stride,
            p_col_stride,
            z_row,
            z_col_stride,
            n_slots,
            n_cols,
            compute,
            SLOTS,
        )
        running_max = tl.full([], float("-inf"), compute)
        shift = zero
        sum_exp = zero
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            z = tl.load(z_row + cols * z_col_stride, mask=cols < n_cols, other=float("-inf"))
            z = z.to(compute)
            running_max = tl.maximum(running_max, tl.max(z, axis=0))
            new_shift = tl.where(tl.abs(running_max) < float("inf"), running_max, 0.0)
            sum_exp = sum_exp * tl.exp(tl.minimum(shift - new_shift, 0.0))
            sum_exp += tl.sum(tl.exp(z - new_shift), axis=0)
            shift = new_shift
        picked = tl.where(valid, z_at - shift, float("nan"))
        target_sum = tl.sum(p, axis=0)
        target_dot = tl.sum(tl.where(used, p * picked, 0.0), axis=0)
        log_sum_exp = tl.log(sum_exp)
        normalizer = tl.where(target_sum == 0, 0.0, target_sum * log_sum_exp)
        tl.store(loss_ptr + row, weight * (normalizer - target_dot))
        tl.store(row_max_ptr + row, shift)
        tl.store(log_sum_exp_ptr + row, log_sum_exp)
        tl.store(target_sum_ptr + row, target_sum)
        if WITH_GRAD:
            scale = tl.load(scale_ptr + row).to(compute)
            if scale * target_sum == 0:
                zero_row(grad_row, n_cols, BLOCK_SIZE)
            else:
                coefficient = scale * target_sum * tl.exp(-log_sum_exp)
                _softmax_sweep(
                    z_row, z_col_stride, grad_row, n_cols, shift, coefficient, compute, BLOCK_SIZE
                )
                _fix_targets(grad_row, safe_ids, p, used, valid, z_at, shift, coefficient, scale)


@triton.jit
def _sparse_backward_kernel(
    z_ptr,
    z_row_stride,
    z_col_stride,
    ids_ptr,
    ids_row_stride,
    ids_col_stride,
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
    n_slots,
    LOGITS_GRAD: tl.constexpr,
    TARGETS_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLOTS: tl.constexpr,
):
    compute = row_max_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    grad_row = logits_grad_ptr + row * n_cols
    row_max = tl.load(row_max_ptr + row).to(compute)
    log_sum_exp = tl.load(log_sum_exp_ptr + row).to(compute)
    target_sum = tl.load(target_sum_ptr + row).to(compute)
    scale = tl.load(scale_ptr + row).to(compute)
    safe_ids, p, used, valid, z_at = _load_slots(
        ids_ptr + row * ids_row_stride,
        ids_col_stride,
        p_ptr + row * p_row_stride,
        p_col_stride,
        z_row,
        z_col_stride,
        n_slots,
        n_cols,
        compute,
        SLOTS,
    )
    if TARGETS_GRAD:
        slots = tl.arange(0, SLOTS)
        grad_p = scale * (log_sum_exp - (z_at - row_max))
        grad_p = tl.where(valid, grad_p, tl.where(used, float("nan"), 0.0))
        grad_p = tl.where(scale == 0, 0.0, grad_p)
        out = targets_grad_ptr + row * n_slots + slots
        tl.store(out, grad_p.to(targets_grad_ptr.dtype.element_ty), mask=slots < n_slots)
    if LOGITS_GRAD:
        if scale * target_sum == 0:
            zero_row(grad_row, n_cols, BLOCK_SIZE)
        else:
            coefficient = scale * target_sum * tl.exp(-log_sum_exp)
            _softmax_sweep(
                z_row, z_col_stride, grad_row, n_cols, row_max, coefficient, compute, BLOCK_SIZE
            )
            _fix_targets(grad_row, safe_ids, p, used, valid, z_at, row_max, coefficient, scale)


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of :func:`triton_sparse_row_routine`."""
    assert rows.ids is not None  # chosen for sparse targets only
    outputs = triton_sparse_row_routine(
        rows.z, rows.ids, rows.p, rows.weights, _core.row_scale(rows), with_logits_grad, None
    )
    weighted, row_max, log_sum_exp, target_sum, grad = outputs
    saved = _core.SavedRows(row_max, log_sum_exp, target_sum)
    return _core.RowResults(weighted, saved, grad if with_logits_grad else None)


def row_routine_over_logits(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """:func:`row_routine` writing the logits gradient over ``rows.z`` (scratch logits)."""
    assert rows.ids is not None  # chosen for sparse targets only
    if not with_logits_grad:
        return row_routine(rows, with_logits_grad=False)
    statistics = triton_sparse_row_routine_(
        rows.z, rows.ids, rows.p, rows.weights, _core.row_scale(rows), None
    )
    weighted, *saved = statistics
    return _core.RowResults(weighted, _core.SavedRows(*saved), rows.z)


def gradient_routine(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of
    :func:`triton_sparse_gradient_routine`."""
    assert rows.ids is not None  # chosen for sparse targets only
    grad_z, grad_p = triton_sparse_gradient_routine(
        rows.z, rows.ids, rows.p, *rows.saved, rows.row_scale, logits_grad, targets_grad, None
    )
    return (grad_z if logits_grad else None, grad_p if targets_grad else None)


def gradient_routine_over_logits(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`gradient_routine` writing the logits gradient over ``rows.z``."""
    assert rows.ids is not None  # chosen for sparse targets only
    if not logits_grad:
        return gradient_routine(rows, logits_grad=False, targets_grad=targets_grad)
    grad_p = triton_sparse_gradient_routine_(
        rows.z, rows.ids, rows.p, *rows.saved, rows.row_scale, targets_grad, None
    )
    return rows.z, (grad_p if targets_grad else None)


@torch.library.triton_op("softce_multi::triton_sparse_row_routine", mutates_args=())
def triton_sparse_row_routine(
    z: Tensor,
    ids: Tensor,
    p: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    with_logits_grad: bool,
    block_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The sparse forward kernel: the results of
    :func:`softce_multi.kernels.torch_sparse.sparse_row_routine`, ``block_size`` entries of a
    row per step (see :func:`softce_multi.kernels.launch_config`)."""
    outputs = kernels.empty_row_outputs(z, weights, with_logits_grad=with_logits_grad)
    _launch(
        _sparse_forward_kernel,
        (z, ids, p, weights, row_scale),
        outputs,
        block_size,
        with_logits_grad,
    )
    return outputs


@torch.library.triton_op("softce_multi::triton_sparse_row_routine_", mutates_args=("z",))
def triton_sparse_row_routine_(
    z: Tensor, ids: Tensor, p: Tensor, weights: Tensor, row_scale: Tensor, block_size: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`triton_sparse_row_routine` with the logits gradient written over the contiguous
    ``z``; returns the four ``[N]`` outputs."""
    check_contiguous(z)
    statistics = kernels.empty_row_statistics(z, weights)
    _launch(
        _sparse_forward_kernel, (z, ids, p, weights, row_scale), (*statistics, z), block_size, True
    )
    return statistics


@torch.library.triton_op("softce_multi::triton_sparse_gradient_routine", mutates_args=())
def triton_sparse_gradient_routine(
    z: Tensor,
    ids: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    logits_grad: bool,
    targets_grad: bool,
    block_size: int | None,
) -> tuple[Tensor, Tensor]:
    """The sparse backward kernel: the ``[N, V]`` logits gradient and the ``[N, K]`` targets
    gradient (``[0, ...]`` when not asked for), as
    :func:`softce_multi.kernels.torch_sparse.sparse_gradient_routine`."""
    grads = _empty_gradients(z, p, logits_grad=logits_grad, targets_grad=targets_grad)
    inputs = (z, ids, p, row_max, log_sum_exp, target_sum, row_scale)
    _launch(_sparse_backward_kernel, inputs, grads, block_size, (logits_grad, targets_grad))
    return grads


@torch.library.triton_op("softce_multi::triton_sparse_gradient_routine_", mutates_args=("z",))
def triton_sparse_gradient_routine_(
    z: Tensor,
    ids: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    targets_grad: bool,
    block_size: int | None,
) -> Tensor:
    """:func:`triton_sparse_gradient_routine` with the logits gradient written over the
    contiguous ``z``; returns the targets gradient (``[0, K]`` without ``targets_grad``)."""
    check_contiguous(z)
    grad_p = _empty_gradients(z, p, logits_grad=False, targets_grad=targets_grad)[1]
    inputs = (z, ids, p, row_max, log_sum_exp, target_sum, row_scale)
    _launch(_sparse_backward_kernel, inputs, (z, grad_p), block_size, (True, targets_grad))
    return grad_p


def _empty_gradients(
    z: Tensor, p: Tensor, *, logits_grad: bool, targets_grad: bool
) -> tuple[Tensor, Tensor]:
    n_rows = z.shape[0]
    return (
        z.new_empty((n_rows if logits_grad else 0, z.shape[1])),
        p.new_empty((n_rows if targets_grad else 0, p.shape[1])),
    )


def _launch(
    kernel: Any,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    block_size: int | None,
    flags: Any,
) -> None:
    """Run ``kernel`` with one program per row of ``z = inputs[0]``: ``z``, ``ids`` and ``p``
    with their strides, the other inputs, the outputs, the row length and the slots per row."""
    z, ids, p, *rest = inputs
    z, ids, p = addressable(z), addressable(ids), addressable(p)
    n_rows, n_cols = z.shape
    n_slots = p.shape[1]
    block, num_warps = kernels.launch_config(n_cols, block_size)
    slots = max(1, 1 << max(n_slots - 1, 0).bit_length())
    if kernel is _sparse_forward_kernel:
        named = {"WITH_GRAD": flags}
    else:
        named = dict(zip(("LOGITS_GRAD", "TARGETS_GRAD"), flags, strict=True))
    if n_rows == 0:
        return
    device = torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()
    with device:
        launchable(kernel)[(n_rows,)](
            z,
            *z.stride(),
            ids,
            *ids.stride(),
            p,
            *p.stride(),
            *rest,
            *outputs,
            n_cols,
            n_slots,
            BLOCK_SIZE=block,
            SLOTS=slots,
            num_warps=num_warps,
            **named,
        )


def _check_block_size(z: Tensor, block_size: int | None) -> None:
    kernels.launch_config(z.shape[-1], block_size)  # the fakes raise the operators' error


@triton_sparse_row_routine.register_fake
def _row_fake(
    z: Tensor,
    ids: Tensor,
    p: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    with_logits_grad: bool,
    block_size: int | None,
) -> tuple[Tensor, ...]:
    _check_block_size(z, block_size)
    return kernels.empty_row_outputs(z, weights, with_logits_grad=with_logits_grad)


@triton_sparse_row_routine_.register_fake
def _row_over_logits_fake(
    z: Tensor, ids: Tensor, p: Tensor, weights: Tensor, row_scale: Tensor, block_size: int | None
) -> tuple[Tensor, ...]:
    _check_block_size(z, block_size)
    return kernels.empty_row_statistics(z, weights)


@triton_sparse_gradient_routine.register_fake
def _gradient_fake(z: Tensor, ids: Tensor, p: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
    logits_grad, targets_grad, block_size = rest[_N_SAVED_AND_SCALE:]
    _check_block_size(z, block_size)
    return _empty_gradients(z, p, logits_grad=logits_grad, targets_grad=targets_grad)


@triton_sparse_gradient_routine_.register_fake
def _gradient_over_logits_fake(z: Tensor, ids: Tensor, p: Tensor, *rest: Any) -> Tensor:
    targets_grad, block_size = rest[_N_SAVED_AND_SCALE:]
    _check_block_size(z, block_size)
    return _empty_gradients(z, p, logits_grad=False, targets_grad=targets_grad)[1]


#: The tensors of a gradient operator between ``z, ids, p`` and its flags: the three saved
#: statistics and the row scale.
_N_SAVED_AND_SCALE = len(_core.SavedRows._fields) + 1

triton_sparse_row_routine.register_vmap(
    kernels.folded_batch_rule(triton_sparse_row_routine, n_tensors=5)
)
triton_sparse_gradient_routine.register_vmap(
    kernels.folded_batch_rule(triton_sparse_gradient_routine, n_tensors=3 + _N_SAVED_AND_SCALE)
)
