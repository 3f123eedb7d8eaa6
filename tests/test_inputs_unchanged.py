"""The caller's arrays are never written to, by the forward pass or by any backward pass."""

from __future__ import annotations

import numpy as np
import pytest

import softce_multi as sc
from softce_multi.testing import REDUCTIONS, make_case, to_numpy

SHAPES = {
    "one block": (2, 3, 17),
    "several blocks": (3, 4, 32000),  # more rows than one block holds on eager backends
}
DTYPES = ["float32", "bfloat16", "float64"]
NAMES = ["logits", "target_probs", "position_mask"]


def snapshot(case):
    """NumPy copies of the three inputs, and their in-place version counters on torch."""
    return [to_numpy(array) for array in case[:3]], versions(case)


def versions(case):
    """torch's count of in-place writes to each input (None on other backends)."""
    return [getattr(array, "_version", None) for array in case[:3]]


def assert_unchanged(case, before):
    copies, counts = before
    for name, array, copy in zip(NAMES, case[:3], copies, strict=True):
        np.testing.assert_array_equal(to_numpy(array), copy, err_msg=name, strict=True)
    # No in-place operation touched them, not even one that wrote back the same values.
    assert versions(case) == counts


def poisoned_case(backend, shape, dtype):
    """Inputs whose masked positions hold NaN and inf, as real padding may."""
    rng = np.random.default_rng(0)
    case = make_case(backend, rng, shape, logits_dtype=dtype, target_dtype="float32")
    padding = to_numpy(case.position_mask) == 0
    logits = to_numpy(case.logits).astype(np.float64)
    targets = to_numpy(case.target_probs).astype(np.float64)
    logits[padding] = np.nan
    targets[padding] = np.inf
    return case._replace(
        logits=backend.asarray(logits, dtype), target_probs=backend.asarray(targets, "float32")
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_leaves_inputs_unchanged(backend, reduction, shape, dtype):
    case = poisoned_case(backend, shape, dtype)
    before = snapshot(case)

    sc.masked_soft_cross_entropy(*case[:3], reduction=reduction)

    assert_unchanged(case, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_with_grad_leaves_inputs_unchanged(backend, reduction, shape, dtype):
    case = poisoned_case(backend, shape, dtype)
    before = snapshot(case)

    sc.masked_soft_cross_entropy_with_grad(*case[:3], reduction=reduction)

    assert_unchanged(case, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autodiff_leaves_inputs_unchanged(autodiff_backend, reduction, shape, dtype):
    case = poisoned_case(autodiff_backend, shape, dtype)
    before = snapshot(case)

    if autodiff_backend.library == "torch":
        logits = case.logits.requires_grad_(True)
        targets = case.target_probs.requires_grad_(True)
        loss = sc.masked_soft_cross_entropy(
            logits, targets, case.position_mask, reduction=reduction
        )
        loss.sum().backward(retain_graph=True)
        loss.sum().backward()
    else:
        jax = pytest.importorskip("jax")

        def summed(z, p):
            return sc.masked_soft_cross_entropy(z, p, case.position_mask, reduction=reduction).sum()

        jax.grad(summed, argnums=(0, 1))(case.logits, case.target_probs)

    assert_unchanged(case, before)
