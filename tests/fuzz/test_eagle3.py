"""The EAGLE-3 helpers against a NumPy statement of their documented result, on every backend:
token id maps, the vocabulary mapping, shifting, targets, accuracy and the multi-step loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from softce_multi import eagle3
from softce_multi.testing import (
    Backend,
    assert_gradient_close,
    assert_loss_close,
    dtype_name,
    library_of,
    to_float64,
    to_numpy,
)

from .strategies import (
    EPS,
    FLOATS,
    INTEGERS,
    LAYOUTS,
    LOSS_DIMENSIONS,
    MASK_DTYPES,
    SIGNED,
    assert_equal_arrays,
    call,
    draw_mask,
    each_backend,
    fuzz,
    index_dtype_name,
    loss_values,
    on_backend,
    on_each,
    place,
    poison_padding,
    seed_st,
    structures,
)

# NumPy warns of the NaN and infinities in padding; they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

#: Shapes of token-id arrays: empty, 0-d, 1-D, 2-D.
ID_SHAPES = ((), (0,), (5,), (2, 3), (3, 0), (2, 2, 4))


def draw_ids(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, size: int) -> Any:
    """Ids in and around ``[0, size)``: inside, negative, -100, beyond, and the dtype's ends."""
    info = np.iinfo(dtype)
    special = [0, size - 1, size, -1, -100, int(info.min), int(info.max)]
    special = [i for i in special if info.min <= i <= info.max]
    inside = rng.integers(0, min(size, int(info.max) + 1), shape).astype(object)
    edges = np.array(special, dtype=object)[rng.integers(0, len(special), shape)]
    return np.where(rng.random(shape) < 0.7, inside, edges).astype(dtype)


@st.composite
def vocab_mapping(draw: st.DrawFn, target_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(d2t, t2d)``: a random non-empty draft vocabulary among ``target_size`` tokens."""
    rng = np.random.default_rng(draw(seed_st))
    t2d = rng.random(target_size) < draw(st.sampled_from([0.1, 0.5, 1.0]))
    t2d[rng.integers(target_size)] = True
    draft_ids = np.flatnonzero(t2d)
    return draft_ids - np.arange(draft_ids.size), t2d


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "target_to_draft",
        shape=ID_SHAPES,
        dtype=SIGNED,
        target_size=(1, 2, 100, 300),
        layout=LAYOUTS,
    ),
)
def test_target_to_draft_ids_agree_with_a_lookup_table(data: Any, structure: dict) -> None:
    _, t2d = data.draw(vocab_mapping(structure["target_size"]))
    dtype = structure["dtype"]
    rng = np.random.default_rng(data.draw(seed_st))
    target_ids = draw_ids(rng, structure["shape"], dtype, t2d.size)
    table = np.where(t2d, np.cumsum(t2d) - 1, -1)
    inside = (target_ids >= 0) & (target_ids < t2d.size)
    expected = np.where(inside, table[np.where(inside, target_ids, 0)], -1).astype(dtype)

    def check(backend: Backend) -> None:
        ids = place(backend, target_ids, dtype, structure["layout"])
        out = call(backend, eagle3.target_to_draft_ids, ids, on_backend(backend, t2d, "bool"))
        assert_equal_arrays(out, expected, library=backend.library, dtype=dtype)

    on_each(each_backend(dtype), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "draft_to_target",
        shape=ID_SHAPES,
        ids=INTEGERS,
        d2t=INTEGERS,
        target_size=(1, 2, 100, 300),
        layout=LAYOUTS,
    ),
)
def test_draft_to_target_ids_agree_with_the_offsets(data: Any, structure: dict) -> None:
    d2t, _ = data.draw(vocab_mapping(structure["target_size"]))
    ids_dtype, d2t_dtype = structure["ids"], structure["d2t"]
    assume(d2t.max() <= np.iinfo(d2t_dtype).max)  # the offsets must fit their dtype
    rng = np.random.default_rng(data.draw(seed_st))
    draft_ids = draw_ids(rng, structure["shape"], ids_dtype, d2t.size)
    wide = draft_ids.astype(object)  # Python ints: no dtype wraps
    inside = ((wide >= 0) & (wide < d2t.size)).astype(bool)
    safe = np.where(inside, wide, 0).astype(np.int64)
    expected = np.where(inside, safe + d2t[safe], -1).astype(np.int64)

    def check(backend: Backend) -> None:
        ids = place(backend, draft_ids, ids_dtype, structure["layout"])
        out = call(backend, eagle3.draft_to_target_ids, ids, on_backend(backend, d2t, d2t_dtype))
        assert_equal_arrays(out, expected, library=backend.library, dtype=index_dtype_name(ids))

    on_each(each_backend(ids_dtype, d2t_dtype), check)


def chosen_vocabulary(counts: np.ndarray, size: int, always_include: Sequence[int]) -> np.ndarray:
    """The documented choice: ``always_include`` first, then by count (descending), ties by
    lower id; the chosen ids ascending."""
    forced = set(always_include)
    order = sorted(range(counts.size), key=lambda i: (i not in forced, -counts[i], i))
    return np.sort(np.array(order[:size], dtype=np.int64))


def vocab_mapping_of(token_counts: Any, *, size: int, ids: Any) -> Any:
    """:func:`~softce_multi.eagle3.build_vocab_mapping` with keyword arguments, to be static
    under ``jax.jit``."""
    return eagle3.build_vocab_mapping(token_counts, size, always_include=ids)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "build_vocab_mapping",
        counts=("int8", "int32", "int64", "uint8", "uint16", *FLOATS),
        target_size=(1, 2, 7, 100, 301),
        size_fraction=(0.0, 0.3, 1.0),
        forced=(0, 1, 3),
    ),
)
def test_build_vocab_mapping_chooses_the_most_frequent_tokens(data: Any, structure: dict) -> None:
    target_size, counts_dtype = structure["target_size"], structure["counts"]
    size = max(1, round(structure["size_fraction"] * target_size))
    rng = np.random.default_rng(data.draw(seed_st))
    # Few distinct counts, so that ties are common; every count fits every dtype exactly.
    counts = rng.integers(0, data.draw(st.sampled_from([2, 5, 100])), target_size)
    forced = tuple(rng.integers(0, target_size, min(structure["forced"], size)).tolist())
    chosen = chosen_vocabulary(counts, size, forced)
    expected_t2d = np.isin(np.arange(target_size), chosen)
    always_include = data.draw(st.sampled_from([tuple, list]))(forced) if forced else None

    def check(backend: Backend) -> None:
        token_counts = on_backend(backend, counts, counts_dtype)
        if backend.library == "jax" and always_include is not None:
            static_ids = tuple(always_include)  # a static argument of jax.jit must hash
            d2t, t2d = call(backend, vocab_mapping_of, token_counts, size=size, ids=static_ids)
        else:
            d2t, t2d = call(backend, vocab_mapping_of, token_counts, size=size, ids=always_include)
        index = index_dtype_name(token_counts)
        expected_d2t = chosen - np.arange(size)
        assert_equal_arrays(d2t, expected_d2t, library=backend.library, dtype=index)
        assert_equal_arrays(t2d, expected_t2d, library=backend.library, dtype="bool")

    on_each(each_backend(counts_dtype), check)


# --------------------------------------------------------------------------------------------
# EAGLE-3: shifting, targets, accuracy, steps
# --------------------------------------------------------------------------------------------


def fills_of(dtype: str) -> list[Any]:
    """``fill`` values that fit ``dtype``: its ends, 0, 1, True, and NaN and inf if floating."""
    if dtype == "bool":
        return [0, 1, True, False]
    if dtype in FLOATS:
        return [0, 1.5, -2, True, math.inf, -math.inf, math.nan]
    info = np.iinfo(dtype)
    return [0, 1, True, int(info.min), int(info.max), 7.0]


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "shift_left",
        shape=((1,), (4,), (0, 3), (2, 5), (3, 1, 4), (2, 3, 0)),
        dtype=("bool", *INTEGERS, *FLOATS),
        layout=LAYOUTS,
        axis=(0, 1, -1, 2),
    ),
)
def test_shift_left_moves_values_one_position_along_the_axis(data: Any, structure: dict) -> None:
    shape, dtype = structure["shape"], structure["dtype"]
    axis = structure["axis"]
    assume(-len(shape) <= axis < len(shape))
    fill = data.draw(st.sampled_from(fills_of(dtype)))
    rng = np.random.default_rng(data.draw(seed_st))
    if dtype in FLOATS:
        values = rng.choice(np.array([0.5, -3.25, 1e4, np.nan, np.inf, -np.inf]), shape)
    elif dtype == "bool":
        values = rng.random(shape) < 0.5
    else:
        info = np.iinfo(dtype)
        values = rng.choice(np.array([info.min, 0, 1, 42, info.max], dtype=dtype), shape)

    def check(backend: Backend) -> None:
        x = place(backend, values, dtype, structure["layout"])
        held = to_numpy(x)  # the values the backend holds (16-bit floats rounded)
        moved = np.moveaxis(held, axis, -1)
        pad = np.full((*moved.shape[:-1], min(moved.shape[-1], 1)), fill).astype(held.dtype)
        expected = np.moveaxis(np.concatenate([moved[..., 1:], pad], axis=-1), -1, axis)
        out = call(backend, eagle3.shift_left, x, axis=axis, fill=fill)
        assert_equal_arrays(out, expected, library=backend.library, dtype=dtype)

    on_each(each_backend(dtype), check)


class TargetInputs(NamedTuple):
    logits: np.ndarray
    loss_mask: np.ndarray
    t2d: np.ndarray


@st.composite
def target_inputs(draw: st.DrawFn, structure: dict[str, Any]) -> TargetInputs:
    """Target logits with ties and NaN rows at padding, a loss mask, a draft vocabulary."""
    positions, target_size = structure["shape"]
    _, t2d = draw(vocab_mapping(target_size))
    rng = np.random.default_rng(draw(seed_st))
    # Logits on a grid of 1/4, so that the top token is often tied, and ties are exact in
    # every dtype.
    logits = np.round(rng.standard_normal((*positions, target_size)) * 4) / 4
    loss_mask = draw_mask(rng, positions, structure["mask"])
    if draw(st.booleans()):
        poison_padding(rng, logits, loss_mask == 0)
    if structure["trailing_one"]:
        loss_mask = loss_mask[..., None]
    return TargetInputs(logits, loss_mask, t2d)


def expected_targets(
    logits: np.ndarray, loss_mask: np.ndarray, t2d: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``softmax(logits[..., t2d])`` in float64, and the loss mask where the first argmax
    (NaN counting as the largest) is a draft token, of shape ``[..., 1]``."""
    draft = logits[..., t2d]
    shifted = np.exp(draft - draft.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    top = np.argmax(logits, axis=-1)  # NumPy's argmax takes the first NaN, as documented
    mask = np.reshape(loss_mask, top.shape)
    position_mask = np.where(t2d[top], mask, np.zeros_like(mask))[..., None]
    return probs, position_mask


TARGET_SHAPES = (((3,), 5), ((2, 3), 40), ((0,), 4), ((2, 0), 6), ((1,), 1), ((4,), 301))


def finite_rows(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values).all(axis=-1)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "prepare_targets",
        shape=TARGET_SHAPES,
        logits=FLOATS,
        mask=MASK_DTYPES,
        trailing_one=(False, True),
        sized=(False, True),
        layout=LAYOUTS,
    ),
)
def test_prepare_targets_gives_the_draft_softmax_and_the_top_token_mask(
    data: Any, structure: dict
) -> None:
    inputs = data.draw(target_inputs(structure))
    dtype, mask_dtype = structure["logits"], structure["mask"]
    size = int(inputs.t2d.sum()) if structure["sized"] else None
    compute = "float64" if dtype == "float64" else "float32"

    def check(backend: Backend) -> None:
        logits = place(backend, inputs.logits, dtype, structure["layout"])
        loss_mask = on_backend(backend, inputs.loss_mask, mask_dtype)
        t2d = on_backend(backend, inputs.t2d, "bool")
        if size is None and backend.library == "jax":
            # The size is read on the host, which jax.jit refuses, with a TypeError naming it.
            with pytest.raises(TypeError, match="draft_vocab_size"):
                call(backend, eagle3.prepare_targets, logits, loss_mask, t2d)
            return
        if size is None:
            probs, position_mask = eagle3.prepare_targets(logits, loss_mask, t2d)
        else:
            probs, position_mask = call(
                backend, eagle3.prepare_targets, logits, loss_mask, t2d, draft_vocab_size=size
            )
        want_probs, want_mask = expected_targets(to_float64(logits), inputs.loss_mask, inputs.t2d)
        assert_equal_arrays(position_mask, want_mask, library=backend.library, dtype=mask_dtype)
        assert library_of(probs) == backend.library
        assert dtype_name(probs) == compute and tuple(probs.shape) == want_probs.shape
        rows = finite_rows(to_float64(logits))  # rows of NaN or inf (padding) have no softmax
        assert_gradient_close(to_numpy(probs)[rows], want_probs[rows], compute, dtype=compute)

    on_each(each_backend(dtype, mask_dtype), check)


def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to the dtype called ``dtype``, as float64."""
    if dtype == "bfloat16":
        import ml_dtypes

        return values.astype(ml_dtypes.bfloat16).astype(np.float64)
    return values.astype(dtype).astype(np.float64)


def matmul_dtype(*dtypes: str) -> str:
    """The promoted dtype of floating dtypes (float16 with bfloat16 gives float32)."""
    if "float64" in dtypes:
        return "float64"
    return dtypes[0] if len(set(dtypes)) == 1 else "float32"


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "prepare_targets_from_hidden",
        shape=(((3,), 4, 5), ((2, 3), 8, 40), ((0,), 4, 3), ((1,), 1, 1), ((2,), 16, 301)),
        hidden=FLOATS,
        weight=FLOATS,
        mask=("bool", "int8", "uint8", "int64", "float16", "float64"),
        trailing_one=(False, True),
        chunks=((None, None), (1, 16), (2, 3), (4, 7)),
    ),
)
def test_prepare_targets_from_hidden_agree_with_the_materialised_logits(
    data: Any, structure: dict
) -> None:
    positions, hidden_size, target_size = structure["shape"]
    _, t2d = data.draw(vocab_mapping(target_size))
    rng = np.random.default_rng(data.draw(seed_st))
    hidden = rng.standard_normal((*positions, hidden_size))
    weight = rng.standard_normal((target_size, hidden_size)) / (2 * math.sqrt(hidden_size))
    loss_mask = draw_mask(rng, positions, structure["mask"])
    if structure["trailing_one"]:
        loss_mask = loss_mask[..., None]
    dtypes = (structure["hidden"], structure["weight"], structure["mask"])
    product = matmul_dtype(*dtypes[:2])
    compute = "float64" if product == "float64" else "float32"
    chunk_rows, chunk_vocab = structure["chunks"]
    size = int(t2d.sum())

    def check(backend: Backend) -> None:
        args = (
            on_backend(backend, hidden, dtypes[0]),
            on_backend(backend, weight, dtypes[1]),
            on_backend(backend, loss_mask, dtypes[2]),
            on_backend(backend, t2d, "bool"),
        )
        probs, position_mask = call(
            backend,
            eagle3.prepare_targets_from_hidden,
            *args,
            draft_vocab_size=size,
            chunk_rows=chunk_rows,
            chunk_vocab=chunk_vocab,
        )
        # The logits of the values the backend holds, rounded to the matmul dtype as the
        # backend's product is.
        logits = rounded(to_float64(args[0]) @ to_float64(args[1]).T, product)
        want_probs, want_mask = expected_targets(logits, to_numpy(args[2]), t2d)
        # The top token may differ where the two largest logits are within the rounding of the
        # product (float32 accumulation against float64).
        ordered = np.sort(logits, axis=-1)
        gap = ordered[..., -1] - ordered[..., -2] if target_size > 1 else np.inf
        tied = np.asarray(gap <= 8 * EPS[product] * np.abs(ordered[..., -1]))
        got_mask = to_numpy(position_mask)
        assert library_of(position_mask) == backend.library
        assert dtype_name(position_mask) == dtypes[2] and got_mask.shape == want_mask.shape
        np.testing.assert_array_equal(got_mask[~tied], want_mask[~tied])
        assert library_of(probs) == backend.library
        assert dtype_name(probs) == compute and tuple(probs.shape) == want_probs.shape
        assert_gradient_close(to_numpy(probs), want_probs, product, dtype=compute)

    on_each(each_backend(*dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures("draft_accuracy", **LOSS_DIMENSIONS, ties=(False, True), layout=LAYOUTS),
)
def test_draft_accuracy_is_the_share_of_valid_positions_with_the_same_top_token(
    data: Any, structure: dict
) -> None:
    inputs = data.draw(loss_values(structure))
    logits, targets = inputs.logits, inputs.targets
    if structure["ties"]:  # values on a coarse grid: equal maxima, first index wins
        logits, targets = np.round(logits), np.round(targets * 2) / 2
        inputs = inputs._replace(logits=logits, targets=targets)
    dtype = inputs.compute_dtype

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        accuracy = call(backend, eagle3.draft_accuracy, *args)
        z, p = to_float64(args[0]), to_float64(args[1])
        valid = np.reshape(to_numpy(args[2]) != 0, z.shape[:-1])
        hits = np.argmax(z, axis=-1) == np.argmax(p, axis=-1)
        expected = np.asarray((hits & valid).sum() / max(valid.sum(), 1))
        assert_loss_close(accuracy, expected, dtype, library=backend.library, dtype=dtype)

    on_each(each_backend(*inputs.dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "multi_step_loss",
        steps=(1, 2, 3, 7, 40),
        dtype=FLOATS,
        stacked=(False, True),
        normalize=(True, False),
        decay=(0.0, 0.5, 0.8, 1.0, 1.7, 10.0),
    ),
)
def test_multi_step_loss_is_the_decayed_weighted_sum(data: Any, structure: dict) -> None:
    steps, dtype, decay = structure["steps"], structure["dtype"], structure["decay"]
    normalize = structure["normalize"]
    # Without normalizing, the weights must sum within the dtype (float16: 65504).
    assume(normalize or decay <= 1.7 or steps <= 3)
    values = np.random.default_rng(data.draw(seed_st)).uniform(0, 10, steps)

    def check(backend: Backend) -> None:
        stacked = on_backend(backend, values, dtype)
        losses = stacked if structure["stacked"] else [stacked[i] for i in range(steps)]
        out = call(backend, multi_step_of, losses, decay=decay, normalize=normalize)
        held = to_float64(stacked)
        weights = np.array([decay**i for i in range(steps)])
        if normalize:
            weights = weights / weights.sum()
        expected = np.asarray(np.sum(weights * held))
        # A sum of `steps` products in the losses' dtype: within one rounding per step.
        rtol = (steps + 2) * EPS[dtype]
        assert library_of(out) == backend.library and dtype_name(out) == dtype
        assert tuple(out.shape) == ()
        np.testing.assert_allclose(to_float64(out), expected, rtol=rtol, atol=0.0)

    on_each(each_backend(dtype), check)


def multi_step_of(losses: Any, *, decay: float, normalize: bool) -> Any:
    """:func:`~softce_multi.eagle3.multi_step_loss`, the keywords static under ``jax.jit``."""
    return eagle3.multi_step_loss(losses, decay=decay, normalize=normalize)
