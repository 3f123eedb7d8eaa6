"""The loss and its gradients (``with_grad``, torch autograd, ``jax.vjp``) against the float64
oracle, on every backend, for every ``num_valid``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from softce_multi.testing import REDUCTIONS, Backend

from .strategies import (
    LOSS_DIMENSIONS,
    NUM_VALID,
    NumValid,
    assert_gradient_agrees,
    assert_loss_agrees,
    assert_zero_at_padding,
    call,
    each_backend,
    expected_loss,
    fuzz,
    jax_gradients,
    loss_of,
    loss_values,
    loss_with_count,
    loss_with_grad_with_count,
    needs_autodiff,
    on_backend,
    on_each,
    oracle_terms,
    seed_st,
    structures,
    target_mass,
    torch_gradients,
    with_grad_of,
)

# NumPy warns of the NaN and infinities in padding; they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@fuzz
@given(
    data=st.data(),
    structure=structures("loss", **LOSS_DIMENSIONS, reduction=REDUCTIONS, positional=(0, 1, 2, 3)),
)
def test_loss_agrees_with_the_oracle_on_every_backend(data: Any, structure: dict) -> None:
    inputs = data.draw(loss_values(structure))
    reduction, dtype = structure["reduction"], inputs.compute_dtype
    positional = structure["positional"]

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        loss = call(backend, loss_of, *args, positional=positional, reduction=reduction)
        expected = expected_loss(inputs, *args, reduction=reduction)
        mass = target_mass(*args[1:], inputs.padding, reduction=reduction)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)

    on_each(each_backend(*inputs.dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "num_valid", **LOSS_DIMENSIONS, num_valid=NUM_VALID, positional=(0, 1, 2, 3)
    ),
)
def test_num_valid_is_the_denominator_of_the_mean_on_every_backend(
    data: Any, structure: dict
) -> None:
    inputs = data.draw(loss_values(structure))
    num_valid: NumValid = structure["num_valid"]
    dtype, positional = inputs.compute_dtype, structure["positional"]

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        count = num_valid.build(backend)
        if num_valid.kind == "array":
            loss = call(backend, loss_with_count, *args, count, positional=positional)
        else:
            loss = call(backend, loss_of, *args, positional=positional, num_valid=count)
        expected = expected_loss(inputs, *args, num_valid=num_valid.value)
        mass = target_mass(*args[1:], inputs.padding, num_valid=num_valid.value)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)

    on_each(each_backend(*inputs.dtypes, *num_valid.dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "with_grad",
        **LOSS_DIMENSIONS,
        reduction=("mean", "sum"),
        num_valid=NUM_VALID,
        positional=(0, 1, 2, 3),
    ),
)
def test_loss_with_grad_agrees_with_the_oracle_on_every_backend(data: Any, structure: dict) -> None:
    inputs = data.draw(loss_values(structure))
    reduction, dtype = structure["reduction"], inputs.compute_dtype
    num_valid = structure["num_valid"] if reduction == "mean" else NumValid(None, "none")
    options = {"positional": structure["positional"], "reduction": reduction}

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        count = num_valid.build(backend)
        if num_valid.kind == "array":
            result = call(backend, loss_with_grad_with_count, *args, count, **options)
        else:
            result = call(backend, with_grad_of, *args, num_valid=count, **options)
        loss, grad = result
        expected = expected_loss(inputs, *args, reduction=reduction, num_valid=num_valid.value)
        mass = target_mass(
            *args[1:], inputs.padding, reduction=reduction, num_valid=num_valid.value
        )
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)
        terms = oracle_terms(inputs, *args, reduction=reduction, num_valid=num_valid.value)
        assert_gradient_agrees(
            grad,
            expected.grad_logits,
            dtype,
            terms=terms,
            backend=backend,
            dtype=inputs.logits_dtype,
        )
        assert_zero_at_padding(grad, inputs.padding)

    on_each(each_backend(*inputs.dtypes, *num_valid.dtypes), check)


@needs_autodiff
@fuzz
@given(
    data=st.data(),
    structure=structures(
        "autodiff", **LOSS_DIMENSIONS, reduction=REDUCTIONS, positional=(0, 1, 2, 3)
    ),
    seed=seed_st,
)
def test_autodiff_gradients_agree_with_the_oracle(data: Any, structure: dict, seed: int) -> None:
    # -inf logits would give +inf target gradients: finite logits at valid positions only.
    inputs = data.draw(loss_values(structure, minus_inf=False))
    reduction, dtype = structure["reduction"], inputs.compute_dtype
    shape = inputs.logits.shape[:-1] if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape)
    options = {"positional": structure["positional"], "reduction": reduction}

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        if backend.library == "torch":
            loss, *grads = torch_gradients(args, upstream, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            loss, *grads = call(backend, jax_gradients, *args, cotangent, **options)
        expected = expected_loss(inputs, *args, reduction=reduction, upstream=upstream)
        mass = target_mass(*args[1:], inputs.padding, reduction=reduction)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)
        terms = oracle_terms(inputs, *args, reduction=reduction, upstream=upstream)
        desired = (expected.grad_logits, expected.grad_targets)
        for grad, want, grad_dtype in zip(grads, desired, inputs.dtypes[:2], strict=True):
            assert_gradient_agrees(
                grad, want, dtype, terms=terms, backend=backend, dtype=grad_dtype
            )
            assert_zero_at_padding(grad, inputs.padding)

    on_each(each_backend(*inputs.dtypes, autodiff=True), check)
