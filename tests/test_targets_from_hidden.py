"""Specification of softce_multi.eagle3.prepare_targets_from_hidden.

It must give what ``prepare_targets`` gives on the materialised logits
``target_hidden @ target_head_weight.T`` (computed on the same backend, in the same dtype),
whatever the chunk sizes, while the ``[N, V_target]`` logits never exist.
"""

from __future__ import annotations

import numpy as np
import pytest

from softce_multi import eagle3
from softce_multi.eagle3 import prepare_targets, prepare_targets_from_hidden
from softce_multi.testing import Backend, to_numpy

V_TARGET, HIDDEN, V_DRAFT = 50, 16, 20
BATCH = (3, 7)  # N = 21 rows

# (chunk_rows, chunk_vocab): the defaults, larger than N and V_target here (a single chunk of
# each); one row and one column at a time; chunks dividing neither N nor V_target.
CHUNKS = [(None, None), (1, 1), (4, 7)]

#: The chunks of most tests: several of each, the last one partial. Under JAX, each distinct
#: combination of shapes, dtype and chunks compiles once.
MANY = {"chunk_rows": 4, "chunk_vocab": 7}


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


def _both(backend: Backend, case: dict[str, np.ndarray], dtype: str, **chunks: int | None):
    """Return (chunked, materialised) results of prepare_targets on the backend."""
    hidden = backend.asarray(case["hidden"], dtype)
    weight = backend.asarray(case["weight"], dtype)
    loss_mask = backend.asarray(case["loss_mask"])
    t2d = backend.asarray(case["t2d"])
    size = int(case["t2d"].sum())
    chunked = prepare_targets_from_hidden(
        hidden, weight, loss_mask, t2d, draft_vocab_size=size, **chunks
    )
    materialised = prepare_targets(hidden @ weight.T, loss_mask, t2d, draft_vocab_size=size)
    return chunked, materialised


def _assert_same(chunked, materialised, *, rtol: float, atol: float = 0.0) -> None:
    (probs, mask), (expected_probs, expected_mask) = chunked, materialised
    assert probs.shape == expected_probs.shape
    assert probs.dtype == expected_probs.dtype
    np.testing.assert_allclose(to_numpy(probs), to_numpy(expected_probs), rtol=rtol, atol=atol)
    assert mask.dtype == expected_mask.dtype
    np.testing.assert_array_equal(to_numpy(mask), to_numpy(expected_mask))


@pytest.mark.parametrize(("chunk_rows", "chunk_vocab"), CHUNKS)
def test_float64_equals_the_materialised_path(backend: Backend, chunk_rows, chunk_vocab) -> None:
    backend.require("float64")
    case = _case(np.random.default_rng(1))
    both = _both(backend, case, "float64", chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    _assert_same(*both, rtol=1e-12)


@pytest.mark.parametrize(("chunk_rows", "chunk_vocab"), [(None, None), (4, 7)])
def test_float32_equals_the_materialised_path(backend: Backend, chunk_rows, chunk_vocab) -> None:
    case = _case(np.random.default_rng(2))
    both = _both(backend, case, "float32", chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    _assert_same(*both, rtol=1e-5, atol=1e-7)


#: Significand bits after the leading one, of the half-precision dtypes.
MANTISSA_BITS = {"bfloat16": 7, "float16": 10}


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """Normal numbers ``x`` rounded to the nearest of ``dtype`` (ties to even), in float64."""
    spacing = 2.0 ** (np.floor(np.log2(np.abs(x))) - MANTISSA_BITS[dtype])
    return np.round(x / spacing) * spacing


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("chunks", [{}, MANY])
def test_half_precision_logits_are_rounded_once_for_the_softmax_and_the_argmax(
    backend: Backend, dtype: str, chunks: dict
) -> None:
    """The product is rounded to the inputs' dtype, then converted to float32, as the
    materialised product is, on every backend and under every compiler: XLA would otherwise
    keep the float32 product it computes a bfloat16 matmul in."""
    backend.require(dtype)
    case = _case(np.random.default_rng(3), integer=True)
    # Logits near 2**(mantissa bits + 1), where the spacing of the dtype is 1 below and 2 above:
    # integer products, exact in float32 whatever the order of the sums, of which the odd ones
    # above the offset round (to even, so ties are frequent too).
    case["hidden"][..., 0] = 16.0
    case["weight"][:, 0] = 2.0 ** (MANTISSA_BITS[dtype] + 1) / 16
    chunked, materialised = _both(backend, case, dtype, **chunks)
    assert chunked[0].dtype == backend.dtype("float32")
    _assert_same(chunked, materialised, rtol=1e-6)

    exact = case["hidden"] @ case["weight"].T
    logits = _rounded(exact, dtype)
    assert (logits != exact).mean() > 0.2
    draft = logits[..., case["t2d"]]
    probs = np.exp(draft - draft.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    mask = case["loss_mask"] & case["t2d"][np.argmax(logits, axis=-1)]
    np.testing.assert_allclose(to_numpy(chunked[0]), probs, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(to_numpy(chunked[1])[..., 0], mask)


def test_equal_maxima_keep_the_first_index(backend: Backend) -> None:
    """Small integer logits tie often, within vocabulary chunks and across them."""
    case = _case(np.random.default_rng(4), integer=True)
    both = _both(backend, case, "float32", **MANY)
    _assert_same(*both, rtol=1e-6)


@pytest.mark.parametrize("first_in_draft", [False, True])
def test_a_tie_across_a_vocabulary_chunk_boundary_goes_to_the_lower_id(
    backend: Backend, first_in_draft: bool
) -> None:
    rng = np.random.default_rng(5)
    case = _case(rng, integer=True)
    case["hidden"] = np.abs(case["hidden"]) + 1.0
    # Target ids 6 and 7 (the two sides of the boundary of chunks of 7) share the top logit;
    # only one of them is a draft token, so the wrong choice changes the position mask.
    case["weight"][6] = case["weight"][7] = 10.0
    case["t2d"][6], case["t2d"][7] = first_in_draft, not first_in_draft
    chunked, materialised = _both(backend, case, "float32", **MANY)
    _assert_same(chunked, materialised, rtol=1e-6)
    expected = case["loss_mask"] if first_in_draft else np.zeros(BATCH, dtype=bool)
    np.testing.assert_array_equal(to_numpy(chunked[1])[..., 0], expected)


def test_rows_whose_top_token_is_not_a_draft_token_are_masked(backend: Backend) -> None:
    case = _case(np.random.default_rng(6))
    case["loss_mask"][:] = True
    # Rows of the first sequence point at target id 0, which is not a draft token.
    case["t2d"][0], case["t2d"][1] = False, True
    case["weight"][0] = 0.0
    case["weight"][0, 0] = 100.0
    case["hidden"][0, :, 0] = 10.0
    chunked, materialised = _both(backend, case, "float32", **MANY)
    _assert_same(chunked, materialised, rtol=1e-5, atol=1e-7)
    mask = to_numpy(chunked[1])[..., 0]
    assert not mask[0].any()
    assert mask[1:].any()


@pytest.mark.parametrize("mask_dtype", ["bool", "int32", "float32"])
@pytest.mark.parametrize("trailing_one", [False, True])
def test_the_loss_mask_keeps_its_dtype_and_shape_rules(
    backend: Backend, mask_dtype: str, trailing_one: bool
) -> None:
    rng = np.random.default_rng(7)
    case = _case(rng)
    weights = np.where(case["loss_mask"], rng.random(BATCH) + 0.5, 0.0).astype(mask_dtype)
    case["loss_mask"] = weights[..., None] if trailing_one else weights
    chunked, materialised = _both(backend, case, "float32", **MANY)
    _assert_same(chunked, materialised, rtol=1e-5, atol=1e-7)
    assert chunked[1].shape == (*BATCH, 1)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_hidden_rows_give_what_the_materialised_path_gives(backend: Backend) -> None:
    case = _case(np.random.default_rng(8))
    case["hidden"][1, 2] = np.nan
    case["hidden"][2, 0, 3] = np.inf
    case["loss_mask"][1, 2] = False
    both = _both(backend, case, "float32", **MANY)
    _assert_same(*both, rtol=1e-5, atol=1e-7)


def test_no_rows(backend: Backend) -> None:
    case = _case(np.random.default_rng(9))
    case["hidden"] = case["hidden"][:0]
    case["loss_mask"] = case["loss_mask"][:0]
    probs, mask = _both(backend, case, "float32", **MANY)[0]
    assert probs.shape == (0, BATCH[1], int(case["t2d"].sum()))
    assert mask.shape == (0, BATCH[1], 1)


def test_without_draft_vocab_size_the_size_is_read_from_t2d(backend: Backend) -> None:
    case = _case(np.random.default_rng(10))
    args = [backend.asarray(case[name]) for name in ("hidden", "weight", "loss_mask", "t2d")]
    probs, mask = prepare_targets_from_hidden(*args, **MANY)
    expected_probs, expected_mask = prepare_targets_from_hidden(
        *args, **MANY, draft_vocab_size=int(case["t2d"].sum())
    )
    np.testing.assert_array_equal(to_numpy(probs), to_numpy(expected_probs))
    np.testing.assert_array_equal(to_numpy(mask), to_numpy(expected_mask))


@pytest.mark.parametrize("size", [V_DRAFT - 1, V_DRAFT + 1, V_TARGET])
@pytest.mark.parametrize("readable", [True, False], ids=["t2d-read", "t2d-not-read"])
def test_a_draft_vocab_size_that_disagrees_with_t2d_is_never_trusted(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, size: int, readable: bool
) -> None:
    """A ValueError where t2d is read for free (the CPU backends); NaN targets computed on the
    device where it is not (GPUs, and every backend with the read switched off), without an
    index out of range."""
    if not readable:
        monkeypatch.setattr(eagle3._t2d, "_is_readable_for_free", lambda x, *, xp: False)
    case = _case(np.random.default_rng(16))
    args = [backend.asarray(case[name]) for name in ("hidden", "weight", "loss_mask", "t2d")]
    if readable and backend.device == "cpu":
        match = rf"got draft_vocab_size={size}, and t2d selects {V_DRAFT} of its {V_TARGET}"
        with pytest.raises(ValueError, match=match):
            prepare_targets_from_hidden(*args, draft_vocab_size=size, **MANY)
        return
    probs, mask = prepare_targets_from_hidden(*args, draft_vocab_size=size, **MANY)
    assert tuple(probs.shape) == (*BATCH, size)
    assert np.isnan(to_numpy(probs)).all()
    expected_probs, expected_mask = prepare_targets_from_hidden(
        *args, draft_vocab_size=V_DRAFT, **MANY
    )
    assert not np.isnan(to_numpy(expected_probs)).any()
    np.testing.assert_array_equal(to_numpy(mask), to_numpy(expected_mask))


def test_inputs_are_unchanged(backend: Backend) -> None:
    case = _case(np.random.default_rng(11))
    args = [backend.asarray(case[name]) for name in ("hidden", "weight", "loss_mask", "t2d")]
    copies = [to_numpy(arg) for arg in args]
    prepare_targets_from_hidden(*args, **MANY)
    for arg, copy in zip(args, copies, strict=True):
        np.testing.assert_array_equal(to_numpy(arg), copy)


# --- frameworks -----------------------------------------------------------------------------


def test_under_jax_jit_with_draft_vocab_size() -> None:
    jax = pytest.importorskip("jax")
    case = _case(np.random.default_rng(12), integer=True)
    args = [jax.numpy.asarray(case[name]) for name in ("hidden", "weight", "loss_mask", "t2d")]
    size = int(case["t2d"].sum())

    @jax.jit
    def targets(*arrays):
        return prepare_targets_from_hidden(*arrays, draft_vocab_size=size, **MANY)

    expected = prepare_targets(args[0] @ args[1].T, args[2], args[3], draft_vocab_size=size)
    _assert_same(targets(*args), expected, rtol=1e-12)


def test_under_jax_jit_without_draft_vocab_size_is_a_type_error() -> None:
    jax = pytest.importorskip("jax")
    case = _case(np.random.default_rng(13))
    args = [jax.numpy.asarray(case[name]) for name in ("hidden", "weight", "loss_mask", "t2d")]
    with pytest.raises(TypeError, match="draft_vocab_size"):
        jax.jit(prepare_targets_from_hidden)(*args)


def test_jax_temporaries_are_bounded_by_the_chunk(xla_on_the_cpu) -> None:
    """Under ``jax.jit``, XLA's temporaries hold a few ``[chunk_rows, chunk_vocab]`` blocks of
    logits, whatever ``N``: at ``N = 4133`` under four blocks (256 KiB), where the ``[N, V_target]``
    float32 logits of the materialised path would take 65 MiB."""
    jax = xla_on_the_cpu
    jnp = jax.numpy
    v_target, v_draft, hidden_size, chunk_rows, chunk_vocab = 4096, 1024, 32, 64, 256
    block_bytes = chunk_rows * chunk_vocab * 4

    def chunked(*arrays):
        return prepare_targets_from_hidden(
            *arrays, draft_vocab_size=v_draft, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab
        )

    def temporaries(n_rows: int) -> int:
        shapes = (
            jax.ShapeDtypeStruct((n_rows, hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((v_target, hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((n_rows,), jnp.bool_),
            jax.ShapeDtypeStruct((v_target,), jnp.bool_),
        )
        return jax.jit(chunked).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    few, many = temporaries(1024), temporaries(4096 + 37)
    assert many < 4 * block_bytes, (few, many)
    assert many - few < block_bytes, (few, many)


def test_torch_outputs_are_detached() -> None:
    torch = pytest.importorskip("torch")
    case = _case(np.random.default_rng(14))
    hidden = torch.tensor(case["hidden"], requires_grad=True)
    weight = torch.tensor(case["weight"], requires_grad=True)
    probs, mask = prepare_targets_from_hidden(
        hidden, weight, torch.tensor(case["loss_mask"]), torch.tensor(case["t2d"])
    )
    assert not probs.requires_grad
    assert not mask.requires_grad


@pytest.mark.parametrize("chunks", [{}, MANY])
def test_torch_compile_with_dynamic_shapes_equals_eager(chunks) -> None:
    torch = pytest.importorskip("torch")
    case = _case(np.random.default_rng(16))
    weight, t2d = torch.tensor(case["weight"]), torch.tensor(case["t2d"])

    def targets(hidden, loss_mask):
        return prepare_targets_from_hidden(
            hidden, weight, loss_mask, t2d, draft_vocab_size=V_DRAFT, **chunks
        )

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(targets, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (BATCH[1], BATCH[1] - 2):
        hidden = torch.tensor(case["hidden"][:, :rows])
        loss_mask = torch.tensor(case["loss_mask"][:, :rows])
        _assert_same(compiled(hidden, loss_mask), targets(hidden, loss_mask), rtol=1e-12)
    # One chunk of rows (the default here) is one symbolic graph for every size; several chunks
    # unroll their Python loop, a graph per number of chunks.
    assert counters["stats"]["unique_graphs"] == (1 if not chunks else 2)


# --- bad input ------------------------------------------------------------------------------


def _arrays(**changes: np.ndarray) -> list[np.ndarray]:
    case = _case(np.random.default_rng(15)) | changes
    return [case[name] for name in ("hidden", "weight", "loss_mask", "t2d")]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"weight": np.ones((V_TARGET, HIDDEN + 1))}, [r"target_head_weight \(50, 17\)", "H"]),
        ({"weight": np.ones((V_TARGET, HIDDEN, 1))}, [r"target_head_weight \(50, 16, 1\)"]),
        ({"weight": np.ones((V_TARGET + 1, HIDDEN))}, [r"target_head_weight \(51, 16\)", "t2d"]),
        ({"loss_mask": np.ones((3, 6), dtype=bool)}, ["loss_mask", "target_hidden"]),
        ({"t2d": np.zeros(V_TARGET, dtype=bool)}, ["t2d selects no token"]),
        ({"hidden": np.ones(())}, ["target_hidden"]),
    ],
)
def test_bad_shapes_are_value_errors_naming_the_arguments(changes, words) -> None:
    with pytest.raises(ValueError, match=words[0]) as error:
        prepare_targets_from_hidden(*_arrays(**changes))
    for word in words[1:]:
        assert word in str(error.value)


@pytest.mark.parametrize(
    ("changes", "keywords", "error", "word"),
    [
        ({"hidden": np.ones((*BATCH, HIDDEN), dtype=np.int64)}, {}, TypeError, "target_hidden"),
        ({"weight": np.ones((V_TARGET, HIDDEN), dtype=bool)}, {}, TypeError, "target_head_weight"),
        ({"t2d": np.ones(V_TARGET, dtype=np.int64)}, {}, TypeError, "t2d"),
        ({}, {"chunk_rows": 0}, ValueError, "chunk_rows"),
        ({}, {"chunk_vocab": 2.0}, TypeError, "chunk_vocab"),
        ({}, {"draft_vocab_size": V_TARGET + 1}, ValueError, "draft_vocab_size"),
    ],
)
def test_bad_types_and_values_are_named(changes, keywords, error, word) -> None:
    with pytest.raises(error, match=word):
        prepare_targets_from_hidden(*_arrays(**changes), **keywords)


def test_the_default_vocabulary_chunk_is_sized_for_the_rows_a_chunk_holds() -> None:
    """A row chunk longer than the N rows holds N rows: the default vocabulary chunk is sized
    for those, not for the empty rest (one column per chunk would take a loop per column)."""
    from softce_multi.eagle3._from_hidden import TARGET_CHUNK_ELEMENTS, from_hidden_inputs

    hidden, weight = np.ones((2, 32, 4)), np.ones((50, 4))
    mask, t2d = np.ones((2, 32), bool), np.arange(50) < 10

    def columns(chunk_rows: int) -> int:
        inputs = from_hidden_inputs(
            hidden, weight, mask, t2d, draft_vocab_size=10, chunk_rows=chunk_rows, chunk_vocab=None
        )
        return inputs.chunk.vocab

    assert columns(2**20) == columns(64) == TARGET_CHUNK_ELEMENTS // 64
    assert columns(16) == TARGET_CHUNK_ELEMENTS // 16


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top-k"])
def test_torch_func_vmap_is_refused_by_name(top_k) -> None:
    torch = pytest.importorskip("torch")
    hidden, weight = torch.randn(3, 2, 4, 5), torch.randn(9, 5)
    mask, t2d = torch.ones(3, 2, 4, dtype=torch.bool), torch.arange(9) < 4

    def targets(h: object, m: object) -> object:
        if top_k is None:
            return prepare_targets_from_hidden(h, weight, m, t2d, draft_vocab_size=4)
        return eagle3.prepare_top_k_targets_from_hidden(h, weight, m, t2d, top_k)

    with pytest.raises(NotImplementedError, match=r"do not support torch\.func\.vmap"):
        torch.func.vmap(targets)(hidden, mask)


def test_torch_func_grad_around_the_targets_still_runs() -> None:
    """Only vmap is refused: under ``torch.func.grad`` the targets are constants, as outside."""
    torch = pytest.importorskip("torch")
    hidden, weight = torch.randn(2, 4, 5), torch.randn(9, 5)
    mask, t2d = torch.ones(2, 4, dtype=torch.bool), torch.arange(9) < 4
    expected, _ = prepare_targets_from_hidden(hidden, weight, mask, t2d)

    def objective(scale: object) -> object:
        probs, _ = prepare_targets_from_hidden(hidden, weight, mask, t2d)
        return (scale * probs).sum()

    grad = torch.func.grad(objective)(torch.tensor(2.0))
    torch.testing.assert_close(grad, expected.sum())
