"""Parity with the reference formula, on every backend, dtype, shape, mask and reduction.

Each backend's result is compared with :mod:`softce_multi.reference` evaluated in float64 on the
exact values the backend received (bfloat16 and float16 inputs are rounded first).
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

import softce_multi as sc
from softce_multi.testing import (
    REDUCTIONS,
    assert_gradient_close,
    assert_loss_close,
    compute_dtype,
    dtype_name,
    is_installed,
    make_case,
    numpy_reference,
    random_inputs,
    reference,
    to_float64,
    to_numpy,
)

LOGITS_DTYPES = ["float64", "float32", "bfloat16", "float16"]
TARGET_DTYPES = ["float32", "float64"]
SHAPES = {
    "N,V": (5, 7),
    "B,T,V": (2, 3, 11),
    "V=1": (6, 1),
    "V=7": (4, 2, 7),
    "V=32000": (3, 4, 32000),  # 12 rows: more than one block of rows on eager backends
}


def _cases() -> list:
    """Every (logits dtype, target dtype) pair on [B, T, V]; the other shapes in three pairs."""
    pairs = [(logits, target) for logits in LOGITS_DTYPES for target in TARGET_DTYPES]
    cases = [(*pair, "B,T,V") for pair in pairs]
    for shape in SHAPES.keys() - {"B,T,V"}:
        cases += [
            (*pair, shape)
            for pair in [("float64", "float64"), ("float32", "float32"), ("bfloat16", "float32")]
        ]
    return [
        pytest.param(logits, target, SHAPES[shape], id=f"{logits}-{target}-{shape}")
        for logits, target, shape in sorted(cases)
    ]


CASES = _cases()
GRAD_REDUCTIONS = ["mean", "sum"]


def differentiate(backend, case, *, reduction="mean", num_valid=None, upstream=None):
    """Loss and (d/d logits, d/d target_probs) through the backend's own autodiff."""
    if backend.library == "torch":
        torch = pytest.importorskip("torch")
        logits = case.logits.clone().requires_grad_(True)
        targets = case.target_probs.clone().requires_grad_(True)
        loss = sc.masked_soft_cross_entropy(
            logits, targets, case.position_mask, reduction=reduction, num_valid=num_valid
        )
        cotangent = torch.ones_like(loss) if upstream is None else backend.asarray(upstream)
        loss.backward(cotangent.to(loss.dtype))
        return loss, logits.grad, targets.grad
    jax = pytest.importorskip("jax")

    def loss_of(logits, targets):
        return sc.masked_soft_cross_entropy(
            logits, targets, case.position_mask, reduction=reduction, num_valid=num_valid
        )

    loss, pullback = jax.vjp(loss_of, case.logits, case.target_probs)
    cotangent = jax.numpy.ones_like(loss) if upstream is None else backend.asarray(upstream)
    grad_logits, grad_targets = pullback(cotangent.astype(loss.dtype))
    return loss, grad_logits, grad_targets


# --------------------------------------------------------------------------------------------
# Loss and gradient values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("logits_dtype", "target_dtype", "shape"), CASES)
def test_loss_matches_reference(backend, logits_dtype, target_dtype, shape, reduction):
    rng = np.random.default_rng(0)
    case = make_case(backend, rng, shape, logits_dtype=logits_dtype, target_dtype=target_dtype)
    expected = reference(case.z, case.p, case.w, reduction=reduction)

    loss = sc.masked_soft_cross_entropy(
        case.logits, case.target_probs, case.position_mask, reduction=reduction
    )

    assert_loss_close(loss, expected.loss, compute_dtype(logits_dtype, target_dtype))


@pytest.mark.parametrize("reduction", GRAD_REDUCTIONS)
@pytest.mark.parametrize(("logits_dtype", "target_dtype", "shape"), CASES)
def test_with_grad_matches_reference_and_its_autograd(
    backend, logits_dtype, target_dtype, shape, reduction
):
    rng = np.random.default_rng(1)
    case = make_case(backend, rng, shape, logits_dtype=logits_dtype, target_dtype=target_dtype)
    expected = reference(case.z, case.p, case.w, reduction=reduction)
    compute = compute_dtype(logits_dtype, target_dtype)

    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask, reduction=reduction
    )

    assert_loss_close(loss, expected.loss, compute)
    assert_gradient_close(grad, expected.grad_logits, compute)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("logits_dtype", "target_dtype", "shape"), CASES)
def test_autodiff_gradients_match_reference(
    autodiff_backend, logits_dtype, target_dtype, shape, reduction
):
    rng = np.random.default_rng(2)
    case = make_case(
        autodiff_backend, rng, shape, logits_dtype=logits_dtype, target_dtype=target_dtype
    )
    compute = compute_dtype(logits_dtype, target_dtype)
    # A per-position cotangent for "none", in the loss dtype.
    upstream = (
        rng.uniform(0.5, 2.0, size=shape[:-1]).astype(compute) if reduction == "none" else None
    )
    expected = reference(
        case.z, case.p, case.w, reduction=reduction, upstream=1.0 if upstream is None else upstream
    )

    loss, grad_logits, grad_targets = differentiate(
        autodiff_backend, case, reduction=reduction, upstream=upstream
    )

    assert_loss_close(loss, expected.loss, compute)
    assert_gradient_close(grad_logits, expected.grad_logits, compute)
    assert_gradient_close(grad_targets, expected.grad_targets, compute)


def test_gradient_matches_reference_for_large_float32_logits(backend):
    # Logits near 1e4 with O(1) spread: softmax must be taken relative to the row maximum, or the
    # rounding of a float32 log-normaliser near 1e4 (about 5e-4) shows up in every entry.
    rng = np.random.default_rng(3)
    case = make_case(backend, rng, (16, 50), scale=2.0, offset=1e4)
    expected = reference(case.z, case.p, case.w)

    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask
    )

    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(grad, expected.grad_logits, "float32")


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trailing_one", [False, True], ids=["mask[...]", "mask[...,1]"])
@pytest.mark.parametrize("mask_kind", ["bool", "int", "float"])
def test_every_mask_kind_and_shape_matches_reference(backend, mask_kind, trailing_one):
    rng = np.random.default_rng(4)
    case = make_case(
        backend,
        rng,
        (3, 5, 9),
        logits_dtype="float64",
        target_dtype="float64",
        mask_kind=mask_kind,
        mask_trailing_one=trailing_one,
    )
    expected = reference(case.z, case.p, case.w)

    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask
    )

    assert_loss_close(loss, expected.loss, "float64")
    assert_gradient_close(grad, expected.grad_logits, "float64")


@pytest.mark.parametrize("trailing_one", [False, True], ids=["mask[...]", "mask[...,1]"])
def test_per_position_loss_has_the_shape_of_the_positions(backend, trailing_one):
    rng = np.random.default_rng(5)
    case = make_case(backend, rng, (2, 3, 4), mask_trailing_one=trailing_one)

    loss = sc.masked_soft_cross_entropy(
        case.logits, case.target_probs, case.position_mask, reduction="none"
    )

    assert tuple(loss.shape) == (2, 3)


@pytest.mark.parametrize("reduction", GRAD_REDUCTIONS)
@pytest.mark.parametrize("valid", ["all", "none"])
def test_all_valid_and_none_valid_masks_match_reference(backend, valid, reduction):
    rng = np.random.default_rng(6)
    case = make_case(
        backend, rng, (4, 6, 13), logits_dtype="float64", target_dtype="float64", valid=valid
    )
    expected = reference(case.z, case.p, case.w, reduction=reduction)

    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask, reduction=reduction
    )

    assert_loss_close(loss, expected.loss, "float64")
    assert_gradient_close(grad, expected.grad_logits, "float64")


# --------------------------------------------------------------------------------------------
# num_valid
# --------------------------------------------------------------------------------------------

NUM_VALID = {
    "int": lambda backend: 7,
    "float": lambda backend: 2.5,
    "zero": lambda backend: 0,
    "0-d int array": lambda backend: backend.asarray(np.asarray(7, dtype=np.int32)),
    "0-d float array": lambda backend: backend.asarray(np.asarray(2.5, dtype=np.float32)),
    "0-d zero array": lambda backend: backend.asarray(np.asarray(0, dtype=np.int32)),
}


@pytest.mark.parametrize("num_valid", NUM_VALID.values(), ids=NUM_VALID.keys())
def test_num_valid_replaces_the_denominator(backend, num_valid):
    rng = np.random.default_rng(7)
    case = make_case(backend, rng, (3, 4, 10), logits_dtype="float64", target_dtype="float64")
    count = num_valid(backend)
    expected = reference(case.z, case.p, case.w, num_valid=float(to_float64(count)))

    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask, num_valid=count
    )

    assert_loss_close(loss, expected.loss, "float64")
    assert_gradient_close(grad, expected.grad_logits, "float64")


@pytest.mark.parametrize("num_valid", NUM_VALID.values(), ids=NUM_VALID.keys())
def test_autodiff_with_num_valid_matches_reference(autodiff_backend, num_valid):
    rng = np.random.default_rng(8)
    case = make_case(autodiff_backend, rng, (3, 4, 10), logits_dtype="float64")
    count = num_valid(autodiff_backend)
    expected = reference(case.z, case.p, case.w, num_valid=float(to_float64(count)))

    loss, grad_logits, grad_targets = differentiate(autodiff_backend, case, num_valid=count)

    assert_loss_close(loss, expected.loss, "float64")
    assert_gradient_close(grad_logits, expected.grad_logits, "float64")
    assert_gradient_close(grad_targets, expected.grad_targets, "float64")


# --------------------------------------------------------------------------------------------
# Dtypes, namespaces and devices of the results
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES)
@pytest.mark.parametrize("logits_dtype", LOGITS_DTYPES)
def test_loss_is_float32_unless_an_input_is_float64(backend, logits_dtype, target_dtype):
    case = make_case(
        backend,
        np.random.default_rng(9),
        (2, 5),
        logits_dtype=logits_dtype,
        target_dtype=target_dtype,
    )

    for reduction in REDUCTIONS:
        loss = sc.masked_soft_cross_entropy(
            case.logits, case.target_probs, case.position_mask, reduction=reduction
        )
        assert dtype_name(loss) == compute_dtype(logits_dtype, target_dtype), reduction


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES)
@pytest.mark.parametrize("logits_dtype", LOGITS_DTYPES)
def test_gradient_has_the_dtype_of_the_logits(backend, logits_dtype, target_dtype):
    case = make_case(
        backend,
        np.random.default_rng(10),
        (2, 5),
        logits_dtype=logits_dtype,
        target_dtype=target_dtype,
    )

    _, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask
    )

    assert dtype_name(grad) == logits_dtype
    assert tuple(grad.shape) == (2, 5)


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES)
@pytest.mark.parametrize("logits_dtype", LOGITS_DTYPES)
def test_autodiff_loss_and_gradients_have_the_documented_dtypes(
    autodiff_backend, logits_dtype, target_dtype
):
    case = make_case(
        autodiff_backend,
        np.random.default_rng(11),
        (2, 5),
        logits_dtype=logits_dtype,
        target_dtype=target_dtype,
    )

    loss, grad_logits, grad_targets = differentiate(autodiff_backend, case)

    assert dtype_name(loss) == compute_dtype(logits_dtype, target_dtype)
    assert dtype_name(grad_logits) == logits_dtype
    assert dtype_name(grad_targets) == target_dtype


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_results_belong_to_the_namespace_and_device_of_the_inputs(backend, reduction):
    case = make_case(backend, np.random.default_rng(12), (2, 3, 5))
    namespace = array_api_compat.array_namespace(case.logits)
    device = array_api_compat.device(case.logits)

    results = [
        sc.masked_soft_cross_entropy(
            case.logits, case.target_probs, case.position_mask, reduction=reduction
        )
    ]
    if reduction != "none":
        results += sc.masked_soft_cross_entropy_with_grad(
            case.logits, case.target_probs, case.position_mask, reduction=reduction
        )

    for result in results:
        assert array_api_compat.array_namespace(result) is namespace
        assert array_api_compat.device(result) == device


def test_results_are_arrays_of_the_input_type(backend):
    case = make_case(backend, np.random.default_rng(13), (2, 3, 5))
    array_type = type(case.logits)

    for reduction in REDUCTIONS:
        loss = sc.masked_soft_cross_entropy(
            case.logits, case.target_probs, case.position_mask, reduction=reduction
        )
        assert isinstance(loss, array_type), reduction


# --------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not is_installed("torch"), reason="torch not installed")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_numpy_oracle_agrees_with_the_torch_reference(reduction):
    rng = np.random.default_rng(14)
    z = rng.standard_normal((3, 4, 9)) * 4
    p = rng.random((3, 4, 9))
    w = rng.choice(np.array([0.0, 1.0, 2.0]), size=(3, 4, 1))
    upstream = rng.random((3, 4)) if reduction == "none" else 1.0

    torch_result = reference(z, p, w, reduction=reduction, upstream=upstream)
    numpy_result = numpy_reference(z, p, w, reduction=reduction, upstream=upstream)

    for ours, theirs in zip(numpy_result, torch_result, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# An empty batch, and num_valid across the float32 range
# --------------------------------------------------------------------------------------------

EMPTY_SHAPES = [(0, 5), (2, 0, 5)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_empty_batch_reduces_to_zero(backend, shape, reduction):
    inputs = random_inputs(0, shape, valid="all").on(backend)
    loss = sc.masked_soft_cross_entropy(*inputs, reduction=reduction)
    assert tuple(loss.shape) == ()
    assert loss.dtype == backend.dtype("float32")
    assert to_numpy(loss) == 0.0


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_an_empty_batch_without_reduction_is_an_empty_array(backend, shape):
    loss = sc.masked_soft_cross_entropy(
        *random_inputs(0, shape, valid="all").on(backend), reduction="none"
    )
    assert tuple(loss.shape) == shape[:-1]
    assert loss.dtype == backend.dtype("float32")


def test_num_valid_within_the_float32_range_is_the_denominator(backend):
    logits, targets, mask = random_inputs(3, (2, 3, 5)).on(backend)
    total = sc.masked_soft_cross_entropy(logits, targets, mask, reduction="sum")
    for num_valid in (1e-30, 0.375, 10**30):
        loss = sc.masked_soft_cross_entropy(logits, targets, mask, num_valid=num_valid)
        expected = np.float64(to_numpy(total)) / float(num_valid)
        np.testing.assert_allclose(to_numpy(loss), expected, rtol=1e-5)


def test_a_tiny_num_valid_divides_a_float64_loss_in_float64(backend):
    logits, targets, _ = random_inputs(4, (2, 3, 5)).on(backend, "float64")
    mask = backend.asarray(np.ones((2, 3), dtype=bool))
    total = sc.masked_soft_cross_entropy(logits, targets, mask, reduction="sum")
    loss = sc.masked_soft_cross_entropy(logits, targets, mask, num_valid=1e-50)
    np.testing.assert_allclose(to_numpy(loss), to_numpy(total) / 1e-50, rtol=1e-12)


def test_numpy_arrays_of_the_other_byte_order_are_computed_as_the_native_ones():
    """``>f8`` on a little-endian machine is float64: the loss is computed in float64."""
    rng = np.random.default_rng(12)
    logits, targets = rng.standard_normal((2, 3, 5)), rng.dirichlet(np.ones(5), (2, 3))
    hidden, weight = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4))
    mask = rng.random((2, 3)) < 0.7
    swapped = logits.dtype.newbyteorder("S")

    def flipped(x):
        return x.astype(swapped)

    native = sc.masked_soft_cross_entropy_with_grad(logits, targets, mask)
    other = sc.masked_soft_cross_entropy_with_grad(flipped(logits), flipped(targets), mask)
    linear_native = sc.linear_masked_soft_cross_entropy(hidden, weight, targets, mask)
    linear_other = sc.linear_masked_soft_cross_entropy(
        flipped(hidden), flipped(weight), targets, mask
    )

    for got, want in zip((*other, linear_other), (*native, linear_native), strict=True):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
