"""Types shared by every module of the package; this module imports nothing of the package."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

__all__ = [
    "REDUCTIONS",
    "Array",
    "LinearGradients",
    "LinearLossInputs",
    "LossInputs",
    "Namespace",
    "Reduction",
]

#: An array of any array-API library (NumPy, PyTorch, JAX, CuPy, array-api-strict).
Array = Any

#: An array-API namespace, as :func:`array_api_compat.array_namespace` returns it.
Namespace = Any

#: How the per-position losses are reduced.
Reduction = Literal["mean", "sum", "none"]

#: Every :data:`Reduction`, in the order the error messages list them.
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


class LossInputs(NamedTuple):
    """The arguments of :func:`softce_multi.masked_soft_cross_entropy`, as one record.

    The public functions validate it (:func:`softce_multi._validate.validate_inputs`) and hand
    it to an adapter's ``loss`` or ``loss_with_grad``.
    """

    logits: Array
    target_probs: Array
    position_mask: Array
    reduction: str
    num_valid: Array | float | None
    target_ids: Array | None = None
    """The ids of sparse targets, ``[..., K]`` integers; None for dense targets."""


class LinearLossInputs(NamedTuple):
    """The arguments of :func:`softce_multi.linear_masked_soft_cross_entropy`, as one record.

    Validated by :func:`softce_multi._validate.validate_linear_inputs` and handed to an
    adapter's ``linear_loss`` or ``linear_loss_with_grad``; ``chunk_rows`` is checked.
    """

    hidden: Array
    weight: Array
    bias: Array | None
    target_probs: Array
    position_mask: Array
    reduction: str
    num_valid: Array | float | None
    chunk_rows: int | None
    target_ids: Array | None = None
    """The ids of sparse targets, ``[..., K]`` integers; None for dense targets."""


class LinearGradients(NamedTuple):
    """The gradients of the linear loss to its three differentiable inputs."""

    hidden: Array
    """``d loss / d hidden``, in the shape and dtype of ``hidden``."""
    weight: Array
    """``d loss / d weight``, ``[V, H]`` in the dtype of ``weight``."""
    bias: Array | None
    """``d loss / d bias``, ``[V]`` in the dtype of ``bias``; None when there is no bias."""
