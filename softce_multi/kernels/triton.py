"""Triton kernels for torch tensors on CUDA, as ``torch.library`` operators.

The kernels follow the algorithm described once in :mod:`softce_multi.kernels` (one program per
row, chunks of ``block_size`` entries, a forward kernel with an optional second gradient sweep,
a backward kernel from the saved statistics). What is particular to this module:

* The kernels read the logits and targets through their row and column strides, so strided
  views of torch tensors are read in place, without a copy.
* They run as two operators made with :func:`torch.library.triton_op`, whose kernels are
  launched through :func:`torch.library.wrap_triton`: ``softce_multi::triton_row_routine`` and
  ``softce_multi::triton_gradient_routine``. ``torch.compile`` sees the kernels inside them (and
  Inductor can schedule them); each has a fake implementation and a vmap rule, shared with the
  torch CPU operators (:func:`softce_multi.kernels.empty_row_outputs` and the rules next to it).
  :func:`row_routine` and :func:`gradient_routine` call them as the core's routines.
  ``softce_multi::triton_row_routine_`` and ``softce_multi::triton_gradient_routine_`` write
  the logits gradient over the logits, for the chunks of the linear loss
  (:func:`row_routine_over_logits`, :func:`gradient_routine_over_logits`).
* The computation dtype is the dtype of the per-row outputs (float32, or float64 when either
  input is float64); the kernels take it from their output pointers.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set
before Triton is imported).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from softce_multi import _core, kernels

__all__ = [
    "addressable",
    "check_contiguous",
    "gradient_routine",
    "gradient_routine_over_logits",
    "launchable",
    "rewrite_for_upstream_",
    "row_routine",
    "row_routine_over_logits",
    "triton_gradient_routine",
    "triton_gradient_routine_",
    "triton_row_routine",
    "triton_row_routine_",
    "zero_row",
]


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

    The softmax is ``exp(z - row_max) * exp(-log_sum_exp)``; ``LAST_FIRST`` walks the chunks from
    the end of the row, for a sweep right after the statistics sweep (see
    :mod:`softce_multi.kernels`).
    """
    if scale == 0:
        if LOGITS:
            zero_row(logits_out, n_cols, BLOCK_SIZE)
        if TARGETS:
            zero_row(targets_out, n_cols, BLOCK_SIZE)
    else:
        offsets = tl.arange(0, BLOCK_SIZE)
        softmax_scale = scale * target_sum
        # The softmax is exp(z - row_max) / sum_exp: one rounded exponential per entry.
        coefficient = softmax_scale * tl.exp(-log_sum_exp)
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
                softmax_term = coefficient * tl.exp(z - row_max)
                grad = tl.where(softmax_scale == 0, 0.0, softmax_term) - scale * p
                tl.store(logits_out + cols, grad.to(logits_out.dtype.element_ty), mask=inside)
            if TARGETS:
                grad = scale * (log_sum_exp - (z - row_max))
                tl.store(targets_out + cols, grad.to(targets_out.dtype.element_ty), mask=inside)


@triton.jit
def zero_row(out_row, n_cols, BLOCK_SIZE: tl.constexpr):
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
    BLOCK_SIZE: tl.constexpr,
):
    compute = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    p_row = p_ptr + row * p_row_stride
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
        # Running statistics relative to ``shift``: the running maximum where it is finite, else
        # 0 (the convention of _core.row_statistics for rows without a finite maximum).
        running_max = tl.full([], float("-inf"), compute)
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
            ).to(compute)
            p = tl.load(
                p_row + cols * p_col_stride,
                mask=inside,
                other=0.0,
                eviction_policy=STATS_EVICTION,
            ).to(compute)
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
                LOGITS=True,
                TARGETS=False,
                LAST_FIRST=True,
                COMPUTE=compute,
                BLOCK_SIZE=BLOCK_SIZE,
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
    BLOCK_SIZE: tl.constexpr,
):
    compute = row_max_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    _gradient_sweep(
        z_ptr + row * z_row_stride,
        z_col_stride,
        p_ptr + row * p_row_stride,
        p_col_stride,
        logits_grad_ptr + row * n_cols,
        targets_grad_ptr + row * n_cols,
        n_cols,
        tl.load(row_max_ptr + row).to(compute),
        tl.load(log_sum_exp_ptr + row).to(compute),
        tl.load(target_sum_ptr + row).to(compute),
        tl.load(scale_ptr + row).to(compute),
        LOGITS=LOGITS_GRAD,
        TARGETS=TARGETS_GRAD,
        LAST_FIRST=False,
        COMPUTE=compute,
        BLOCK_SIZE=BLOCK_SIZE,
    )


@triton.jit
def _upstream_gradient_kernel(
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
    upstream_ptr,
    logits_grad_ptr,
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    compute = row_max_ptr.dtype.element_ty
    upstream = tl.load(upstream_ptr).to(compute)
    # The rows hold the gradient for an upstream of 1: left as they are for exactly 1.
    if upstream != 1:
        row = tl.program_id(0).to(tl.int64)
        unit_scale = tl.load(scale_ptr + row).to(compute)
        out = logits_grad_ptr + row * n_cols
        _gradient_sweep(
            z_ptr + row * z_row_stride,
            z_col_stride,
            p_ptr + row * p_row_stride,
            p_col_stride,
            out,
            out,
            n_cols,
            tl.load(row_max_ptr + row).to(compute),
            tl.load(log_sum_exp_ptr + row).to(compute),
            tl.load(target_sum_ptr + row).to(compute),
            tl.where(unit_scale == 0, 0.0, unit_scale * upstream),
            LOGITS=True,
            TARGETS=False,
            LAST_FIRST=False,
            COMPUTE=compute,
            BLOCK_SIZE=BLOCK_SIZE,
        )


def rewrite_for_upstream_(
    logits_grad: Tensor,
    z: Tensor,
    p: Tensor,
    saved: _core.SavedRows,
    row_scale: Tensor,
    upstream: Tensor,
    /,
    *,
    block_size: int | None = None,
) -> None:
    """Turn ``logits_grad``, the gradient made for an upstream gradient of 1, into that for
    ``upstream``, in place, without reading ``upstream`` on the host.

    Each program reads ``upstream`` (a 0-d tensor) on the device: where it is exactly 1 its
    row is left as it is; otherwise the row is computed again from the logits ``z``, the targets
    ``p`` (both ``[N, V]``), the ``saved`` statistics and ``row_scale`` (``[N]``, for an
    upstream of 1) times ``upstream``, and rounded once to the dtype of ``logits_grad``, a
    contiguous ``[N, V]`` tensor. A batch with no rows is left as it is.
    """
    if z.shape[0] == 0:
        return
    inputs = (z, p, *saved, row_scale, upstream.to(row_scale.dtype))
    _launch(_upstream_gradient_kernel, inputs, (logits_grad,), block_size, {})


def row_routine(
    rows: _core.Rows, /, *, with_logits_grad: bool, block_size: int | None = None
) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the Triton forward kernel.

    For torch tensors on a CUDA device (or on the CPU under ``TRITON_INTERPRET=1``); it runs the
    operator ``softce_multi::triton_row_routine`` (:func:`triton_row_routine`). Rows of weight 0
    are not read; their entries of :class:`softce_multi._core.SavedRows` are 0 and their
    gradient rows exactly 0. ``block_size`` is the number of vocabulary entries per chunk, a
    power of two (see :func:`softce_multi.kernels.launch_config`).
    """
    return kernels.run_row_operator(
        triton_row_routine, rows, block_size, with_logits_grad=with_logits_grad
    )


def row_routine_over_logits(
    rows: _core.Rows, /, *, with_logits_grad: bool, block_size: int | None = None
) -> _core.RowResults:
    """:func:`row_routine` for logits that are scratch: the gradient is written over ``rows.z``.

    With ``with_logits_grad``, it runs the operator ``softce_multi::triton_row_routine_``
    (:func:`triton_row_routine_`), and the logits gradient it returns is ``rows.z`` itself.
    """
    if not with_logits_grad:
        return row_routine(rows, with_logits_grad=False, block_size=block_size)
    return kernels.run_row_operator_over_logits(triton_row_routine_, rows, block_size)


def gradient_routine(
    rows: _core.BackwardRows,
    /,
    *,
    logits_grad: bool,
    targets_grad: bool,
    block_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of the Triton backward kernel.

    It runs the operator ``softce_multi::triton_gradient_routine``
    (:func:`triton_gradient_routine`). ``block_size`` is as in :func:`row_routine`.
    """
    return kernels.run_gradient_operator(
        triton_gradient_routine,
        rows,
        block_size,
        logits_grad=logits_grad,
        targets_grad=targets_grad,
    )


def gradient_routine_over_logits(
    rows: _core.BackwardRows,
    /,
    *,
    logits_grad: bool,
    targets_grad: bool,
    block_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`gradient_routine` for logits that are scratch: the logits gradient is written over
    ``rows.z`` by the operator :func:`triton_gradient_routine_`, and returned as ``rows.z``."""
    if not logits_grad:
        return gradient_routine(
            rows, logits_grad=False, targets_grad=targets_grad, block_size=block_size
        )
    return kernels.run_gradient_operator_over_logits(
        triton_gradient_routine_, rows, block_size, targets_grad=targets_grad
    )


@torch.library.triton_op("softce_multi::triton_row_routine", mutates_args=())
def triton_row_routine(
    z: Tensor,
    p: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    with_logits_grad: bool,
    block_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel as the operator ``softce_multi::triton_row_routine``.

    The arguments and results are those of
    :func:`softce_multi.kernels.torch_cpu.torch_row_routine` (the weighted losses, the three
    saved statistics, and the logits gradient or a ``[0, V]`` tensor), with ``block_size`` as in
    :func:`row_routine`.
    """
    outputs = kernels.empty_row_outputs(z, weights, with_logits_grad=with_logits_grad)
    _run_forward_kernel((z, p, weights, row_scale), outputs, with_logits_grad, block_size)
    return outputs


@torch.library.triton_op("softce_multi::triton_row_routine_", mutates_args=("z",))
def triton_row_routine_(
    z: Tensor, p: Tensor, weights: Tensor, row_scale: Tensor, block_size: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`triton_row_routine` with the logits gradient written over ``z``.

    ``z`` must be contiguous: the gradient sweep of each row stores every chunk where it has
    just loaded it. Returns the four ``[N]`` outputs; ``z`` holds the fifth.
    """
    check_contiguous(z)
    statistics = kernels.empty_row_statistics(z, weights)
    _run_forward_kernel((z, p, weights, row_scale), (*statistics, z), True, block_size)
    return statistics


@torch.library.triton_op("softce_multi::triton_gradient_routine", mutates_args=())
def triton_gradient_routine(
    z: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    logits_grad: bool,
    targets_grad: bool,
    block_size: int | None,
) -> tuple[Tensor, Tensor]:
    """The backward kernel as the operator ``softce_multi::triton_gradient_routine``.

    The arguments and results are those of
    :func:`softce_multi.kernels.torch_cpu.torch_gradient_routine`, with ``block_size`` as in
    :func:`row_routine`. One sweep reads each needed input once; ``p`` is read only for
    ``logits_grad``.
    """
    grads = kernels.empty_gradient_outputs(z, p, logits_grad=logits_grad, targets_grad=targets_grad)
    inputs = (z, p, row_max, log_sum_exp, target_sum, row_scale)
    _run_backward_kernel(inputs, grads, (logits_grad, targets_grad), block_size)
    return grads


@torch.library.triton_op("softce_multi::triton_gradient_routine_", mutates_args=("z",))
def triton_gradient_routine_(
    z: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    targets_grad: bool,
    block_size: int | None,
) -> Tensor:
    """:func:`triton_gradient_routine` with the logits gradient written over ``z``.

    ``z`` must be contiguous: each row's sweep stores every chunk where it has just loaded it
    (the targets gradient of the chunk first). Returns the targets gradient (``[0, V]`` without
    ``targets_grad``); ``z`` holds the logits gradient.
    """
    check_contiguous(z)
    grad_p = kernels.empty_gradient_outputs(z, p, logits_grad=False, targets_grad=targets_grad)[1]
    inputs = (z, p, row_max, log_sum_exp, target_sum, row_scale)
    _run_backward_kernel(inputs, (z, grad_p), (True, targets_grad), block_size)
    return grad_p


def _run_forward_kernel(
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    with_logits_grad: bool,
    block_size: int | None,
) -> None:
    """Launch the forward kernel on ``(z, p, weights, row_scale)``, writing the five
    ``outputs`` of :func:`triton_row_routine` (the logits gradient may be ``z`` itself)."""
    # Keep the row in L2 for the gradient sweep that follows.
    eviction = "evict_last" if with_logits_grad else "evict_first"
    flags = {"WITH_GRAD": with_logits_grad, "STATS_EVICTION": eviction}
    _launch(_forward_kernel, inputs, outputs, block_size, flags)


def _run_backward_kernel(
    inputs: Sequence[Tensor],
    grads: Sequence[Tensor],
    wanted: Sequence[bool],
    block_size: int | None,
) -> None:
    """Launch the backward kernel on ``(z, p, row_max, log_sum_exp, target_sum, row_scale)``,
    writing the logits and targets gradients ``grads`` that are ``wanted`` (the logits
    gradient may be ``z`` itself)."""
    flags = dict(zip(("LOGITS_GRAD", "TARGETS_GRAD"), wanted, strict=True))
    _launch(_backward_kernel, inputs, grads, block_size, flags)


def addressable(x: Tensor) -> Tensor:
    """``x`` as the kernels can address it: a contiguous copy where a row's last column lies
    ``2**31`` elements or more past its first through a column stride other than 1, since the
    kernels multiply column indices by the stride in 32 bits; ``x`` itself otherwise."""
    if x.ndim == 2 and x.stride(1) != 1 and (x.shape[1] - 1) * abs(x.stride(1)) >= 2**31:
        return x.contiguous()
    return x


def check_contiguous(z: Tensor) -> None:
    """Refuse logits that cannot take their own gradient in place."""
    if not z.is_contiguous():
        msg = f"z must be contiguous to take its own gradient, got strides {z.stride()}"
        raise ValueError(msg)


def launchable(kernel: Any) -> Any:
    """The Triton ``kernel`` wrapped for graph capture by :func:`torch.library.wrap_triton`.

    Under ``TRITON_INTERPRET=1``, ``triton.jit`` makes an interpreted function, which some torch
    releases (2.11 among them) refuse to wrap; it is returned as it is, as later releases do.
    """
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return wrap_triton(kernel)


def _check_block_size(z: Tensor, block_size: int | None) -> None:
    kernels.launch_config(z.shape[-1], block_size)  # the fakes raise the operators' error


kernels.register_operator_rules(
    triton_row_routine,
    triton_gradient_routine,
    triton_row_routine_,
    triton_gradient_routine_,
    check_options=_check_block_size,
)


def _launch(
    kernel: Any,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    block_size: int | None,
    flags: dict[str, Any],
) -> None:
    """Run ``kernel`` with one program per row of ``z = inputs[0]``, on ``z``'s device.

    The kernel receives ``z`` and ``p = inputs[1]`` with their strides, then the other
    ``inputs`` and the ``outputs``, then the row length, and the chunk size and the ``flags`` as
    named compile-time constants.
    """
    z, p, *rest = inputs
    z, p = addressable(z), addressable(p)
    n_rows, n_cols = z.shape
    block, num_warps = kernels.launch_config(n_cols, block_size)
    device = torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()
    with device:
        launchable(kernel)[(n_rows,)](
            z,
            *z.stride(),
            p,
            *p.stride(),
            *rest,
            *outputs,
            n_cols,
            BLOCK_SIZE=block,
            num_warps=num_warps,
            **flags,
        )
