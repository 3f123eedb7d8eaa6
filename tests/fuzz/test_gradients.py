"""Gradients of the loss beyond the first: 16-bit logits gradients for upstream gradients other
than 1 are rounded once; a gradient penalty's derivatives and hessians are exactly 0 at padding
and the float64 ones elsewhere."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from softce_multi.testing import (
    REDUCTIONS,
    Backend,
    assert_gradient_rounded_once,
    dtype_name,
    to_float64,
)

from .strategies import (
    EPS,
    LARGEST,
    LOSS_DIMENSIONS,
    SECOND_ORDER_LIBRARIES,
    SMALLEST_SPACING,
    LossInputs,
    assert_within,
    assert_zero_at_padding,
    call,
    each_backend,
    few,
    jax_gradients,
    largest_term,
    loss_of,
    loss_values,
    needs_torch,
    on_backend,
    on_each,
    row_scale,
    seed_st,
    squared_norm,
    structures,
    torch_gradients,
    unpadded,
    upstreams,
)

# NumPy warns of the NaN and infinities in padding; they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@needs_torch
@few
@given(
    data=st.data(),
    structure=structures(
        "rounded_once",
        **{**LOSS_DIMENSIONS, "logits": ("bfloat16", "float16")},
        reduction=REDUCTIONS,
        num_valid=(None, 3, 0.5, 1000),
        positional=(0, 1, 2, 3),
    ),
)
def test_16_bit_logits_gradients_are_rounded_once_for_any_upstream(
    data: Any, structure: dict
) -> None:
    """Whatever the upstream gradient, the bfloat16 or float16 logits gradient of torch autograd
    and of ``jax.vjp`` is rounded to its dtype once, from float32: no further from the float64
    gradient than the plain float32 formula's (:func:`~softce_multi.testing.
    assert_gradient_rounded_once`). A gradient made for an upstream of 1 and multiplied by the
    upstream in 16 bits is rounded twice, about half a unit further."""
    # Finite logits at valid positions: a -inf logit has a NaN float64 gradient in the oracle.
    inputs = data.draw(loss_values(structure, minus_inf=False))
    reduction = structure["reduction"]
    options = {
        "reduction": reduction,
        "num_valid": structure["num_valid"] if reduction == "mean" else None,
    }
    upstream = data.draw(upstreams(inputs.padding.shape if reduction == "none" else ()))

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        positional = structure["positional"]
        if backend.library == "torch":
            _, grad, _ = torch_gradients(args, upstream, positional=positional, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            _, grad, _ = call(
                backend, jax_gradients, *args, cotangent, positional=positional, **options
            )
        assert_zero_at_padding(grad, inputs.padding)
        logits, targets = (
            unpadded(backend, inputs.padding, array, dtype)
            for array, dtype in zip(args[:2], inputs.dtypes[:2], strict=True)
        )
        assert_gradient_rounded_once(grad, logits, targets, args[2], upstream=upstream, **options)

    on_each(each_backend(*inputs.dtypes, autodiff=True), check)


class SecondOrderOracle(NamedTuple):
    """Float64 values of the loss's rows, from which the rounding of a second derivative is
    bounded: rows ``[N, V]`` of the inputs the backend holds, padding replaced by zeros."""

    softmax: np.ndarray  # [N, V]
    reach: np.ndarray  # [N, V]: the softmax, and 1 at a row's largest logits
    curvature: np.ndarray  # [N, 1]: |w / den * upstream * sum(p)|, the size of the hessian
    gradient: np.ndarray  # [N, 1]: the largest entry of the logits gradient g
    terms: np.ndarray  # [N, 1]: the largest term of g (:func:`largest_term`)


def second_order_oracle(
    inputs: LossInputs, args: tuple[Any, Any, Any], upstream: np.ndarray, *, reduction: str
) -> SecondOrderOracle:
    padding = inputs.padding[..., None]
    vocab = inputs.logits.shape[-1]
    z = np.where(padding, 0.0, to_float64(args[0]))
    p = np.where(padding, 0.0, to_float64(args[1]))
    w = to_float64(args[2])
    options = {"reduction": reduction, "upstream": upstream}
    terms = np.reshape(largest_term(z, p, w, **options), (-1, vocab))
    scale = np.reshape(row_scale(w, inputs.padding.shape, **options), (-1, 1))
    z, p = np.reshape(z, (-1, vocab)), np.reshape(p, (-1, vocab))
    row_max = z.max(axis=-1, keepdims=True, initial=-np.inf)
    shifted = np.exp(z - row_max)
    softmax = shifted / shifted.sum(axis=-1, keepdims=True)
    target_sum = p.sum(axis=-1, keepdims=True)
    gradient = scale * np.abs(target_sum * softmax - p)
    return SecondOrderOracle(
        softmax,
        np.maximum(softmax, z == row_max),
        scale * np.abs(target_sum),
        np.max(gradient, axis=-1, keepdims=True, initial=0.0),
        np.max(terms, axis=-1, keepdims=True, initial=0.0),
    )


def torch_penalty_gradient(args: tuple[Any, Any, Any], upstream: np.ndarray, **options: Any) -> Any:
    """The derivative to the logits of the gradient penalty ``sum(g ** 2)``, ``g`` the logits
    gradient for the upstream gradient ``upstream``, by torch autograd (``create_graph``)."""
    import torch

    logits = args[0].requires_grad_(True)
    loss = loss_of(*args, **options)
    cotangent = torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device)
    (grad,) = torch.autograd.grad(loss, logits, cotangent, create_graph=True)
    (second,) = torch.autograd.grad(squared_norm(grad), logits)
    return second


def jax_penalty_gradient(
    logits: Any, targets: Any, mask: Any, upstream: Any, **options: Any
) -> Any:
    """As :func:`torch_penalty_gradient`, by ``jax.grad`` of a function of ``jax.vjp``."""
    import jax

    def gradient(z: Any) -> Any:
        loss, pullback = jax.vjp(lambda z: loss_of(z, targets, mask, **options), z)
        return pullback(upstream.astype(loss.dtype))[0]

    return jax.grad(lambda z: squared_norm(gradient(z)))(logits)


def penalty_oracle(
    inputs: LossInputs, args: tuple[Any, Any, Any], upstream: np.ndarray, *, reduction: str
) -> np.ndarray:
    """:func:`torch_penalty_gradient` of the reference formula in float64, for the values the
    backend holds, padding replaced by zeros."""
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    padding = inputs.padding[..., None]
    z = torch.tensor(np.where(padding, 0.0, to_float64(args[0])), requires_grad=True)
    p = torch.tensor(np.where(padding, 0.0, to_float64(args[1])))
    loss = masked_soft_cross_entropy(z, p, torch.tensor(to_float64(args[2])), reduction=reduction)
    cotangent = torch.as_tensor(upstream).expand_as(loss)
    (grad,) = torch.autograd.grad(loss, z, cotangent, create_graph=True)
    (second,) = torch.autograd.grad((grad**2).sum(), z, allow_unused=True, materialize_grads=True)
    return second.numpy()


def penalty_bound(oracle: SecondOrderOracle, desired: np.ndarray, inputs: LossInputs) -> Any:
    """How far the derivative of the penalty may be from the float64 one, entry by entry.

    It is ``2 H g``, with ``H = r * sum(p) * (diag(s) - s s^T)`` the hessian of a row. Row
    ``v`` of ``H`` is ``s_v`` times the curvature, so ``2 (H e)_v`` is at most ``4 s_v`` times
    the curvature times the largest error of ``e``: an error of ``g`` (half a unit of the
    logits' dtype, and 8 roundings of its terms in the computation's), or of ``H`` (16
    roundings, of ``s_v``, and of 1 at the largest logit, where the derivative of the row's
    maximum cancels). Then the result is rounded to the logits' dtype.
    """
    compute, dtype = EPS[inputs.compute_dtype], EPS[inputs.logits_dtype]
    spacing = SMALLEST_SPACING[inputs.logits_dtype]
    g_error = dtype / 2 * oracle.gradient + 8 * compute * oracle.terms + spacing / 2
    per_row = oracle.curvature * (4 * g_error + 32 * compute * oracle.gradient)
    bound = np.reshape(oracle.reach * per_row, desired.shape)
    return bound + dtype * np.abs(desired) + spacing


def second_order_inputs(
    data: Any, structure: dict, library: str
) -> tuple[LossInputs, list[Backend]]:
    """Loss values for ``structure``, and the backends of ``library`` for them."""
    pytest.importorskip(library)
    # Finite logits at valid positions: a -inf logit has a NaN float64 gradient in the oracle.
    inputs = data.draw(loss_values(structure, minus_inf=False))
    chosen = [b for b in each_backend(*inputs.dtypes, autodiff=True) if b.library == library]
    assume(chosen)
    return inputs, chosen


@needs_torch
@pytest.mark.parametrize("library", SECOND_ORDER_LIBRARIES)
@few
@given(
    data=st.data(),
    structure=structures(
        "penalty",
        **LOSS_DIMENSIONS,
        reduction=REDUCTIONS,
        positional=(0, 1, 2, 3),
    ),
    seed=seed_st,
)
def test_gradient_penalty_derivatives_are_zero_at_padding_and_agree_with_the_oracle(
    library: str, data: Any, structure: dict, seed: int
) -> None:
    """The derivative of a gradient penalty ``sum(g ** 2)`` (``g`` the logits gradient, by torch
    autograd with ``create_graph`` or ``jax.vjp`` under ``jax.grad``) is finite, exactly 0 at
    every padding position whatever NaN or inf it holds, and the float64 one elsewhere."""
    inputs, chosen = second_order_inputs(data, structure, library)
    reduction = structure["reduction"]
    shape = inputs.padding.shape if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape).astype(np.float32)
    options = {"positional": structure["positional"], "reduction": reduction}

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        desired = penalty_oracle(inputs, args, upstream, reduction=reduction)
        # float16 holds no derivative beyond 65504 (of unnormalised targets of a large
        # vocabulary); the oracle's is the same on every backend.
        assume(np.max(np.abs(desired), initial=0.0) <= LARGEST[inputs.logits_dtype] / 2)
        if backend.library == "torch":
            second = torch_penalty_gradient(args, upstream, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            second = call(backend, jax_penalty_gradient, *args, cotangent, **options)
        assert dtype_name(second) == inputs.logits_dtype, f"dtype {dtype_name(second)}"
        assert np.isfinite(to_float64(second)).all(), "a derivative that is not finite"
        assert_zero_at_padding(second, inputs.padding)
        oracle = second_order_oracle(inputs, args, upstream, reduction=reduction)
        bound = penalty_bound(oracle, desired, inputs)
        assert_within(second, desired, bound, backend=backend)

    on_each(chosen, check)


#: Logits shapes of at most 42 entries, whose hessians are small; none empty, which
#: torch.autograd.functional.hessian cannot stack (the penalty's test has empty axes).
HESSIAN_SHAPES = ((7,), (1, 1), (4, 1), (3, 2), (1, 5), (2, 3, 7), (5, 4))


def torch_hessian(args: tuple[Any, Any, Any], upstream: np.ndarray, **options: Any) -> Any:
    """The hessian to the logits of ``sum(upstream * loss)`` by
    :func:`torch.autograd.functional.hessian` (reverse mode over reverse mode)."""
    import torch

    logits, targets, mask = args

    def weighted_loss(z: Any) -> Any:
        loss = loss_of(z, targets, mask, **options)
        return (torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device) * loss).sum()

    return torch.autograd.functional.hessian(weighted_loss, logits)


def jax_hessian(logits: Any, targets: Any, mask: Any, upstream: Any, **options: Any) -> Any:
    """As :func:`torch_hessian`, by ``jax.hessian`` (forward mode over reverse mode)."""
    import jax

    def weighted_loss(z: Any) -> Any:
        loss = loss_of(z, targets, mask, **options)
        return jax.numpy.sum(upstream.astype(loss.dtype) * loss)

    return jax.hessian(weighted_loss)(logits)


def hessian_oracle(
    inputs: LossInputs, args: tuple[Any, Any, Any], upstream: np.ndarray, *, reduction: str
) -> np.ndarray:
    """:func:`torch_hessian` of the reference formula in float64, for the values the backend
    holds, padding replaced by zeros."""
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    padding = inputs.padding[..., None]
    z = torch.tensor(np.where(padding, 0.0, to_float64(args[0])))
    p = torch.tensor(np.where(padding, 0.0, to_float64(args[1])))
    w = torch.tensor(to_float64(args[2]))

    def weighted_loss(z: Any) -> Any:
        loss = masked_soft_cross_entropy(z, p, w, reduction=reduction)
        return (torch.as_tensor(upstream) * loss).sum()

    return torch.autograd.functional.hessian(weighted_loss, z).numpy()


@needs_torch
@pytest.mark.parametrize("library", SECOND_ORDER_LIBRARIES)
@few
@given(
    data=st.data(),
    structure=structures(
        "hessian",
        **{**LOSS_DIMENSIONS, "shape": HESSIAN_SHAPES},
        reduction=REDUCTIONS,
        positional=(0, 1, 2, 3),
    ),
    seed=seed_st,
)
def test_hessians_are_zero_at_padding_and_agree_with_the_oracle(
    library: str, data: Any, structure: dict, seed: int
) -> None:
    """The hessian to the logits (torch's reverse over reverse mode, ``jax.hessian``'s forward
    over reverse mode) is finite, exactly 0 in every row and column of a padding position
    whatever it holds, and the float64 hessian elsewhere: each entry ``(v, u)`` within 16
    roundings of the computation's dtype of the row's curvature times the larger of ``s_v`` and
    ``s_u`` (see :func:`penalty_bound`), then rounded to the logits' dtype."""
    inputs, chosen = second_order_inputs(data, structure, library)
    reduction = structure["reduction"]
    shape = inputs.padding.shape if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape).astype(np.float32)
    options = {"positional": structure["positional"], "reduction": reduction}
    positions, vocab = math.prod(inputs.padding.shape), inputs.logits.shape[-1]
    padding = np.reshape(inputs.padding, -1)
    square = (positions, vocab, positions, vocab)

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        if backend.library == "torch":
            hessian = torch_hessian(args, upstream, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            hessian = call(backend, jax_hessian, *args, cotangent, **options)
        assert dtype_name(hessian) == inputs.logits_dtype, f"dtype {dtype_name(hessian)}"
        values = np.reshape(to_float64(hessian), square)
        assert np.isfinite(values).all(), "a hessian entry that is not finite"
        assert (values[padding] == 0).all(), "a padding row of the hessian is not exactly 0"
        assert (values[:, :, padding] == 0).all(), "a padding column of the hessian is not 0"
        desired = hessian_oracle(inputs, args, upstream, reduction=reduction)
        oracle = second_order_oracle(inputs, args, upstream, reduction=reduction)
        # A row's block is its curvature times s s^T (and diag(s)); the other blocks are 0.
        block = np.maximum(oracle.reach[:, :, None], oracle.reach[:, None, :])
        bound = np.zeros(square)
        rows = np.arange(positions)
        bound[rows, :, rows, :] = (
            16 * EPS[inputs.compute_dtype] * oracle.curvature[..., None] * block
        )
        dtype = inputs.logits_dtype
        bound = np.reshape(bound, desired.shape) + EPS[dtype] * np.abs(desired)
        bound += SMALLEST_SPACING[dtype]
        assert_within(hessian, desired, bound, backend=backend)

    on_each(chosen, check)
