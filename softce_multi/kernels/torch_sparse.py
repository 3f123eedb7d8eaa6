"""The routines of sparse targets for torch tensors, as ``torch.library`` operators.

``softce_multi::sparse_row_routine`` and ``softce_multi::sparse_gradient_routine`` run the
generic routines of :mod:`softce_multi.kernels.sparse` on torch tensors of any device, over
cache-sized blocks of rows. Each has a fake implementation (shapes and dtypes only) and a vmap
rule that folds the batch into the rows, so that ``torch.compile`` sees one opaque call and
``torch.func.vmap`` works. :func:`row_routine` and :func:`gradient_routine` are the
:class:`~softce_multi._core.RowRoutine` and :class:`~softce_multi._core.GradientRoutine` that
call them; :func:`row_routine_over_logits` and :func:`gradient_routine_over_logits` write the
logits gradient over the logits, for the chunks of the linear loss, which run inside an
operator of their own and call the generic routines directly. On a CUDA device with Triton
installed, each of the four routines runs the Triton kernels of
:mod:`softce_multi.kernels.triton_sparse` instead.
"""

from __future__ import annotations

import functools
from types import ModuleType

import array_api_compat.torch as torch_namespace
import torch
from torch import Tensor

from softce_multi import _core, kernels
from softce_multi.kernels import sparse, torch_cpu_blocks

__all__ = [
    "gradient_routine",
    "gradient_routine_over_logits",
    "row_routine",
    "row_routine_over_logits",
    "sparse_gradient_routine",
    "sparse_row_routine",
]


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the operator :func:`sparse_row_routine`."""
    assert rows.ids is not None  # chosen for sparse targets only
    if kernels.use_triton(rows.z):
        return _triton().row_routine(rows, with_logits_grad=with_logits_grad)
    outputs = sparse_row_routine(
        rows.z, rows.ids, rows.p, rows.weights, _core.row_scale(rows), with_logits_grad
    )
    weighted, row_max, log_sum_exp, target_sum, grad = outputs
    saved = _core.SavedRows(row_max, log_sum_exp, target_sum)
    return _core.RowResults(weighted, saved, grad if with_logits_grad else None)


def gradient_routine(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of :func:`sparse_gradient_routine`."""
    assert rows.ids is not None  # chosen for sparse targets only
    if kernels.use_triton(rows.z):
        return _triton().gradient_routine(rows, logits_grad=logits_grad, targets_grad=targets_grad)
    grad_z, grad_p = sparse_gradient_routine(
        rows.z, rows.ids, rows.p, *rows.saved, rows.row_scale, logits_grad, targets_grad
    )
    return (grad_z if logits_grad else None, grad_p if targets_grad else None)


def row_routine_over_logits(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The generic sparse row routine writing the logits gradient over ``rows.z``, for scratch
    logits (a chunk of the linear loss, inside its operator)."""
    if kernels.use_triton(rows.z):
        return _triton().row_routine_over_logits(rows, with_logits_grad=with_logits_grad)
    return _generic_routines(rows.z.shape[1], over_logits=True)[0](
        rows, with_logits_grad=with_logits_grad
    )


def gradient_routine_over_logits(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The generic sparse gradient routine writing the logits gradient over ``rows.z``."""
    if kernels.use_triton(rows.z):
        return _triton().gradient_routine_over_logits(
            rows, logits_grad=logits_grad, targets_grad=targets_grad
        )
    return _generic_routines(rows.z.shape[1], over_logits=True)[1](
        rows, logits_grad=logits_grad, targets_grad=targets_grad
    )


def _triton() -> ModuleType:
    """:mod:`softce_multi.kernels.triton_sparse`, imported on first use (it needs Triton)."""
    from softce_multi.kernels import triton_sparse

    return triton_sparse


@functools.cache
def _generic_routines(
    vocab_size: int, *, over_logits: bool
) -> tuple[_core.RowRoutine, _core.GradientRoutine]:
    """The routines of :mod:`softce_multi.kernels.sparse` for torch, over cache-sized blocks."""
    xp = torch_namespace
    block_rows = _core.default_block_rows(vocab_size)
    return (
        sparse.sparse_row_routine(block_rows, xp=xp, over_logits=over_logits),
        sparse.sparse_gradient_routine(block_rows, xp=xp, over_logits=over_logits),
    )


@torch.library.custom_op("softce_multi::sparse_row_routine", mutates_args=())
def sparse_row_routine(
    z: Tensor,
    ids: Tensor,
    p: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    with_logits_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The row routine of sparse targets: ``[N, V]`` logits, ``[N, K]`` ids and targets.

    Returns the ``[N]`` weighted losses and three :class:`~softce_multi._core.SavedRows`, and
    the ``[N, V]`` logits gradient (``[0, V]`` when not asked for), as the dense row operators
    do (:func:`softce_multi.kernels.empty_row_outputs`).
    """
    xp = torch_namespace
    results = sparse.sparse_row_pass(
        z,
        ids,
        p,
        weights,
        row_scale,
        with_logits_grad=with_logits_grad,
        block_rows=_core.default_block_rows(z.shape[1]),
        over_logits=False,
        xp=xp,
        run_blocks=torch_cpu_blocks.run_blocks,
        populate=torch_cpu_blocks.populate,
    )
    grad = results.logits_grad
    if grad is None:
        grad = z.new_empty((0, z.shape[1]))
    return (results.weighted, *results.saved, grad)


@torch.library.custom_op("softce_multi::sparse_gradient_routine", mutates_args=())
def sparse_gradient_routine(
    z: Tensor,
    ids: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The gradient routine of sparse targets: the ``[N, V]`` logits gradient and the
    ``[N, K]`` targets gradient, each ``[0, ...]`` when not asked for."""
    routine = _generic_routines(z.shape[1], over_logits=False)[1]
    rows = _core.BackwardRows(
        z, p, _core.SavedRows(row_max, log_sum_exp, target_sum), row_scale, ids
    )
    grad_z, grad_p = routine(rows, logits_grad=logits_grad, targets_grad=targets_grad)
    return (
        z.new_empty((0, z.shape[1])) if grad_z is None else grad_z,
        p.new_empty((0, p.shape[1])) if grad_p is None else grad_p,
    )


@sparse_row_routine.register_fake
def _row_fake(
    z: Tensor, ids: Tensor, p: Tensor, weights: Tensor, row_scale: Tensor, with_logits_grad: bool
) -> tuple[Tensor, ...]:
    return kernels.empty_row_outputs(z, weights, with_logits_grad=with_logits_grad)


@sparse_gradient_routine.register_fake
def _gradient_fake(
    z: Tensor,
    ids: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor, Tensor]:
    n_rows = z.shape[0]
    return (
        z.new_empty((n_rows if logits_grad else 0, z.shape[1])),
        p.new_empty((n_rows if targets_grad else 0, p.shape[1])),
    )


sparse_row_routine.register_vmap(kernels.folded_batch_rule(sparse_row_routine, n_tensors=5))
sparse_gradient_routine.register_vmap(
    kernels.folded_batch_rule(sparse_gradient_routine, n_tensors=7)
)
