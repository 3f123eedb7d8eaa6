"""Optional accelerated kernels, behind the routines of :func:`softce_multi._core.loss_pass`.

* :mod:`softce_multi.kernels.triton`: Triton kernels for torch tensors on a CUDA device, run as
  the ``torch.library`` operators ``softce_multi::triton_row_routine`` and
  ``softce_multi::triton_gradient_routine``.
* :mod:`softce_multi.kernels.pallas`: Pallas kernels, for its Triton backend, for JAX arrays on
  a GPU (traceable: they work under ``jax.jit`` and ``jax.vmap``).
* :mod:`softce_multi.kernels.numpy`: the core's row routine in place on cache-sized blocks, for
  NumPy arrays (the generic adapter runs it; array-api-strict and CuPy keep the core).
* :mod:`softce_multi.kernels.xla`: the core's routines chunk by chunk of rows, for JAX arrays
  on XLA (CPU, TPU), so that the compiled step has no ``[N, V]`` temporary.

Each module needs its library; importing this package needs neither. The adapters ask
:func:`use_triton` and :func:`use_pallas` whether a kernel applies to their arrays. Each module
offers a :class:`~softce_multi._core.RowRoutine`, ``row_routine`` (the loss, the saved per-row
statistics and optionally the logits gradient), and a
:class:`~softce_multi._core.GradientRoutine`, ``gradient_routine`` (the gradients to the logits
and/or the targets, recomputed from the saved statistics, as the ``"none"`` reduction and the
targets gradient need). Each GPU routine runs one kernel. What follows is the one description
of the algorithm that both GPU modules implement; the CPU modules describe themselves.

**The grid.** One program per row (one position). A program walks the row's ``V`` entries in
chunks of ``block_size`` entries, a power of two (``min(next_pow2(V), 4096)`` by default, see
:func:`launch_config`), so any vocabulary works, without padding or copying the inputs.

**The forward kernel.** One sweep computes the row statistics of
:func:`softce_multi._core.row_statistics` with an online maximum ``m``: the running sums
``s = sum_v exp(z_v - m)`` and ``d = sum_v p_v (z_v - m)`` move to a new maximum ``m'`` as
``s * exp(m - m')`` and ``d + (m - m') * sum_v p_v``, and a term with ``p_v == 0`` adds exactly
0, even where ``z_v`` is -inf. The program writes ``w * c`` and what a backward pass needs of
the row (:class:`softce_multi._core.SavedRows`): ``m`` (0 where it is not finite), ``log s`` and
``sum_v p_v``. With the gradient asked for, a second sweep over the same row writes
``row_scale * (sum(p) * softmax(z) - p)`` in the logits' dtype. It walks the chunks from the
last one, which the first sweep (whose loads carry an ``evict_last`` hint) has just brought into
the cache, so that the row comes from L2 while the rows in flight fit there.

**The backward kernel.** One sweep per row reads the logits (and the targets, for the logits
gradient) and the row's saved statistics, and writes ``r * (sum(p) * softmax(z) - p)`` and/or
``-r * log_softmax(z)``, with ``r`` the row scale times the upstream gradient; both in one sweep
when both are asked for.

**Accuracy.** The log-normalizer is ``m + log s``, but it is never formed: the kernels take the
softmax as ``exp(z - m)`` times the row's coefficient ``r * sum(p) * exp(-log s)``, and the
log-softmax as ``(z - m) - log s``, which stay accurate for logits far from 0. Rounding a
float32 log-normalizer near 1000 moves it by up to ``3e-5``, a relative error that
``exp(z - (m + log s))`` would carry into every gradient entry; and ``z - m`` is exact, so each
softmax entry carries the rounding of one exponential, not that of ``(z - m) - log s`` too (up
to ``|log_softmax(z)|`` float32 roundings, which is what a 16-bit gradient's rounding sees where
``sum(p) * softmax(z)`` and ``p`` nearly cancel). The upstream gradient is inside ``r``, so a
16-bit gradient is rounded once, from float32.

**Padding costs nothing.** A row of weight 0 (forward) or scale 0 (backward) is not read at
all: its outputs are written as zeros, whatever NaN or inf it holds, and its saved statistics
are 0 (no backward pass reads them).

**Nothing waits on the host.** The weights, the denominator of ``"mean"`` (a ``num_valid``
given as a 0-d array included) and the final sum are small array operations of the core's
driver on the device; shapes never depend on values. The computation is float32, or float64
when either input is float64; the gradients come back in the dtype of the input they belong to,
and the inputs are never written.

**Torch operators.** The torch path runs its routines as ``torch.library`` operators: those of
:mod:`softce_multi.kernels.triton` and those of :mod:`softce_multi.kernels.torch_cpu` for the CPU.
Both pairs take the same tensors, ``(z, p, weights, row_scale, with_logits_grad, *options)`` and
``(z, p, row_max, log_sum_exp, target_sum, row_scale, logits_grad, targets_grad, *options)``,
and return the same outputs; so do the two operators of each module that write the logits
gradient over the logits. The helpers at the end of this module are their common parts:
outputs of the right shapes (:func:`empty_row_outputs`, :func:`empty_row_statistics`,
:func:`empty_gradient_outputs`), the fake implementations and the vmap rules that fold the
batch into the rows (:func:`register_operator_rules`), and the calls of the operators as the
core's routines (:func:`run_row_operator`, :func:`run_row_operator_over_logits`,
:func:`run_gradient_operator`, :func:`run_gradient_operator_over_logits`). They use only tensor
methods, so this package still imports no library.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

from softce_multi import _chunks, _core

__all__ = [
    "empty_gradient_outputs",
    "empty_row_outputs",
    "empty_row_statistics",
    "folded_batch_rule",
    "jax_platforms",
    "launch_config",
    "register_operator_rules",
    "run_gradient_operator",
    "run_gradient_operator_over_logits",
    "run_row_operator",
    "run_row_operator_over_logits",
    "use_pallas",
    "use_triton",
]

#: The largest chunk of a row that one kernel step loads.
MAX_BLOCK_SIZE = 4096


def use_triton(*tensors: Any) -> bool:
    """Return whether the Triton kernels can run on these torch tensors.

    True when every tensor is on a CUDA (or ROCm) device and Triton is installed.
    """
    return all(tensor.is_cuda for tensor in tensors) and _installed("triton")


def use_pallas(*arrays: Any) -> bool:
    """Return whether the Pallas kernels can run on these JAX arrays.

    True when the arrays live on GPUs (under a trace, where arrays carry no device: when JAX's
    default backend is the GPU), none is split over devices in its type (XLA's partitioner
    cannot split a kernel call; :func:`softce_multi._chunks.split_over_devices`) or has a
    symbolic shape (a kernel's grid is a number; :func:`softce_multi._chunks.is_static`), and
    this JAX has the Triton backend of Pallas.
    """
    if any(
        _chunks.split_over_devices(array) or not _chunks.is_static(*array.shape) for array in arrays
    ):
        return False
    return jax_platforms(*arrays) == {"gpu"} and _installed("jax.experimental.pallas.triton")


def jax_platforms(*arrays: Any) -> set[str]:
    """The platforms (``"cpu"``, ``"gpu"``, ``"tpu"``) of the devices of these JAX arrays; for an
    array under a trace, which carries no device, JAX's default backend."""
    import jax

    platforms = set()
    for array in arrays:
        if isinstance(array, jax.core.Tracer):
            platforms.add(jax.default_backend())
        else:
            platforms.update(device.platform for device in array.devices())
    return platforms


@functools.cache
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def launch_config(n_cols: int, block_size: int | None) -> tuple[int, int]:
    """Return the chunk size and the number of warps for rows of ``n_cols`` entries.

    By default the chunk is the next power of two of ``n_cols``, at most :data:`MAX_BLOCK_SIZE`.
    """
    if block_size is None:
        block_size = min(1 << max(n_cols - 1, 0).bit_length(), MAX_BLOCK_SIZE)
    if block_size < 1 or block_size & (block_size - 1):
        msg = f"block_size must be a positive power of two, got {block_size}"
        raise ValueError(msg)
    return block_size, 4 if block_size < 2048 else min(32, max(8, block_size // 512))


# --------------------------------------------------------------------------------------------
# Common parts of the torch operators
# --------------------------------------------------------------------------------------------


def empty_row_outputs(z: Any, weights: Any, *, with_logits_grad: bool) -> tuple[Any, ...]:
    """Uninitialised outputs of a torch row-routine operator, for ``[N, V]`` logits ``z``.

    The weighted losses and the three :class:`~softce_multi._core.SavedRows`, ``[N]`` each in
    the computation dtype (that of the ``[N]`` ``weights``), then the logits gradient: ``[N, V]``
    in the logits' dtype, or ``[0, V]`` when it is not asked for (an operator returns tensors
    only). All contiguous, on the logits' device.
    """
    n_rows, n_cols = z.shape
    return (
        *empty_row_statistics(z, weights),
        z.new_empty((n_rows if with_logits_grad else 0, n_cols)),
    )


def empty_row_statistics(z: Any, weights: Any) -> tuple[Any, Any, Any, Any]:
    """The four ``[N]`` outputs of :func:`empty_row_outputs`, without the logits gradient: the
    outputs of a row operator that writes the gradient over ``z``."""
    n_rows = z.shape[0]
    return (
        weights.new_empty(n_rows),
        weights.new_empty(n_rows),
        weights.new_empty(n_rows),
        weights.new_empty(n_rows),
    )


def empty_gradient_outputs(
    z: Any, p: Any, *, logits_grad: bool, targets_grad: bool
) -> tuple[Any, Any]:
    """Uninitialised outputs of a torch gradient-routine operator, for ``[N, V]`` ``z`` and ``p``.

    The logits gradient in the logits' dtype and the targets gradient in the targets' dtype,
    each ``[N, V]`` if asked for, else ``[0, V]``.
    """
    n_rows, n_cols = z.shape
    return (
        z.new_empty((n_rows if logits_grad else 0, n_cols)),
        p.new_empty((n_rows if targets_grad else 0, n_cols)),
    )


def run_row_operator(
    operator: Callable[..., Sequence[Any]],
    rows: _core.Rows,
    /,
    *options: Any,
    with_logits_grad: bool,
) -> _core.RowResults:
    """Run a row-routine operator on ``rows`` and return its outputs as the core's results.

    Parameters
    ----------
    operator : callable
        ``operator(z, p, weights, row_scale, with_logits_grad, *options)``, returning the
        outputs of :func:`empty_row_outputs`, filled.
    rows : softce_multi._core.Rows
        The rows to work on.
    *options
        The operator's own trailing arguments (the Triton chunk size).
    with_logits_grad : bool
        Whether the operator writes the logits gradient.

    Returns
    -------
    softce_multi._core.RowResults
        The weighted losses, the saved statistics, and the logits gradient or None.
    """
    outputs = operator(
        rows.z, rows.p, rows.weights, _core.row_scale(rows), with_logits_grad, *options
    )
    weighted, row_max, log_sum_exp, target_sum, grad = outputs
    saved = _core.SavedRows(row_max, log_sum_exp, target_sum)
    return _core.RowResults(weighted, saved, grad if with_logits_grad else None)


def run_row_operator_over_logits(
    operator: Callable[..., Sequence[Any]], rows: _core.Rows, /, *options: Any
) -> _core.RowResults:
    """Run an in-place row operator, which writes the logits gradient over ``rows.z``.

    ``operator(z, p, weights, row_scale, *options)`` returns the outputs of
    :func:`empty_row_statistics`, filled; the logits gradient of the results is ``rows.z``.
    """
    weighted, *saved = operator(rows.z, rows.p, rows.weights, _core.row_scale(rows), *options)
    return _core.RowResults(weighted, _core.SavedRows(*saved), rows.z)


def run_gradient_operator(
    operator: Callable[..., Sequence[Any]],
    rows: _core.BackwardRows,
    /,
    *options: Any,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[Any, Any]:
    """Run a gradient-routine operator on ``rows``; None for a gradient not asked for.

    ``operator(z, p, row_max, log_sum_exp, target_sum, row_scale, logits_grad, targets_grad,
    *options)`` returns the outputs of :func:`empty_gradient_outputs`, filled.
    """
    grad_z, grad_p = operator(
        rows.z, rows.p, *rows.saved, rows.row_scale, logits_grad, targets_grad, *options
    )
    return (grad_z if logits_grad else None, grad_p if targets_grad else None)


def run_gradient_operator_over_logits(
    operator: Callable[..., Any], rows: _core.BackwardRows, /, *options: Any, targets_grad: bool
) -> tuple[Any, Any]:
    """Run an in-place gradient operator, which writes the logits gradient over ``rows.z``.

    ``operator(z, p, row_max, log_sum_exp, target_sum, row_scale, targets_grad, *options)``
    returns the targets gradient (``[0, V]`` when not asked for). Returns ``rows.z`` and the
    targets gradient or None.
    """
    grad_p = operator(rows.z, rows.p, *rows.saved, rows.row_scale, targets_grad, *options)
    return rows.z, (grad_p if targets_grad else None)


def register_operator_rules(
    row_operator: Any,
    gradient_operator: Any,
    row_operator_over_logits: Any,
    gradient_operator_over_logits: Any,
    *,
    check_options: Callable[..., None] = lambda z, *options: None,
) -> None:
    """Register the fakes of two pairs of torch routine operators, and the vmap rules of one.

    Parameters
    ----------
    row_operator, gradient_operator
        The operators that return every output (the arguments of :func:`run_row_operator` and
        :func:`run_gradient_operator`).
    row_operator_over_logits, gradient_operator_over_logits
        Those that write the logits gradient over the logits (the arguments of
        :func:`run_row_operator_over_logits` and :func:`run_gradient_operator_over_logits`).
    check_options : callable, optional
        ``check_options(z, *options)`` raises what the operators raise for bad trailing
        options; the fakes call it first.

    Notes
    -----
    The fakes return :func:`empty_row_outputs`, :func:`empty_gradient_outputs` and their parts.
    The vmap rules fold the batch into the rows (the rows are independent, so a batch of ``B``
    calls on ``N`` rows is one call on ``B * N`` rows) and split the outputs back.
    """

    def row_fake(
        z: Any, p: Any, weights: Any, row_scale: Any, with_logits_grad: bool, *options: Any
    ) -> tuple[Any, ...]:
        check_options(z, *options)
        return empty_row_outputs(z, weights, with_logits_grad=with_logits_grad)

    def row_over_logits_fake(
        z: Any, p: Any, weights: Any, row_scale: Any, *options: Any
    ) -> tuple[Any, ...]:
        check_options(z, *options)
        return empty_row_statistics(z, weights)

    def gradient_fake(z: Any, p: Any, *rest: Any) -> tuple[Any, Any]:
        logits_grad, targets_grad, *options = rest[_N_SAVED_AND_SCALE:]
        check_options(z, *options)
        return empty_gradient_outputs(z, p, logits_grad=logits_grad, targets_grad=targets_grad)

    def gradient_over_logits_fake(z: Any, p: Any, *rest: Any) -> Any:
        targets_grad, *options = rest[_N_SAVED_AND_SCALE:]
        check_options(z, *options)
        return empty_gradient_outputs(z, p, logits_grad=False, targets_grad=targets_grad)[1]

    row_operator.register_fake(row_fake)
    row_operator_over_logits.register_fake(row_over_logits_fake)
    gradient_operator.register_fake(gradient_fake)
    gradient_operator_over_logits.register_fake(gradient_over_logits_fake)
    row_operator.register_vmap(folded_batch_rule(row_operator, n_tensors=4))
    gradient_operator.register_vmap(
        folded_batch_rule(gradient_operator, n_tensors=2 + _N_SAVED_AND_SCALE)
    )


#: The tensors of a gradient operator between ``z, p`` and its flags: the three saved
#: statistics and the row scale.
_N_SAVED_AND_SCALE = len(_core.SavedRows._fields) + 1


def folded_batch_rule(operator: Callable[..., Any], *, n_tensors: int) -> Callable[..., Any]:
    """The vmap rule of an operator whose first ``n_tensors`` arguments are row tensors (its
    outputs too): the batch is folded into the rows, which are independent."""

    def rule(info: Any, in_dims: Sequence[int | None], *args: Any) -> tuple[Any, Any]:
        tensors = _fold_batch(info.batch_size, args[:n_tensors], in_dims[:n_tensors])
        return _unfold_batch(info.batch_size, operator(*tensors, *args[n_tensors:]))

    return rule


def _fold_batch(
    batch_size: int, tensors: Sequence[Any], in_dims: Sequence[int | None]
) -> list[Any]:
    """Each tensor with its batch axis first (expanded if it has none), merged with the rows."""
    folded = []
    for tensor, dim in zip(tensors, in_dims, strict=True):
        batched = (
            tensor.expand(batch_size, *tensor.shape) if dim is None else tensor.movedim(dim, 0)
        )
        folded.append(batched.flatten(0, 1))
    return folded


def _unfold_batch(
    batch_size: int, outputs: Sequence[Any]
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Split the rows of each output back into ``batch_size`` calls; ``[0, V]`` stays unbatched."""
    unfolded: list[Any] = []
    out_dims: list[int | None] = []
    for output in outputs:
        if output.shape[0] == 0:  # a gradient not asked for
            unfolded.append(output)
            out_dims.append(None)
        else:
            unfolded.append(output.unflatten(0, (batch_size, -1)))
            out_dims.append(0)
    return tuple(unfolded), tuple(out_dims)
