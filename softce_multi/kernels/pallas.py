"""Pallas kernels for JAX on GPU, behind the routines of :func:`softce_multi._core.loss_pass`.

The kernels follow the algorithm described once in :mod:`softce_multi.kernels` (one program per
row, chunks of ``block_size`` entries, a forward kernel with an optional second gradient sweep,
a backward kernel from the saved statistics), as :mod:`softce_multi.kernels.triton` does. What is
particular to this module:

* The kernels target the Triton backend of Pallas, which requires every block it loads to have a
  power-of-two size; the chunks are such blocks, masked past the row's end.
* Every function takes ``interpret``: with ``interpret=True`` Pallas runs the kernels on any
  backend, which is how they are tested on the CPU.
* The functions are traceable: they work under ``jax.jit`` and ``jax.vmap``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from softce_multi import _core, kernels

__all__ = ["gradient_routine", "row_routine"]


def _load_chunk(
    ref: Any, row: Any, chunk: Any, block_size: int, other: float, dtype: Any, eviction: str
) -> Any:
    """Load chunk ``chunk`` of row ``row`` of ``ref`` in ``dtype``; ``other`` past the row's end."""
    start = chunk * block_size
    cols = start + jnp.arange(block_size)
    values = plgpu.load(
        ref.at[row, pl.ds(start, block_size)],
        mask=cols < ref.shape[-1],
        other=other,
        eviction_policy=eviction,
    )
    return values.astype(dtype)


def _store_chunk(ref: Any, row: Any, chunk: Any, value: Any) -> None:
    """Store ``value`` as chunk ``chunk`` of row ``row`` of ``ref``, up to the row's end."""
    block_size = value.shape[0]
    start = chunk * block_size
    cols = start + jnp.arange(block_size)
    plgpu.store(
        ref.at[row, pl.ds(start, block_size)], value.astype(ref.dtype), mask=cols < ref.shape[-1]
    )


def _chunk_loop(n_cols: int, block_size: int, body: Any, initial: Any) -> Any:
    """``fori_loop`` over the chunks of a row, counting in int32 like the program ids."""
    n_chunks = pl.cdiv(n_cols, block_size)
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(n_chunks), body, initial)


def _zero_row(out_ref: Any, row: Any, block_size: int) -> None:
    """Write zeros over row ``row`` of ``out_ref``."""

    def write(chunk: Any, carry: None) -> None:
        _store_chunk(out_ref, row, chunk, jnp.zeros(block_size, out_ref.dtype))

    _chunk_loop(out_ref.shape[-1], block_size, write, None)


def _gradient_sweep(
    z_ref: Any,
    p_ref: Any,
    logits_out: Any | None,
    targets_out: Any | None,
    row: Any,
    row_max: Any,
    log_sum_exp: Any,
    target_sum: Any,
    scale: Any,
    *,
    last_first: bool,
    compute: Any,
    block_size: int,
) -> None:
    """Write one row of the logits and/or targets gradients (None: not wanted); 0 if scale is 0.

    The softmax is ``exp(z - row_max) * exp(-log_sum_exp)``; ``last_first`` walks the chunks from
    the end of the row, for a sweep right after the statistics sweep (see
    :mod:`softce_multi.kernels`).
    """
    n_chunks = pl.cdiv(z_ref.shape[-1], block_size)
    outs = [out for out in (logits_out, targets_out) if out is not None]

    def write(i: Any, carry: None) -> None:
        chunk = n_chunks - 1 - i if last_first else i
        # Past the row's end: -inf, whose exponential is 0 (nothing is stored there).
        z = _load_chunk(z_ref, row, chunk, block_size, -jnp.inf, compute, "evict_first")
        if logits_out is not None:
            p = _load_chunk(p_ref, row, chunk, block_size, 0.0, compute, "evict_first")
            # A row with no target mass has a zero softmax term, even with no softmax.
            softmax_scale = scale * target_sum
            # The softmax is exp(z - row_max) / sum_exp: one rounded exponential per entry.
            softmax_term = softmax_scale * jnp.exp(-log_sum_exp) * jnp.exp(z - row_max)
            grad = jnp.where(softmax_scale == 0, 0.0, softmax_term) - scale * p
            _store_chunk(logits_out, row, chunk, grad)
        if targets_out is not None:
            _store_chunk(targets_out, row, chunk, scale * (log_sum_exp - (z - row_max)))

    def write_zeros() -> None:
        for out in outs:
            _zero_row(out, row, block_size)

    jax.lax.cond(
        scale == 0, write_zeros, lambda: _chunk_loop(z_ref.shape[-1], block_size, write, None)
    )


def _row_statistics(
    z_ref: Any, p_ref: Any, row: Any, *, compute: Any, block_size: int, eviction: str
) -> tuple[Any, Any, Any, Any]:
    """Return ``(shift, sum_exp, target_sum, target_dot)`` of one row, in one online sweep.

    ``shift`` is the row maximum where it is finite and 0 otherwise, as in
    :func:`softce_multi._core.row_statistics`; the sums are taken relative to it.
    """

    def accumulate(chunk: Any, state: tuple[Any, ...]) -> tuple[Any, ...]:
        running_max, shift, sum_exp, target_sum, target_dot = state
        z = _load_chunk(z_ref, row, chunk, block_size, -jnp.inf, compute, eviction)
        p = _load_chunk(p_ref, row, chunk, block_size, 0.0, compute, eviction)
        running_max = jnp.maximum(running_max, jnp.max(z))
        new_shift = jnp.where(jnp.isfinite(running_max), running_max, 0.0)
        moved = shift - new_shift
        # The shift only grows while it is the maximum; ``min`` keeps an empty sum at 0 when it
        # leaves the -inf convention (0) for a negative maximum.
        sum_exp = sum_exp * jnp.exp(jnp.minimum(moved, 0.0)) + jnp.sum(jnp.exp(z - new_shift))
        # sum p * (z - new) = sum p * (z - old) + (old - new) * sum p; p == 0 adds exactly 0
        # (never 0 * -inf, which is NaN).
        dot = jnp.sum(p * jnp.where(p == 0, 0.0, z - new_shift))
        target_dot = target_dot + moved * target_sum + dot
        target_sum = target_sum + jnp.sum(p)
        return running_max, new_shift, sum_exp, target_sum, target_dot

    zero = jnp.zeros((), compute)
    initial = (jnp.full((), -jnp.inf, compute), zero, zero, zero, zero)
    _, shift, sum_exp, target_sum, target_dot = _chunk_loop(
        z_ref.shape[-1], block_size, accumulate, initial
    )
    return shift, sum_exp, target_sum, target_dot


def _forward_kernel(
    z_ref: Any,
    p_ref: Any,
    weight_ref: Any,
    scale_ref: Any,
    loss_ref: Any,
    row_max_ref: Any,
    log_sum_exp_ref: Any,
    target_sum_ref: Any,
    *grad_ref: Any,
    compute: Any,
    block_size: int,
) -> None:
    row = pl.program_id(0)
    weight = weight_ref[row]
    logits_out = grad_ref[0] if grad_ref else None

    def valid_row() -> None:
        shift, sum_exp, target_sum, target_dot = _row_statistics(
            z_ref,
            p_ref,
            row,
            compute=compute,
            block_size=block_size,
            # Keep the row in L2 for the gradient sweep that follows.
            eviction="evict_last" if grad_ref else "evict_first",
        )
        log_sum_exp = jnp.log(sum_exp)
        normalizer = jnp.where(target_sum == 0, 0.0, target_sum * log_sum_exp)
        loss_ref[row] = weight * (normalizer - target_dot)
        row_max_ref[row] = shift
        log_sum_exp_ref[row] = log_sum_exp
        target_sum_ref[row] = target_sum
        if logits_out is not None:
            _gradient_sweep(
                z_ref,
                p_ref,
                logits_out,
                None,
                row,
                shift,
                log_sum_exp,
                target_sum,
                scale_ref[row],
                last_first=True,
                compute=compute,
                block_size=block_size,
            )

    def masked_row() -> None:
        for ref in (loss_ref, row_max_ref, log_sum_exp_ref, target_sum_ref):
            ref[row] = jnp.zeros((), compute)
        if logits_out is not None:
            _zero_row(logits_out, row, block_size)

    jax.lax.cond(weight == 0, masked_row, valid_row)


def _backward_kernel(
    z_ref: Any,
    p_ref: Any,
    row_max_ref: Any,
    log_sum_exp_ref: Any,
    target_sum_ref: Any,
    scale_ref: Any,
    *out_refs: Any,
    logits_grad: bool,
    targets_grad: bool,
    compute: Any,
    block_size: int,
) -> None:
    row = pl.program_id(0)
    outs = iter(out_refs)
    _gradient_sweep(
        z_ref,
        p_ref,
        next(outs) if logits_grad else None,
        next(outs) if targets_grad else None,
        row,
        row_max_ref[row].astype(compute),
        log_sum_exp_ref[row].astype(compute),
        target_sum_ref[row].astype(compute),
        scale_ref[row].astype(compute),
        last_first=False,
        compute=compute,
        block_size=block_size,
    )


def row_routine(
    rows: _core.Rows,
    /,
    *,
    with_logits_grad: bool,
    block_size: int | None = None,
    interpret: bool = False,
) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the Pallas forward kernel.

    Rows of weight 0 are not read; their entries of :class:`softce_multi._core.SavedRows` are 0
    and their gradient rows exactly 0.

    Parameters
    ----------
    rows : softce_multi._core.Rows
        The inputs laid out by :func:`softce_multi._core.as_rows`.
    with_logits_grad : bool
        Whether to write the logits gradient (scaled for a unit upstream gradient).
    block_size : int, optional
        Vocabulary entries per chunk, a power of two (see
        :func:`softce_multi.kernels.launch_config`).
    interpret : bool, optional
        Run the kernel through the Pallas interpreter (any backend) instead of compiling it.
    """
    n_rows, n_cols = rows.z.shape
    n_saved = len(_core.SavedRows._fields)
    out_shape = [jax.ShapeDtypeStruct((n_rows,), rows.dtype)] * (1 + n_saved)
    if with_logits_grad:
        out_shape.append(jax.ShapeDtypeStruct((n_rows, n_cols), rows.z.dtype))
    block, num_warps = kernels.launch_config(n_cols, block_size)
    kernel = functools.partial(_forward_kernel, compute=rows.dtype, block_size=block)
    inputs = (rows.z, rows.p, rows.weights, _core.row_scale(rows))
    weighted, *outputs = _call(kernel, out_shape, inputs, num_warps, interpret)
    logits_grad = outputs[n_saved] if with_logits_grad else None
    return _core.RowResults(weighted, _core.SavedRows(*outputs[:n_saved]), logits_grad)


def gradient_routine(
    rows: _core.BackwardRows,
    /,
    *,
    logits_grad: bool,
    targets_grad: bool,
    block_size: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array | None, jax.Array | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of the Pallas backward kernel.

    One sweep reads each needed input once; ``p`` is read only for ``logits_grad``. Rows whose
    ``row_scale`` is 0 are not read and get exactly 0. ``block_size`` and ``interpret`` are as
    in :func:`row_routine`.
    """
    z, p, saved, row_scale = rows.z, rows.p, rows.saved, rows.row_scale
    out_shape = []
    if logits_grad:
        out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
    if targets_grad:
        out_shape.append(jax.ShapeDtypeStruct(z.shape, p.dtype))
    block, num_warps = kernels.launch_config(z.shape[-1], block_size)
    kernel = functools.partial(
        _backward_kernel,
        logits_grad=logits_grad,
        targets_grad=targets_grad,
        compute=saved.row_max.dtype,
        block_size=block,
    )
    grads = iter(_call(kernel, out_shape, (z, p, *saved, row_scale), num_warps, interpret))
    return (next(grads) if logits_grad else None, next(grads) if targets_grad else None)


def _call(
    kernel: Any,
    out_shape: list[jax.ShapeDtypeStruct],
    inputs: tuple[jax.Array, ...],
    num_warps: int,
    interpret: bool,
) -> list[jax.Array]:
    """Run ``kernel`` with one program per row of ``inputs[0]``; whole arrays as refs."""
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(inputs[0].shape[0],),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
    )(*inputs)
