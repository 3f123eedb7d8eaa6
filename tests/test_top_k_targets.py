"""Specification of softce_multi.eagle3.top_k_targets and prepare_top_k_targets_from_hidden.

``top_k_targets`` must give the ``k`` largest entries of the last axis and their ids, in
descending order, equal entries in ascending order of id, on every backend.
``prepare_top_k_targets_from_hidden`` must give ``top_k_targets`` of the targets of
``prepare_targets_from_hidden`` (the ids wherever the probabilities are not tied) and the same
position mask, whatever the chunk sizes, without the dense targets.
"""

from __future__ import annotations

import numpy as np
import pytest

from softce_multi import eagle3
from softce_multi.eagle3 import (
    prepare_targets_from_hidden,
    prepare_top_k_targets_from_hidden,
    top_k_targets,
)
from softce_multi.testing import Backend, to_numpy

V_TARGET, HIDDEN, V_DRAFT = 50, 16, 20
BATCH = (3, 7)  # N = 21 rows

#: (chunk_rows, chunk_vocab): the defaults (one chunk of each here); one row and one column at
#: a time; chunks dividing neither N nor V_target nor V_draft - k.
CHUNKS = [(None, None), (1, 1), (4, 7)]

#: The chunks of most tests: several of each, the last one partial.
MANY = {"chunk_rows": 4, "chunk_vocab": 7}


def _oracle(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row and their ids, by a stable sort: NaN as +inf."""
    keys = np.where(np.isnan(values), np.inf, values.astype(np.float64))
    ids = np.argsort(-keys, axis=-1, kind="stable")[..., :k]
    return ids, np.take_along_axis(values, ids, axis=-1)


def _default_integer(backend: Backend):
    import array_api_compat
    import array_api_extra as xpx

    xp = array_api_compat.array_namespace(backend.asarray(np.zeros(1)))
    return xpx.default_dtype(xp, "integral")


# --- top_k_targets ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, V_DRAFT])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_top_k_targets_equals_a_stable_sort(backend: Backend, k: int, dtype: str) -> None:
    backend.require(dtype)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(*BATCH, V_DRAFT))
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    array = backend.asarray(probs, dtype)
    values = to_numpy(array).astype(np.float64)

    ids, top = top_k_targets(array, k)

    expected_ids, expected_top = _oracle(values, k)
    assert ids.shape == top.shape == (*BATCH, k)
    assert ids.dtype == _default_integer(backend)
    assert top.dtype == array.dtype
    np.testing.assert_array_equal(to_numpy(ids), expected_ids)
    np.testing.assert_array_equal(to_numpy(top).astype(np.float64), expected_top)
    assert (np.diff(to_numpy(top).astype(np.float64), axis=-1) <= 0).all()


def test_equal_probabilities_come_in_ascending_order_of_id(backend: Backend) -> None:
    """Few distinct values: ties within the kept entries and across the k-th place."""
    rng = np.random.default_rng(1)
    probs = rng.integers(0, 4, size=(*BATCH, V_DRAFT)) / 8.0
    probs[0, 0] = 0.25  # a row of one value: the first k ids
    probs[0, 1, ::2] = -0.0  # -0.0 ties with 0.0
    for k in (1, 5, V_DRAFT):
        ids, top = top_k_targets(backend.asarray(probs, "float32"), k)
        expected_ids, expected_top = _oracle(np.where(probs == 0, 0.0, probs), k)
        np.testing.assert_array_equal(to_numpy(ids), expected_ids)
        np.testing.assert_array_equal(to_numpy(top), expected_top)
    np.testing.assert_array_equal(to_numpy(ids)[0, 0], np.arange(V_DRAFT))


def test_nan_ranks_as_infinity(backend: Backend) -> None:
    probs = np.tile(np.linspace(0.0, 0.5, V_DRAFT), (2, 1))
    probs[0, 3] = np.nan
    probs[1, :] = np.nan
    ids, top = top_k_targets(backend.asarray(probs, "float32"), 4)
    np.testing.assert_array_equal(to_numpy(ids), [[3, 19, 18, 17], [0, 1, 2, 3]])
    assert np.isnan(to_numpy(top)[0, 0])
    assert np.isnan(to_numpy(top)[1]).all()


def test_top_k_targets_under_jax_jit_with_a_static_k() -> None:
    jax = pytest.importorskip("jax")
    probs = np.random.default_rng(2).random((*BATCH, V_DRAFT))
    array = jax.numpy.asarray(probs, jax.numpy.float32)
    ids, top = jax.jit(top_k_targets, static_argnums=1)(array, 5)
    expected_ids, expected_top = _oracle(to_numpy(array), 5)
    np.testing.assert_array_equal(to_numpy(ids), expected_ids)
    np.testing.assert_array_equal(to_numpy(top), expected_top)


@pytest.mark.parametrize(
    ("probs", "k", "error", "words"),
    [
        (np.ones((2, 5), dtype=np.float32), 0, ValueError, r"k must be between 1 and .* 5, got 0"),
        (np.ones((2, 5), dtype=np.float32), 6, ValueError, r"k must be between 1 and .* 5, got 6"),
        (np.ones((2, 5), dtype=np.float32), 2.0, TypeError, "k must be an int, got float"),
        (np.ones((2, 5), dtype=np.float32), True, TypeError, "k must be an int, got bool"),
        (np.ones((2, 5), dtype=np.int64), 2, TypeError, "target_probs must have a real floating"),
        (np.ones((2, 5), dtype=bool), 2, TypeError, "target_probs"),
        (np.float32(1.0), 1, ValueError, "target_probs must have at least one"),
        (np.ones((), dtype=np.float32), 1, ValueError, "target_probs must have at least one"),
        ([0.5, 0.5], 1, TypeError, "target_probs must be an array"),
    ],
)
def test_top_k_targets_refuses_bad_input(probs, k, error, words) -> None:
    with pytest.raises(error, match=words):
        top_k_targets(probs, k)


# --- prepare_top_k_targets_from_hidden --------------------------------------------------------


def _case(rng: np.random.Generator, *, integer: bool = False) -> dict[str, np.ndarray]:
    """Hidden states, weight, loss mask and draft mask; integer values give exact logits."""
    if integer:
        hidden = rng.integers(-3, 4, size=(*BATCH, HIDDEN)).astype(np.float64)
        weight = rng.integers(-3, 4, size=(V_TARGET, HIDDEN)).astype(np.float64)
    else:
        hidden = rng.normal(size=(*BATCH, HIDDEN))
        weight = rng.normal(size=(V_TARGET, HIDDEN))
    return {
        "hidden": hidden,
        "weight": weight,
        "loss_mask": rng.random(BATCH) < 0.8,
        "t2d": np.isin(np.arange(V_TARGET), rng.choice(V_TARGET, V_DRAFT, replace=False)),
    }


def _arrays(backend: Backend, case: dict[str, np.ndarray], dtype: str | None = None) -> list:
    return [
        backend.asarray(case["hidden"], dtype),
        backend.asarray(case["weight"], dtype),
        backend.asarray(case["loss_mask"]),
        backend.asarray(case["t2d"]),
    ]


def _assert_top_k_of(sparse, dense, k: int, *, rtol: float, atol: float = 0.0) -> None:
    """``sparse`` is top_k_targets of the dense targets (ids where no probabilities tie)."""
    (ids, probs, mask), (dense_probs, dense_mask) = sparse, dense
    expected_ids, expected_probs = top_k_targets(dense_probs, k)
    assert ids.shape == probs.shape == expected_ids.shape
    assert ids.dtype == expected_ids.dtype
    assert probs.dtype == expected_probs.dtype
    probs, expected_probs = to_numpy(probs), to_numpy(expected_probs)
    np.testing.assert_allclose(probs, expected_probs, rtol=rtol, atol=atol)
    # Each id's own dense probability is the one returned with it.
    own = np.take_along_axis(to_numpy(dense_probs), to_numpy(ids), axis=-1)
    np.testing.assert_allclose(probs, own, rtol=rtol, atol=atol)
    ids, expected_ids = to_numpy(ids), to_numpy(expected_ids)
    assert ((ids >= 0) & (ids < dense_probs.shape[-1])).all()
    assert (np.sort(ids, axis=-1)[..., 1:] != np.sort(ids, axis=-1)[..., :-1]).all()
    # Ids may differ only where the probability ties with another of the row.
    dense_values = to_numpy(dense_probs)
    tied = np.zeros(ids.shape, dtype=bool)
    for index in np.ndindex(ids.shape[:-1]):
        kept = expected_probs[index][:, None]
        close = np.abs(kept - dense_values[index][None, :]) <= rtol * np.abs(kept) + atol
        tied[index] = close.sum(axis=-1) > 1
    np.testing.assert_array_equal(np.where(tied, -1, ids), np.where(tied, -1, expected_ids))
    np.testing.assert_array_equal(to_numpy(mask), to_numpy(dense_mask))
    assert mask.dtype == dense_mask.dtype


def _both(backend: Backend, case, k: int, dtype: str | None = None, **options):
    arrays = _arrays(backend, case, dtype)
    size = int(case["t2d"].sum())
    options.setdefault("draft_vocab_size", size)
    sparse = prepare_top_k_targets_from_hidden(*arrays, k, **options)
    dense = prepare_targets_from_hidden(*arrays, **options)
    return sparse, dense


@pytest.mark.parametrize(("chunk_rows", "chunk_vocab"), CHUNKS)
@pytest.mark.parametrize("k", [1, 3, 8, V_DRAFT])
def test_float64_is_top_k_of_the_dense_targets(
    backend: Backend, chunk_rows, chunk_vocab, k: int
) -> None:
    backend.require("float64")
    case = _case(np.random.default_rng(3))
    both = _both(backend, case, k, "float64", chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    _assert_top_k_of(*both, k, rtol=1e-12)


@pytest.mark.parametrize(("chunk_rows", "chunk_vocab"), [(None, None), (4, 7), (5, 3)])
@pytest.mark.parametrize("k", [1, 7, V_DRAFT])
def test_float32_is_top_k_of_the_dense_targets(
    backend: Backend, chunk_rows, chunk_vocab, k: int
) -> None:
    case = _case(np.random.default_rng(4))
    both = _both(backend, case, k, "float32", chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    _assert_top_k_of(*both, k, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_hidden_states(backend: Backend, dtype: str) -> None:
    """The logits are rounded to the inputs' dtype as the dense path rounds them; rounding makes
    many equal logits, so ties are frequent too."""
    backend.require(dtype)
    case = _case(np.random.default_rng(5))
    sparse, dense = _both(backend, case, 6, dtype, **MANY)
    assert sparse[1].dtype == backend.dtype("float32")
    _assert_top_k_of(sparse, dense, 6, rtol=1e-5, atol=1e-9)


def test_equal_logits_keep_the_lower_id_across_blocks(backend: Backend) -> None:
    """Integer logits tie often, within blocks of draft columns and across them."""
    case = _case(np.random.default_rng(6), integer=True)
    sparse, dense = _both(backend, case, 5, "float64" if backend.supports("float64") else None)
    _assert_top_k_of(sparse, dense, 5, rtol=1e-6)
    for chunks in (MANY, {"chunk_vocab": 1}):
        other = prepare_top_k_targets_from_hidden(
            *_arrays(backend, case), 5, draft_vocab_size=V_DRAFT, **chunks
        )
        _assert_top_k_of(other, dense, 5, rtol=1e-6)


def test_ids_are_draft_ids(backend: Backend) -> None:
    """The draft tokens of the largest probability are the first ids: in draft ids, as
    ``target_to_draft_ids`` numbers them, not target ids."""
    case = _case(np.random.default_rng(7))
    draft_targets = np.flatnonzero(case["t2d"])
    case["weight"][draft_targets[4]] = 0.0
    case["weight"][draft_targets[4], 0] = 50.0
    case["hidden"][..., 0] = 1.0
    ids, probs, _ = prepare_top_k_targets_from_hidden(*_arrays(backend, case), 2, **MANY)
    np.testing.assert_array_equal(to_numpy(ids)[..., 0], 4)
    assert (to_numpy(probs)[..., 0] > 0.99).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_nan_and_infinite_hidden_rows_give_nan_probabilities(backend: Backend) -> None:
    case = _case(np.random.default_rng(8))
    case["hidden"][1, 2] = np.nan
    case["hidden"][2, 0, 3] = np.inf
    case["weight"][np.flatnonzero(case["t2d"])[:3]] = 0.0
    case["hidden"][0, 4] = 0.0  # logits 0 everywhere: all probabilities equal
    sparse, dense = _both(backend, case, 4, "float32", **MANY)
    _assert_top_k_of(sparse, dense, 4, rtol=1e-5, atol=1e-9)
    probs = to_numpy(sparse[1])
    assert np.isnan(probs[1, 2]).all()
    assert np.isnan(probs[2, 0]).all()
    np.testing.assert_array_equal(to_numpy(sparse[0])[1, 2], np.arange(4))


def test_no_rows(backend: Backend) -> None:
    case = _case(np.random.default_rng(9))
    case["hidden"] = case["hidden"][:0]
    case["loss_mask"] = case["loss_mask"][:0]
    ids, probs, mask = _both(backend, case, 3, **MANY)[0]
    assert ids.shape == probs.shape == (0, BATCH[1], 3)
    assert mask.shape == (0, BATCH[1], 1)


def test_without_draft_vocab_size_the_size_is_read_from_t2d(backend: Backend) -> None:
    case = _case(np.random.default_rng(10))
    arrays = _arrays(backend, case)
    read = prepare_top_k_targets_from_hidden(*arrays, 3, **MANY)
    given = prepare_top_k_targets_from_hidden(*arrays, 3, draft_vocab_size=V_DRAFT, **MANY)
    for got, expected in zip(read, given, strict=True):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(expected))


@pytest.mark.parametrize("size", [V_DRAFT - 1, V_DRAFT + 1])
def test_a_draft_vocab_size_that_disagrees_with_t2d_gives_nan_where_it_is_not_read(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(eagle3._t2d, "_is_readable_for_free", lambda x, *, xp: False)
    case = _case(np.random.default_rng(11))
    arrays = _arrays(backend, case)
    ids, probs, mask = prepare_top_k_targets_from_hidden(
        *arrays, size, draft_vocab_size=size, **MANY
    )
    assert np.isnan(to_numpy(probs)).all()
    np.testing.assert_array_equal(to_numpy(ids), np.broadcast_to(np.arange(size), ids.shape))
    expected_mask = prepare_targets_from_hidden(*arrays, draft_vocab_size=V_DRAFT, **MANY)[1]
    np.testing.assert_array_equal(to_numpy(mask), to_numpy(expected_mask))


def test_inputs_are_unchanged(backend: Backend) -> None:
    arrays = _arrays(backend, _case(np.random.default_rng(12)))
    copies = [to_numpy(array) for array in arrays]
    prepare_top_k_targets_from_hidden(*arrays, 4, **MANY)
    for array, copy in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(to_numpy(array), copy)


# --- frameworks -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 6, V_DRAFT])
@pytest.mark.parametrize("chunks", [MANY, {"chunk_rows": 21, "chunk_vocab": 20}])
def test_under_jax_jit_with_draft_vocab_size(k: int, chunks: dict) -> None:
    jax = pytest.importorskip("jax")
    case = _case(np.random.default_rng(13))
    arrays = [jax.numpy.asarray(case[name]) for name in ("hidden", "weight", "loss_mask", "t2d")]

    @jax.jit
    def sparse(*arrays):
        return prepare_top_k_targets_from_hidden(*arrays, k, draft_vocab_size=V_DRAFT, **chunks)

    dense = prepare_targets_from_hidden(*arrays, draft_vocab_size=V_DRAFT, **chunks)
    _assert_top_k_of(sparse(*arrays), dense, k, rtol=1e-12)


def test_under_jax_jit_without_draft_vocab_size_is_a_type_error() -> None:
    jax = pytest.importorskip("jax")
    case = _case(np.random.default_rng(14))
    arrays = [jax.numpy.asarray(case[name]) for name in ("hidden", "weight", "loss_mask", "t2d")]
    with pytest.raises(TypeError, match="draft_vocab_size"):
        jax.jit(prepare_top_k_targets_from_hidden, static_argnums=4)(*arrays, 3)


def test_jax_temporaries_hold_no_dense_targets(xla_on_the_cpu) -> None:
    """Under ``jax.jit``, XLA's temporaries hold the ``[chunk_rows, k + MERGE_BLOCKS *
    chunk_vocab]`` candidates of a selection and a few smaller blocks, whatever ``N``: at
    ``N = 4133`` under two candidate buffers (530 KiB), where one ``[N, V_draft]`` float32 array
    takes 65 MiB, and growing with ``N`` by less than a quarter of that buffer."""
    jax = xla_on_the_cpu
    jnp = jax.numpy
    v_target, v_draft, hidden_size, chunk_rows, chunk_vocab, k = 4096, 4096, 32, 64, 64, 16
    candidates_bytes = chunk_rows * (k + eagle3._top_k.MERGE_BLOCKS * chunk_vocab) * 4
    assert eagle3._top_k.MERGE_BLOCKS * chunk_vocab < v_draft - k  # several selections

    def sparse(*arrays):
        return prepare_top_k_targets_from_hidden(
            *arrays, k, draft_vocab_size=v_draft, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab
        )

    def temporaries(n_rows: int) -> int:
        shapes = (
            jax.ShapeDtypeStruct((n_rows, hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((v_target, hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((n_rows,), jnp.bool_),
            jax.ShapeDtypeStruct((v_target,), jnp.bool_),
        )
        return jax.jit(sparse).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    few, many = temporaries(1024), temporaries(4096 + 37)
    assert many < 2 * candidates_bytes < (4096 + 37) * v_draft * 4 / 64, (few, many)
    assert many - few < candidates_bytes / 4, (few, many)


def test_torch_outputs_are_detached() -> None:
    torch = pytest.importorskip("torch")
    case = _case(np.random.default_rng(15))
    hidden = torch.tensor(case["hidden"], requires_grad=True)
    weight = torch.tensor(case["weight"], requires_grad=True)
    ids, probs, mask = prepare_top_k_targets_from_hidden(
        hidden, weight, torch.tensor(case["loss_mask"]), torch.tensor(case["t2d"]), 3
    )
    assert not probs.requires_grad
    assert not mask.requires_grad
    assert ids.dtype == torch.int64


# --- bad input ------------------------------------------------------------------------------


def _numpy_arrays(**changes: np.ndarray) -> list[np.ndarray]:
    case = _case(np.random.default_rng(16)) | changes
    return [case[name] for name in ("hidden", "weight", "loss_mask", "t2d")]


@pytest.mark.parametrize(
    ("changes", "k", "keywords", "error", "words"),
    [
        ({}, 0, {}, ValueError, rf"k must be between 1 and .*{V_DRAFT}, got 0"),
        ({}, V_DRAFT + 1, {}, ValueError, rf"k must be between 1 and .*{V_DRAFT}, got 21"),
        ({}, 5, {"draft_vocab_size": 4}, ValueError, "draft_vocab_size"),
        ({}, 2.0, {}, TypeError, "k must be an int"),
        ({}, None, {}, TypeError, "k must be an int"),
        ({"weight": np.ones((V_TARGET, HIDDEN + 1))}, 2, {}, ValueError, "target_head_weight"),
        ({"loss_mask": np.ones((3, 6), dtype=bool)}, 2, {}, ValueError, "loss_mask"),
        ({"t2d": np.zeros(V_TARGET, dtype=bool)}, 2, {}, ValueError, "t2d selects no token"),
        ({"hidden": np.ones((*BATCH, HIDDEN), dtype=np.int64)}, 2, {}, TypeError, "target_hidden"),
        ({"t2d": np.ones(V_TARGET, dtype=np.int64)}, 2, {}, TypeError, "t2d"),
        ({}, 2, {"chunk_rows": 0}, ValueError, "chunk_rows"),
        ({}, 2, {"chunk_vocab": 2.0}, TypeError, "chunk_vocab"),
    ],
)
def test_bad_input_is_refused_as_by_prepare_targets_from_hidden(
    changes, k, keywords, error, words
) -> None:
    arrays = _numpy_arrays(**changes)
    with pytest.raises(error, match=words):
        prepare_top_k_targets_from_hidden(*arrays, k, **keywords)
    if isinstance(k, int) and k == 2:  # the same message as the dense targets give
        with pytest.raises(error) as dense_error:
            prepare_targets_from_hidden(*arrays, **keywords)
        with pytest.raises(error) as sparse_error:
            prepare_top_k_targets_from_hidden(*arrays, k, **keywords)
        assert str(sparse_error.value) == str(dense_error.value)
