"""Properties that hold for any input, checked with hypothesis on every backend.

Inputs are drawn as a shape, a scale and a seed; the arrays come from a seeded NumPy generator
(faster than drawing every element through hypothesis, and as reproducible).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import softce_multi as sc
from softce_multi.testing import (
    LOSS_RTOL,
    REDUCTIONS,
    random_inputs,
    reference,
    to_float64,
)

# A few shapes, so that backends which compile per shape (JAX) reuse their work.
positions_st = st.sampled_from([(1,), (5,), (2, 3), (3, 1, 2)])
vocab_st = st.sampled_from([1, 2, 7, 40])
seed_st = st.integers(0, 2**32 - 1)
scale_st = st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4])
offset_st = st.sampled_from([0.0, -50.0, 1e3, 1e4])
reduction_st = st.sampled_from(REDUCTIONS)
mask_kind_st = st.sampled_from(["bool", "int", "float"])


def draw_inputs(rng, positions, vocab, *, scale, offset=0.0, normalised=False, mask_kind="bool"):
    """float32 logits and targets and a mask, as NumPy arrays."""
    options = {"scale": scale, "offset": offset, "normalised": normalised, "mask_kind": mask_kind}
    return random_inputs(rng, (*positions, vocab), **options).astype("float32")


def poison_padding(rng, values, mask):
    """Copy of ``values`` with NaN, inf or -inf in every element of the masked positions."""
    poisoned = values.copy()
    padding = np.broadcast_to((np.asarray(mask) == 0)[..., None], values.shape)
    poison = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=values.dtype), values.shape)
    poisoned[padding] = poison[padding]
    return poisoned


def loss_and_grad(backend, logits, targets, mask, reduction="mean", num_valid=None):
    """The loss (any reduction) and, for "mean" and "sum", the logits gradient, as NumPy."""
    args = (backend.asarray(logits), backend.asarray(targets), backend.asarray(mask))
    if reduction == "none":
        loss = sc.masked_soft_cross_entropy(*args, reduction="none")
        return to_float64(loss), None
    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        *args, reduction=reduction, num_valid=num_valid
    )
    return to_float64(loss), to_float64(grad)


def autodiff_grads(backend, logits, targets, mask, reduction="mean"):
    """Gradients of the summed loss to logits and targets through the backend's autodiff."""
    args = (backend.asarray(logits), backend.asarray(targets), backend.asarray(mask))
    if backend.library == "torch":
        logits_t = args[0].requires_grad_(True)
        targets_t = args[1].requires_grad_(True)
        loss = sc.masked_soft_cross_entropy(logits_t, targets_t, args[2], reduction=reduction)
        loss.sum().backward()
        return to_float64(logits_t.grad), to_float64(targets_t.grad)
    jax = pytest.importorskip("jax")

    def summed(z, p):
        return sc.masked_soft_cross_entropy(z, p, args[2], reduction=reduction).sum()

    grads = jax.grad(summed, argnums=(0, 1))(args[0], args[1])
    return to_float64(grads[0]), to_float64(grads[1])


@given(positions=positions_st, vocab=vocab_st, scale=scale_st, seed=seed_st)
def test_results_are_finite_for_finite_inputs(backend, positions, vocab, scale, seed):
    rng = np.random.default_rng(seed)
    logits, targets, mask = draw_inputs(rng, positions, vocab, scale=scale)

    loss, grad = loss_and_grad(backend, logits, targets, mask)

    assert np.isfinite(loss).all()
    assert np.isfinite(grad).all()


def gradient_terms(logits, targets, mask, reduction):
    """Per element, ``|w / den| * (sum(p) * softmax(z) + p)``: the size of the two terms whose
    difference is the logits gradient, in float64.

    Near the optimum the gradient is much smaller than its terms, and float32 can only resolve
    it to a fraction of the terms; the terms set the scale of the float32 tolerance.
    """
    z, p = logits.astype(np.float64), targets.astype(np.float64)
    weights = np.asarray(mask, dtype=np.float64)
    den = max(weights.sum(), 1.0) if reduction == "mean" else 1.0
    softmax = np.exp(z - z.max(axis=-1, keepdims=True))
    softmax /= softmax.sum(axis=-1, keepdims=True)
    return (weights / den)[..., None] * (p.sum(axis=-1, keepdims=True) * softmax + p)


def weighted_target_mass(targets, mask, reduction):
    """``sum(w * sum(p)) / den``: the loss's unit, in which float32 resolves ``log_softmax``.

    A loss far below it (``p`` on the argmax of a sharply peaked row) is ``sum(p)`` times a log
    of a sum of exponentials that float32 rounds to 1; no float32 computation resolves it.
    """
    weights = np.asarray(mask, dtype=np.float64)
    den = max(weights.sum(), 1.0) if reduction == "mean" else 1.0
    return float((weights * targets.astype(np.float64).sum(axis=-1)).sum() / den)


@given(
    positions=positions_st,
    vocab=vocab_st,
    scale=scale_st,
    offset=offset_st,
    reduction=st.sampled_from(["mean", "sum"]),
    mask_kind=mask_kind_st,
    seed=seed_st,
)
def test_float32_results_agree_with_the_float64_reference(
    backend, positions, vocab, scale, offset, reduction, mask_kind, seed
):
    rng = np.random.default_rng(seed)
    logits, targets, mask = draw_inputs(
        rng, positions, vocab, scale=scale, offset=offset, mask_kind=mask_kind
    )
    expected = reference(
        logits.astype(np.float64), targets.astype(np.float64), mask, reduction=reduction
    )
    terms = gradient_terms(logits, targets, mask, reduction)
    mass = weighted_target_mass(targets, mask, reduction)

    loss, grad = loss_and_grad(backend, logits, targets, mask, reduction)

    np.testing.assert_allclose(loss, expected.loss, rtol=LOSS_RTOL["float32"], atol=1e-6 * mass)
    np.testing.assert_allclose(grad, expected.grad_logits, rtol=0, atol=1e-5 * terms.max())


@given(
    positions=positions_st,
    vocab=vocab_st,
    scale=scale_st,
    offset=offset_st,
    reduction=st.sampled_from(["mean", "sum"]),
    seed=seed_st,
)
def test_gradient_sums_to_zero_over_the_vocabulary_for_normalised_targets(
    backend, positions, vocab, scale, offset, reduction, seed
):
    rng = np.random.default_rng(seed)
    logits, targets, mask = draw_inputs(
        rng, positions, vocab, scale=scale, offset=offset, normalised=True
    )
    terms = gradient_terms(logits, targets, mask, reduction)

    _, grad = loss_and_grad(backend, logits, targets, mask, reduction)

    # Each row is sum(p) * softmax - p (scaled): both terms sum to sum(p).
    row_sums = grad.sum(axis=-1)
    assert (np.abs(row_sums) <= 1e-5 * terms.sum(axis=-1)).all()


@given(
    positions=positions_st,
    vocab=vocab_st,
    reduction=reduction_st,
    mask_kind=mask_kind_st,
    seed=seed_st,
)
def test_values_at_masked_positions_change_neither_loss_nor_gradient(
    backend, positions, vocab, reduction, mask_kind, seed
):
    rng = np.random.default_rng(seed)
    logits, targets, mask = draw_inputs(rng, positions, vocab, scale=3.0, mask_kind=mask_kind)
    poisoned_logits = poison_padding(rng, logits, mask)
    poisoned_targets = poison_padding(rng, targets, mask)

    clean_loss, clean_grad = loss_and_grad(backend, logits, targets, mask, reduction)
    loss, grad = loss_and_grad(backend, poisoned_logits, poisoned_targets, mask, reduction)

    np.testing.assert_array_equal(loss, clean_loss)
    if grad is not None:
        np.testing.assert_array_equal(grad, clean_grad)
        assert (grad[np.asarray(mask) == 0] == 0).all()


@given(
    positions=positions_st,
    vocab=vocab_st,
    reduction=reduction_st,
    seed=seed_st,
)
def test_masked_positions_get_exactly_zero_autodiff_gradients(
    autodiff_backend, positions, vocab, reduction, seed
):
    rng = np.random.default_rng(seed)
    logits, targets, mask = draw_inputs(rng, positions, vocab, scale=3.0)
    poisoned_logits = poison_padding(rng, logits, mask)
    poisoned_targets = poison_padding(rng, targets, mask)

    clean = autodiff_grads(autodiff_backend, logits, targets, mask, reduction)
    poisoned = autodiff_grads(autodiff_backend, poisoned_logits, poisoned_targets, mask, reduction)

    for grad, clean_grad in zip(poisoned, clean, strict=True):
        np.testing.assert_array_equal(grad, clean_grad)
        assert (grad[mask == 0] == 0).all()


@given(
    positions=positions_st,
    vocab=st.sampled_from([2, 7, 40]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=seed_st,
)
def test_zero_targets_at_minus_inf_logits_contribute_exactly_nothing(
    backend, positions, vocab, reduction, seed
):
    rng = np.random.default_rng(seed)
    logits, targets, mask = draw_inputs(rng, positions, vocab, scale=3.0)
    # Extend the vocabulary by 3 entries with logit -inf and target 0 in every row.
    extra = (*positions, 3)
    wide_logits = np.concatenate([logits, np.full(extra, -np.inf, np.float32)], axis=-1)
    wide_targets = np.concatenate([targets, np.zeros(extra, np.float32)], axis=-1)

    loss, grad = loss_and_grad(backend, logits, targets, mask, reduction)
    wide_loss, wide_grad = loss_and_grad(backend, wide_logits, wide_targets, mask, reduction)

    np.testing.assert_allclose(wide_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(wide_grad[..., :vocab], grad, rtol=0, atol=1e-6 * np.abs(grad).max())
    assert (wide_grad[..., vocab:] == 0).all()


@given(positions=positions_st, vocab=vocab_st, reduction=reduction_st, seed=seed_st)
def test_no_valid_position_gives_zero_loss_and_zero_gradient(
    backend, positions, vocab, reduction, seed
):
    rng = np.random.default_rng(seed)
    logits, targets, _ = draw_inputs(rng, positions, vocab, scale=3.0)
    mask = np.zeros(positions, dtype=bool)

    loss, grad = loss_and_grad(backend, logits, targets, mask, reduction)

    assert (loss == 0).all()
    if grad is not None:
        assert (grad == 0).all()


@pytest.mark.parametrize("num_valid", [0, 0.0])
@given(positions=positions_st, vocab=vocab_st, seed=seed_st)
def test_num_valid_zero_gives_zero_loss_and_zero_gradient(
    backend, num_valid, positions, vocab, seed
):
    rng = np.random.default_rng(seed)
    logits, targets, mask = draw_inputs(rng, positions, vocab, scale=3.0)

    loss, grad = loss_and_grad(backend, logits, targets, mask, num_valid=num_valid)

    assert loss == 0
    assert (grad == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_valid_row_of_minus_inf_logits_and_zero_targets_costs_nothing(backend, reduction):
    rng = np.random.default_rng(31)
    logits, targets, _ = draw_inputs(rng, (3, 4), 9, scale=3.0, normalised=True)
    mask = np.ones((3, 4), dtype=bool)
    clean_loss, clean_grad = loss_and_grad(backend, logits, targets, mask, reduction)
    logits_with_empty_row = np.concatenate([logits, np.full((3, 1, 9), -np.inf, logits.dtype)], 1)
    targets_with_empty_row = np.concatenate([targets, np.zeros((3, 1, 9), targets.dtype)], 1)
    mask_with_empty_row = np.ones((3, 5), dtype=bool)

    loss, grad = loss_and_grad(
        backend, logits_with_empty_row, targets_with_empty_row, mask_with_empty_row, reduction
    )

    # Only the count of valid positions changes: 15 instead of 12 for "mean".
    scale = 12 / 15 if reduction == "mean" else 1.0
    np.testing.assert_allclose(loss, clean_loss * scale, rtol=1e-6)
    # Within float32 roundings of the largest entry: an entry that is a near-cancelling
    # difference of two terms carries their rounding, not its own (1/12 and 1/15 round apart).
    largest = np.abs(clean_grad).max()
    np.testing.assert_allclose(grad[:, :4], clean_grad * scale, rtol=1e-6, atol=1e-6 * largest)
    assert (grad[:, 4] == 0).all()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_padding_holding_nan_and_inf_raises_no_numpy_warning():
    rng = np.random.default_rng(32)
    logits, targets, mask = draw_inputs(rng, (4, 6), 11, scale=3.0)
    mask[0, :2] = False
    logits = poison_padding(rng, logits, mask)
    targets = poison_padding(rng, targets, mask)

    loss, grad = sc.masked_soft_cross_entropy_with_grad(logits, targets, mask)

    assert np.isfinite(loss) and np.isfinite(grad).all()
