"""Sparse targets: the loss with ``target_ids`` against the float64 oracle of the dense targets
they stand for, and the top-k builders of :mod:`softce_multi.eagle3`, on every backend."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import softce_multi as sc
from softce_multi import eagle3
from softce_multi.testing import REDUCTIONS, Backend, dense_targets, to_float64, to_numpy

from .strategies import (
    FLOATS,
    LOSS_DIMENSIONS,
    LossInputs,
    assert_equal_arrays,
    assert_gradient_agrees,
    assert_loss_agrees,
    assert_zero_at_padding,
    call,
    draw_mask,
    each_backend,
    expected_loss,
    fuzz,
    loss_values,
    needs_autodiff,
    on_backend,
    on_each,
    oracle_terms,
    place,
    seed_st,
    structures,
    target_mass,
)
from .test_eagle3 import vocab_mapping

# NumPy warns of the NaN and infinities in padding; they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ID_DTYPES = ("int32", "int64", "int16")


class SparseInputs(NamedTuple):
    """A drawn loss input whose targets are sparse: ``ids`` and ``probs``, ``[..., K]``."""

    base: LossInputs
    ids: np.ndarray
    probs: np.ndarray
    ids_dtype: str

    @property
    def dense(self) -> LossInputs:
        """The same input with the dense targets the sparse ones stand for (zeros at padding)."""
        keep = ~self.base.padding[..., None]
        ids = np.where(keep, self.ids, 0)
        probs = np.where(keep, self.probs, 0.0)
        targets = dense_targets(ids, probs, self.base.logits.shape[-1])
        return self.base._replace(targets=targets)

    def build(self, backend: Backend) -> tuple[Any, Any, Any, Any]:
        logits, _, mask = self.base.build(backend)
        probs = place(backend, self.probs, self.base.target_dtype, self.base.layouts[1])
        return logits, probs, mask, on_backend(backend, self.ids, self.ids_dtype)


@st.composite
def sparse_values(draw: st.DrawFn, structure: dict[str, Any], **options: Any) -> SparseInputs:
    """A loss input with ``K`` sparse targets per position: duplicate ids, slots of probability
    0 whose ids lie outside the vocabulary, mass that sums to 1 or less, and at padding NaN
    probabilities and ids outside the vocabulary with mass."""
    base = draw(loss_values(structure, **options))
    rng = np.random.default_rng(draw(seed_st))
    positions, vocab = base.logits.shape[:-1], base.logits.shape[-1]
    k = draw(st.sampled_from([1, 3, vocab + 2]))
    ids = rng.integers(0, vocab, (*positions, k))
    if k > 1 and draw(st.booleans()):
        ids[..., -1] = ids[..., 0]
    probs = rng.dirichlet(np.ones(k), size=positions) * draw(st.sampled_from([1.0, 0.5]))
    empty = rng.random(probs.shape) < 0.3
    probs[empty] = 0.0
    ids[empty] = rng.choice([-1, vocab, vocab + 9], size=int(empty.sum()))
    padding = np.broadcast_to(base.padding[..., None], ids.shape)
    ids[padding] = vocab + 1
    probs[padding] = np.nan
    base = base._replace(targets=np.zeros(base.logits.shape))
    return SparseInputs(base, ids, probs, structure["ids"])


def sparse_loss(logits: Any, probs: Any, mask: Any, ids: Any, **options: Any) -> Any:
    return sc.masked_soft_cross_entropy(logits, probs, mask, target_ids=ids, **options)


def sparse_with_grad(logits: Any, probs: Any, mask: Any, ids: Any, **options: Any) -> Any:
    return sc.masked_soft_cross_entropy_with_grad(logits, probs, mask, target_ids=ids, **options)


def oracle_arrays(inputs: SparseInputs, args: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    """The logits, dense targets and mask the oracle sees: the values the backend holds (its
    probabilities rounded to their dtype), scattered, padding left out."""
    logits, probs, mask, _ = args
    keep = ~inputs.base.padding[..., None]
    held = np.where(keep, to_float64(probs), 0.0)
    targets = dense_targets(np.where(keep, inputs.ids, 0), held, inputs.base.logits.shape[-1])
    return logits, targets, mask


SPARSE_DIMENSIONS = {**LOSS_DIMENSIONS, "ids": ID_DTYPES}


@fuzz
@given(
    data=st.data(),
    structure=structures("sparse", **SPARSE_DIMENSIONS, reduction=REDUCTIONS),
)
def test_sparse_loss_agrees_with_the_oracle_of_the_dense_targets(
    data: Any, structure: dict
) -> None:
    inputs = data.draw(sparse_values(structure))
    reduction, dtype = structure["reduction"], inputs.base.compute_dtype
    dense = inputs.dense

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        loss = call(backend, sparse_loss, *args, reduction=reduction)
        oracle = oracle_arrays(inputs, args)
        expected = expected_loss(dense, *oracle, reduction=reduction)
        mass = target_mass(*oracle[1:], dense.padding, reduction=reduction)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)

    on_each(each_backend(*inputs.base.dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures("sparse_with_grad", **SPARSE_DIMENSIONS, reduction=("mean", "sum")),
)
def test_sparse_loss_with_grad_agrees_with_the_oracle(data: Any, structure: dict) -> None:
    inputs = data.draw(sparse_values(structure))
    reduction, dtype = structure["reduction"], inputs.base.compute_dtype
    dense = inputs.dense

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        loss, grad = call(backend, sparse_with_grad, *args, reduction=reduction)
        oracle = oracle_arrays(inputs, args)
        expected = expected_loss(dense, *oracle, reduction=reduction)
        mass = target_mass(*oracle[1:], dense.padding, reduction=reduction)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)
        terms = oracle_terms(dense, *oracle, reduction=reduction)
        assert_gradient_agrees(
            grad,
            expected.grad_logits,
            dtype,
            terms=terms,
            backend=backend,
            dtype=inputs.base.logits_dtype,
        )
        assert_zero_at_padding(grad, dense.padding)

    on_each(each_backend(*inputs.base.dtypes), check)


def _gathered(grad_targets: np.ndarray, inputs: SparseInputs) -> np.ndarray:
    """The dense targets gradient at the ids; 0 where an id lies outside the vocabulary (those
    slots have probability 0) and at padding."""
    vocab = inputs.base.logits.shape[-1]
    valid = (inputs.ids >= 0) & (inputs.ids < vocab) & ~inputs.base.padding[..., None]
    picked = np.take_along_axis(grad_targets, np.where(valid, inputs.ids, 0), axis=-1)
    return np.where(valid, picked, 0.0)


@needs_autodiff
@fuzz
@given(
    data=st.data(),
    structure=structures("sparse_autodiff", **SPARSE_DIMENSIONS, reduction=("mean", "none")),
    seed=seed_st,
)
def test_sparse_autodiff_gradients_agree_with_the_oracle(
    data: Any, structure: dict, seed: int
) -> None:
    # -inf logits would give +inf target gradients: finite logits at valid positions only.
    inputs = data.draw(sparse_values(structure, minus_inf=False))
    reduction, dtype = structure["reduction"], inputs.base.compute_dtype
    dense = inputs.dense
    shape = inputs.base.logits.shape[:-1] if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape)

    def check(backend: Backend) -> None:
        logits, probs, mask, ids = inputs.build(backend)
        if backend.library == "torch":
            import torch

            logits.requires_grad_(True)
            probs.requires_grad_(True)
            loss = sparse_loss(logits, probs, mask, ids, reduction=reduction)
            loss.backward(torch.as_tensor(upstream, dtype=loss.dtype))
            grads = (logits.grad, probs.grad)
        else:
            import jax

            def loss_at(z: Any, p: Any) -> Any:
                return sparse_loss(z, p, mask, ids, reduction=reduction)

            loss, pullback = jax.vjp(loss_at, logits, probs)
            grads = pullback(on_backend(backend, upstream, "float64").astype(loss.dtype))
        oracle = oracle_arrays(inputs, (logits, probs, mask, ids))
        expected = expected_loss(dense, *oracle, reduction=reduction, upstream=upstream)
        mass = target_mass(*oracle[1:], dense.padding, reduction=reduction)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)
        terms = oracle_terms(dense, *oracle, reduction=reduction, upstream=upstream)
        desired = (expected.grad_logits, _gathered(expected.grad_targets, inputs))
        for grad, want, grad_dtype in zip(grads, desired, inputs.base.dtypes[:2], strict=True):
            assert_gradient_agrees(
                grad, want, dtype, terms=terms, backend=backend, dtype=grad_dtype
            )
            assert_zero_at_padding(grad, dense.padding)

    on_each(each_backend(*inputs.base.dtypes, autodiff=True), check)


# --------------------------------------------------------------------------------------------
# The top-k builders
# --------------------------------------------------------------------------------------------


def top_k(probs: Any, *, k: int) -> Any:
    return eagle3.top_k_targets(probs, k)


def top_k_from_hidden(*arrays: Any, k: int, draft_vocab_size: int) -> Any:
    return eagle3.prepare_top_k_targets_from_hidden(*arrays, k, draft_vocab_size=draft_vocab_size)


def top_k_oracle(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids of the ``k`` largest entries, equal ones lowest id first, and those entries."""
    order = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    return order, np.take_along_axis(values, order, axis=-1)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "top_k_targets",
        shape=((7,), (3, 5), (2, 3, 40), (0, 4), (4, 1)),
        dtype=FLOATS,
        k=("one", "some", "all"),
    ),
)
def test_top_k_targets_are_the_largest_entries_in_order(data: Any, structure: dict) -> None:
    shape, dtype = structure["shape"], structure["dtype"]
    rng = np.random.default_rng(data.draw(seed_st))
    vocab = shape[-1]
    k = {"one": 1, "some": max(1, vocab // 2), "all": vocab}[structure["k"]]
    values = rng.dirichlet(np.ones(vocab), size=shape[:-1])
    if data.draw(st.booleans()):  # ties
        values = np.round(values * 4) / 4

    def check(backend: Backend) -> None:
        probs = on_backend(backend, values, dtype)
        ids, top = call(backend, top_k, probs, k=k)
        want_ids, want = top_k_oracle(to_float64(probs), k)
        assert_equal_arrays(top, want, library=backend.library, dtype=dtype)
        np.testing.assert_array_equal(to_numpy(ids), want_ids)

    on_each(each_backend(dtype), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "prepare_top_k_targets_from_hidden",
        shape=(((3,), 4, 5), ((2, 3), 8, 40), ((1,), 1, 1), ((2,), 16, 301)),
        mask=("bool", "int8", "float64"),
        k=("one", "some", "all"),
    ),
)
def test_prepare_top_k_targets_from_hidden_are_the_top_k_of_the_dense_targets(
    data: Any, structure: dict
) -> None:
    positions, hidden_size, target_size = structure["shape"]
    _, t2d = data.draw(vocab_mapping(target_size))
    size = int(t2d.sum())
    k = {"one": 1, "some": max(1, size // 2), "all": size}[structure["k"]]
    rng = np.random.default_rng(data.draw(seed_st))
    hidden = rng.standard_normal((*positions, hidden_size))
    weight = rng.standard_normal((target_size, hidden_size)) / (2 * math.sqrt(hidden_size))
    loss_mask = draw_mask(rng, positions, structure["mask"])

    def check(backend: Backend) -> None:
        args = (
            on_backend(backend, hidden, "float64"),
            on_backend(backend, weight, "float64"),
            on_backend(backend, loss_mask, structure["mask"]),
            on_backend(backend, t2d, "bool"),
        )
        ids, probs, mask = call(backend, top_k_from_hidden, *args, k=k, draft_vocab_size=size)
        dense, want_mask = call(
            backend, eagle3.prepare_targets_from_hidden, *args, draft_vocab_size=size
        )
        want_ids, want_probs = eagle3.top_k_targets(dense, k)
        np.testing.assert_array_equal(to_numpy(mask), to_numpy(want_mask))
        np.testing.assert_allclose(to_float64(probs), to_float64(want_probs), rtol=1e-10, atol=0)
        # Ids agree wherever the probabilities are not tied within the rounding.
        top = to_float64(want_probs)
        gaps = np.abs(np.diff(top, axis=-1))
        distinct = np.ones(top.shape, dtype=bool)
        distinct[..., 1:] &= gaps > 1e-12
        distinct[..., :-1] &= gaps > 1e-12
        np.testing.assert_array_equal(to_numpy(ids)[distinct], to_numpy(want_ids)[distinct])

    on_each(each_backend("float64"), check)
