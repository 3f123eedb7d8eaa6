"""Specification of softce_multi.eagle3, checked against a plain PyTorch formulation.

Each ``torch_*`` function below is the step as an EAGLE-3 trainer writes it in PyTorch: boolean
indexing with ``t2d``, ``argmax``, ``softmax`` of the upcast draft columns, ``torch.cat`` to shift.
The parity tests run the library on every backend :mod:`softce_multi.testing` finds (NumPy,
array-api-strict, PyTorch and JAX on the CPU; CuPy and the GPUs where present) and compare.
"""

from __future__ import annotations

import importlib
import inspect
import math
import tracemalloc
from fractions import Fraction
from typing import Any

import array_api_compat
import array_api_extra as xpx
import numpy as np
import pytest
from array_api_extra.testing import lazy_xp_function, patch_lazy_xp_functions

import softce_multi as sc
from softce_multi import eagle3
from softce_multi.eagle3 import (
    build_vocab_mapping,
    draft_accuracy,
    draft_to_target_ids,
    multi_step_loss,
    prepare_targets,
    prepare_targets_from_hidden,
    shift_left,
    target_to_draft_ids,
)
from softce_multi.testing import LOSS_RTOL, Backend, device_of, library_of, to_numpy

RTOL_32, RTOL_64 = LOSS_RTOL["float32"], LOSS_RTOL["float64"]

# On the JAX backend the tests below call these under jax.jit (array-api-extra's lazy testing:
# every argument that is not an array is static); the others need concrete values there.
for function in (
    build_vocab_mapping,
    draft_to_target_ids,
    target_to_draft_ids,
    shift_left,
    draft_accuracy,
):
    lazy_xp_function(function)


@pytest.fixture(autouse=True)
def jitted_on_jax(request: pytest.FixtureRequest) -> Any:
    """Run the functions tagged above jitted in the tests that take the JAX ``backend``."""
    if "backend" not in request.fixturenames:
        yield
        return
    backend = request.getfixturevalue("backend")
    if backend.library != "jax":
        yield
        return
    with patch_lazy_xp_functions(request, xp=backend.module):
        yield


def is_of(backend: Backend, x: Any) -> bool:
    """Whether ``x`` is an array of ``backend``'s library on its device."""
    return library_of(x) == backend.library and device_of(x) == backend.device


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch", reason="the PyTorch formulation needs torch")


@pytest.fixture
def jax() -> Any:
    module = pytest.importorskip("jax", reason="jax is not installed")
    importlib.import_module("jax.numpy")
    return module


# --- the plain PyTorch formulation ------------------------------------------------------------


def torch_vocab_mapping(counts: np.ndarray, size: int, forced: tuple[int, ...] = ()) -> tuple:
    import torch

    ranked = sorted(range(len(counts)), key=lambda v: (v not in forced, -counts[v], v))
    chosen = torch.tensor(sorted(ranked[:size]))
    t2d = torch.zeros(len(counts), dtype=torch.bool)
    t2d[chosen] = True
    return (chosen - torch.arange(size)).numpy(), t2d.numpy()


def torch_prepare_targets(target_logits: Any, loss_mask: Any, t2d: Any) -> tuple:
    import torch

    t2d = torch.from_numpy(t2d)
    loss_mask = torch.from_numpy(loss_mask)
    dtype = torch.float64 if target_logits.dtype == torch.float64 else torch.float32
    target_probs = torch.softmax(target_logits[..., t2d].to(dtype), dim=-1)
    position_mask = t2d[target_logits.argmax(dim=-1)].int() * loss_mask.int()
    return target_probs.numpy(), position_mask[..., None].numpy()


def torch_shift_left(x: Any) -> Any:
    import torch

    x = torch.from_numpy(x)
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, -1:])], dim=1).numpy()


def torch_draft_accuracy(logits: Any, target: Any, mask: Any) -> float:
    import torch

    logits, target = torch.from_numpy(logits), torch.from_numpy(target)
    valid = torch.from_numpy(mask).reshape(logits.shape[:-1]) != 0
    hits = (logits.argmax(-1) == target.argmax(-1)) & valid
    return (hits.sum() / valid.sum().clamp_min(1)).item()


def torch_multi_step_loss(losses: list[float], decay: float, normalize: bool) -> float:
    import torch

    weights = [decay**i for i in range(len(losses))]
    total = sum(
        w * loss for w, loss in zip(weights, torch.tensor(losses, dtype=torch.float64), strict=True)
    )
    return (total / sum(weights) if normalize else total).item()


def torch_draft_ids_lookup(t2d: Any) -> Any:
    import torch

    t2d = torch.from_numpy(t2d)
    lookup = torch.full(t2d.shape, -1, dtype=torch.int64)
    lookup[t2d] = torch.arange(int(t2d.sum()))
    return lookup.numpy()


# --- random inputs ----------------------------------------------------------------------------


def random_mapping(rng: np.random.Generator, target_vocab: int, draft_vocab: int) -> tuple:
    chosen = np.sort(rng.choice(target_vocab, size=draft_vocab, replace=False))
    t2d = np.zeros(target_vocab, dtype=bool)
    t2d[chosen] = True
    return chosen - np.arange(draft_vocab), t2d


def random_target_logits(rng: np.random.Generator, shape: tuple, t2d: np.ndarray) -> np.ndarray:
    """Logits whose top token lands both inside and outside the draft vocabulary."""
    logits = rng.standard_normal(shape).astype(np.float32)
    outside = np.flatnonzero(~t2d)
    rows = logits.reshape(-1, shape[-1])
    rows[::2, rng.choice(outside, size=rows[::2].shape[0])] = 8.0
    return logits


# --- build_vocab_mapping ----------------------------------------------------------------------


def test_build_vocab_mapping_matches_torch_formulation(backend: Backend, torch: Any) -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 40, size=1000)  # many equal counts: ties decide
    d2t, t2d = build_vocab_mapping(backend.asarray(counts), 100)
    expected_d2t, expected_t2d = torch_vocab_mapping(counts, 100)
    np.testing.assert_array_equal(backend.to_numpy(d2t), expected_d2t)
    np.testing.assert_array_equal(backend.to_numpy(t2d), expected_t2d)


def test_build_vocab_mapping_forces_always_include(backend: Backend, torch: Any) -> None:
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 40, size=500).astype(np.float32)
    rare = tuple(int(i) for i in np.argsort(counts)[:3])
    d2t, t2d = build_vocab_mapping(backend.asarray(counts), 50, always_include=rare + rare[:1])
    expected_d2t, expected_t2d = torch_vocab_mapping(counts, 50, forced=rare)
    np.testing.assert_array_equal(backend.to_numpy(d2t), expected_d2t)
    np.testing.assert_array_equal(backend.to_numpy(t2d), expected_t2d)


def test_build_vocab_mapping_breaks_ties_by_lower_id_and_fills_with_unseen_tokens() -> None:
    counts = np.array([0, 3, 0, 3, 0, 7])
    d2t, t2d = build_vocab_mapping(counts, 5)
    # 5 (count 7), then 1 and 3 (count 3), then the unseen 0 and 2 in id order.
    np.testing.assert_array_equal(np.arange(5) + d2t, [0, 1, 2, 3, 5])
    np.testing.assert_array_equal(t2d, [True, True, True, True, False, True])


def test_build_vocab_mapping_accepts_always_include_as_array() -> None:
    counts = np.array([9, 8, 7, 1])
    d2t, _ = build_vocab_mapping(counts, 2, always_include=np.array([3]))
    np.testing.assert_array_equal(np.arange(2) + d2t, [0, 3])


def test_build_vocab_mapping_at_llama3_sizes(backend: Backend, torch: Any) -> None:
    rng = np.random.default_rng(2)
    counts = rng.zipf(1.3, size=128256) % 100_000
    d2t, t2d = build_vocab_mapping(backend.asarray(counts), 32000)
    expected_d2t, expected_t2d = torch_vocab_mapping(counts, 32000)
    np.testing.assert_array_equal(backend.to_numpy(d2t), expected_d2t)
    np.testing.assert_array_equal(backend.to_numpy(t2d), expected_t2d)


def test_build_vocab_mapping_returns_index_dtype_and_bool(backend: Backend) -> None:
    d2t, t2d = build_vocab_mapping(backend.asarray(np.array([4, 1, 6])), 2)
    assert is_of(backend, d2t) and is_of(backend, t2d)
    assert "int" in str(d2t.dtype) and "bool" in str(t2d.dtype)
    assert tuple(d2t.shape) == (2,) and tuple(t2d.shape) == (3,)


def test_build_vocab_mapping_refuses_more_tokens_than_exist() -> None:
    with pytest.raises(ValueError, match=r"draft_vocab_size.*target vocabulary size 4, got 5"):
        build_vocab_mapping(np.ones(4), 5)


def test_build_vocab_mapping_refuses_counts_that_are_not_1d() -> None:
    with pytest.raises(ValueError, match=r"token_counts must be 1-D.*\(2, 3\)"):
        build_vocab_mapping(np.ones((2, 3)), 2)


@pytest.mark.parametrize(
    ("always_include", "error", "match"),
    [
        ([7], ValueError, r"always_include ids must lie in \[0, 5\).*\[7\]"),
        ([0, 1, 2], ValueError, "3 distinct ids, more than draft_vocab_size=2"),
        ([1.5], TypeError, "always_include must hold ints"),
    ],
)
def test_build_vocab_mapping_checks_always_include(
    always_include: list, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        build_vocab_mapping(np.ones(5), 2, always_include=always_include)


@pytest.mark.parametrize(
    ("counts", "size", "error", "match"),
    [
        (np.ones(5, dtype=bool), 2, TypeError, "token_counts must have an integer or real"),
        ([1, 2, 3], 2, TypeError, "token_counts must be an array"),
        (np.ones(5), 2.0, TypeError, "draft_vocab_size must be an int"),
        (np.ones(5), 0, ValueError, "draft_vocab_size must be between 1"),
    ],
)
def test_build_vocab_mapping_checks_its_arguments(
    counts: Any, size: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        build_vocab_mapping(counts, size)


# --- draft_to_target_ids and target_to_draft_ids ----------------------------------------------


def test_draft_to_target_ids_matches_torch_formulation(backend: Backend, torch: Any) -> None:
    rng = np.random.default_rng(4)
    d2t, _ = random_mapping(rng, 5000, 300)
    draft_ids = rng.integers(0, 300, size=(3, 7))
    out = draft_to_target_ids(backend.asarray(draft_ids), backend.asarray(d2t))
    ids, offsets = torch.from_numpy(draft_ids), torch.from_numpy(d2t)
    np.testing.assert_array_equal(backend.to_numpy(out), (ids + offsets[ids]).numpy())


def test_target_to_draft_ids_matches_torch_formulation(backend: Backend, torch: Any) -> None:
    rng = np.random.default_rng(5)
    _, t2d = random_mapping(rng, 5000, 300)
    target_ids = rng.integers(0, 5000, size=(4, 9))
    target_ids[0, :3] = np.flatnonzero(t2d)[:3]  # some hits for sure
    out = target_to_draft_ids(backend.asarray(target_ids), backend.asarray(t2d))
    np.testing.assert_array_equal(backend.to_numpy(out), torch_draft_ids_lookup(t2d)[target_ids])


def test_id_translations_invert_each_other(backend: Backend) -> None:
    rng = np.random.default_rng(6)
    d2t, t2d = random_mapping(rng, 2000, 128)
    draft_ids = backend.asarray(np.arange(128))
    target_ids = draft_to_target_ids(draft_ids, backend.asarray(d2t))
    np.testing.assert_array_equal(backend.to_numpy(target_ids), np.flatnonzero(t2d))
    back = target_to_draft_ids(target_ids, backend.asarray(t2d))
    np.testing.assert_array_equal(backend.to_numpy(back), np.arange(128))


def test_ids_outside_the_vocabularies_map_to_minus_one(backend: Backend) -> None:
    d2t, t2d = np.array([1, 1, 2]), np.array([False, True, True, False, True])
    to_target = draft_to_target_ids(backend.asarray(np.array([-1, 3, 2])), backend.asarray(d2t))
    np.testing.assert_array_equal(backend.to_numpy(to_target), [-1, -1, 4])
    labels = np.array([[-100, 0, 4, 5]])
    to_draft = target_to_draft_ids(backend.asarray(labels), backend.asarray(t2d))
    np.testing.assert_array_equal(backend.to_numpy(to_draft), [[-1, -1, 2, -1]])


def test_id_translations_keep_0d_shape(backend: Backend) -> None:
    t2d = backend.asarray(np.array([False, True]))
    out = target_to_draft_ids(backend.asarray(np.asarray(1)), t2d)
    assert tuple(out.shape) == ()
    assert int(backend.to_numpy(out)) == 0


@pytest.mark.parametrize(
    ("ids", "mapping", "error", "match"),
    [
        (np.array([1], dtype=np.uint8), np.ones(3, bool), TypeError, "signed integer.*uint8"),
        (np.array([1.0]), np.ones(3, bool), TypeError, "target_ids must have an integer dtype"),
        (np.array([1]), np.ones(3, np.int64), TypeError, "t2d must be a bool array"),
        (np.array([1]), np.ones((3, 1), bool), ValueError, r"t2d must be 1-D.*\(3, 1\)"),
    ],
)
def test_target_to_draft_ids_checks_its_arguments(
    ids: np.ndarray, mapping: np.ndarray, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        target_to_draft_ids(ids, mapping)


def test_draft_to_target_ids_refuses_a_2d_mapping() -> None:
    with pytest.raises(ValueError, match=r"d2t must be 1-D.*\(2, 2\)"):
        draft_to_target_ids(np.array([0]), np.zeros((2, 2), dtype=np.int64))


def test_id_translations_refuse_mixed_libraries(torch: Any) -> None:
    with pytest.raises(TypeError, match="same array library"):
        draft_to_target_ids(np.array([0]), torch.zeros(3, dtype=torch.int64))


# --- prepare_targets --------------------------------------------------------------------------


@pytest.mark.parametrize("loss_mask_dtype", [bool, np.int32, np.float32])
def test_prepare_targets_matches_torch_formulation(
    backend: Backend, torch: Any, loss_mask_dtype: type
) -> None:
    rng = np.random.default_rng(8)
    _, t2d = random_mapping(rng, 3000, 500)
    logits = random_target_logits(rng, (2, 6, 3000), t2d)
    loss_mask: np.ndarray = (rng.random((2, 6)) < 0.7).astype(loss_mask_dtype)
    probs, position_mask = prepare_targets(
        backend.asarray(logits), backend.asarray(loss_mask), backend.asarray(t2d)
    )
    expected_probs, expected_mask = torch_prepare_targets(torch.from_numpy(logits), loss_mask, t2d)
    assert backend.to_numpy(probs).dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(probs), expected_probs, rtol=RTOL_32)
    np.testing.assert_array_equal(backend.to_numpy(position_mask), expected_mask)
    assert backend.to_numpy(position_mask).dtype == np.dtype(loss_mask_dtype)


def test_prepare_targets_in_float64_matches_torch_formulation(backend: Backend, torch: Any) -> None:
    rng = np.random.default_rng(9)
    _, t2d = random_mapping(rng, 1000, 100)
    logits = random_target_logits(rng, (3, 5, 1000), t2d).astype(np.float64)
    logits += rng.standard_normal(logits.shape) * 1e-3  # bits beyond float32
    loss_mask = rng.random((3, 5)) < 0.8
    probs, position_mask = prepare_targets(
        backend.asarray(logits), backend.asarray(loss_mask), backend.asarray(t2d)
    )
    probs, position_mask = backend.to_numpy(probs), backend.to_numpy(position_mask)
    expected_probs, expected_mask = torch_prepare_targets(torch.from_numpy(logits), loss_mask, t2d)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, expected_probs, rtol=RTOL_64)
    np.testing.assert_array_equal(position_mask, expected_mask)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prepare_targets_in_low_precision_matches_torch_on_the_same_values(
    autodiff_backend: Backend, torch: Any, dtype: str
) -> None:
    rng = np.random.default_rng(10)
    _, t2d = random_mapping(rng, 2000, 400)
    logits = autodiff_backend.asarray(random_target_logits(rng, (2, 5, 2000), t2d), dtype)
    loss_mask = rng.random((2, 5)) < 0.9
    probs, position_mask = prepare_targets(
        logits, autodiff_backend.asarray(loss_mask), autodiff_backend.asarray(t2d)
    )
    rounded = torch.from_numpy(autodiff_backend.to_numpy(logits).astype(np.float32))
    expected_probs, expected_mask = torch_prepare_targets(
        rounded.to(getattr(torch, dtype)), loss_mask, t2d
    )
    assert autodiff_backend.to_numpy(probs).dtype == np.float32
    np.testing.assert_allclose(autodiff_backend.to_numpy(probs), expected_probs, rtol=1e-5)
    np.testing.assert_array_equal(autodiff_backend.to_numpy(position_mask), expected_mask)


def test_prepare_targets_at_llama3_sizes(backend: Backend, torch: Any) -> None:
    rng = np.random.default_rng(11)
    _, t2d = random_mapping(rng, 128256, 32000)
    logits = random_target_logits(rng, (1, 4, 128256), t2d)
    loss_mask = np.array([[True, True, False, True]])
    probs, position_mask = prepare_targets(
        backend.asarray(logits), backend.asarray(loss_mask), backend.asarray(t2d)
    )
    expected_probs, expected_mask = torch_prepare_targets(torch.from_numpy(logits), loss_mask, t2d)
    assert tuple(probs.shape) == (1, 4, 32000)
    np.testing.assert_allclose(backend.to_numpy(probs), expected_probs, rtol=RTOL_32)
    np.testing.assert_array_equal(backend.to_numpy(position_mask), expected_mask)


def test_prepare_targets_takes_the_first_of_tied_top_tokens_like_argmax(backend: Backend) -> None:
    t2d = np.array([False, True, True, False])
    # Row 0: tie between 1 (draft) and 3; row 1: tie between 0 (not draft) and 2; row 2: NaN
    # at 2 counts as the maximum, as in argmax.
    logits = np.array([[[0.0, 5.0, 1.0, 5.0], [4.0, 0.0, 4.0, 1.0], [0.0, 9.0, np.nan, 1.0]]])
    _, position_mask = prepare_targets(
        backend.asarray(logits), backend.asarray(np.ones((1, 3), bool)), backend.asarray(t2d)
    )
    expected = t2d[np.argmax(logits, axis=-1)]
    np.testing.assert_array_equal(expected, [[True, False, True]])
    np.testing.assert_array_equal(backend.to_numpy(position_mask)[..., 0], expected)


def test_prepare_targets_makes_no_float32_copy_of_the_full_vocabulary_logits() -> None:
    rng = np.random.default_rng(25)
    _, t2d = random_mapping(rng, 32768, 512)
    logits = random_target_logits(rng, (2, 64, 32768), t2d).astype(np.float16)
    loss_mask = np.ones((2, 64), dtype=bool)
    prepare_targets(logits, loss_mask, t2d, draft_vocab_size=512)  # first-call set-up
    tracemalloc.start()
    try:
        prepare_targets(logits, loss_mask, t2d, draft_vocab_size=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # NumPy reports its buffers to tracemalloc; a float32 copy of the logits would be 16 MiB.
    assert peak < logits.size * 4 / 8


@pytest.mark.parametrize("vocab", [100, 40000], ids=["at once", "by chunks of rows"])
def test_jax_top_index_is_numpy_argmax_with_ties_and_nan(xla_on_the_cpu, vocab: int) -> None:
    """The first maximum, and in a row with a NaN the first NaN, as NumPy's argmax."""
    jax = xla_on_the_cpu
    from softce_multi.eagle3._arrays import top_index

    rng = np.random.default_rng(27)
    x = rng.integers(0, 3, (40, vocab)).astype(np.float32)  # many ties
    x[3, 70], x[7, 50], x[7, 20] = np.nan, np.nan, np.nan
    x[9, :] = -np.inf

    found = jax.jit(lambda z: top_index(z, xp=jax.numpy))(jax.numpy.asarray(x))

    np.testing.assert_array_equal(np.asarray(found), np.argmax(x, axis=-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepare_targets_under_jax_jit_keeps_no_logits_sized_temporary(
    xla_on_the_cpu, dtype: str
) -> None:
    """XLA's temporaries (its CPU top index by chunks of rows included) stay far below a
    float32 copy of the full-vocabulary logits (compiled only: nothing runs)."""
    jax = xla_on_the_cpu
    shape, draft = (2, 64, 131072), 512
    step = jax.jit(lambda z, mask, t2d: prepare_targets(z, mask, t2d, draft_vocab_size=draft))

    compiled = step.lower(
        jax.ShapeDtypeStruct(shape, jax.numpy.dtype(dtype)),
        jax.ShapeDtypeStruct(shape[:-1], jax.numpy.bool_),
        jax.ShapeDtypeStruct(shape[-1:], jax.numpy.bool_),
    ).compile()

    float32_copy = math.prod(shape) * 4
    # A 16-bit input's chunks are read as their bits, of which XLA keeps one copy (half a
    # float32 copy); the rest is one chunk's temporaries.
    bound = float32_copy / 4 if dtype == "float32" else float32_copy * 3 / 4
    assert compiled.memory_analysis().temp_size_in_bytes < bound


def test_prepare_targets_accepts_a_trailing_unit_axis_on_the_loss_mask(backend: Backend) -> None:
    rng = np.random.default_rng(12)
    _, t2d = random_mapping(rng, 50, 10)
    logits = backend.asarray(random_target_logits(rng, (2, 3, 50), t2d))
    loss_mask = rng.random((2, 3)) < 0.5
    flat = prepare_targets(logits, backend.asarray(loss_mask), backend.asarray(t2d))
    unit = prepare_targets(logits, backend.asarray(loss_mask[..., None]), backend.asarray(t2d))
    for a, b in zip(flat, unit, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_prepare_targets_keeps_loss_mask_weights(backend: Backend) -> None:
    t2d = np.array([True, False, True])
    logits = np.array([[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]])
    weights = np.array([[0.5, 2.0, 0.25]])
    _, position_mask = prepare_targets(
        backend.asarray(logits), backend.asarray(weights), backend.asarray(t2d)
    )
    np.testing.assert_array_equal(backend.to_numpy(position_mask)[..., 0], [[0.5, 0.0, 0.25]])


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64"])
def test_prepare_targets_keeps_unsigned_integer_loss_masks_in_torch(torch: Any, dtype: str) -> None:
    # torch before 2.13 has no `where` for uint16/32/64: the mask is multiplied, not selected.
    t2d = torch.tensor([True, False, True])
    logits = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]])
    loss_mask = torch.tensor([[1, 2, 3]]).to(getattr(torch, dtype))

    _, position_mask = prepare_targets(logits, loss_mask, t2d)

    assert position_mask.dtype == loss_mask.dtype
    np.testing.assert_array_equal(position_mask[..., 0].to(torch.int64).numpy(), [[1, 0, 3]])


def test_prepare_targets_with_given_draft_vocab_size_equals_counted(backend: Backend) -> None:
    rng = np.random.default_rng(13)
    _, t2d = random_mapping(rng, 300, 37)
    logits = backend.asarray(random_target_logits(rng, (2, 4, 300), t2d))
    mask, mapping = backend.asarray(np.ones((2, 4), bool)), backend.asarray(t2d)
    counted = prepare_targets(logits, mask, mapping)
    given = prepare_targets(logits, mask, mapping, draft_vocab_size=37)
    for a, b in zip(counted, given, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_prepare_targets_returns_constants_in_torch(torch: Any) -> None:
    rng = np.random.default_rng(14)
    _, t2d = random_mapping(rng, 100, 20)
    logits = torch.tensor(random_target_logits(rng, (2, 3, 100), t2d), requires_grad=True)
    probs, position_mask = prepare_targets(
        logits, torch.ones(2, 3, dtype=torch.bool), torch.from_numpy(t2d)
    )
    assert not probs.requires_grad and not position_mask.requires_grad


def test_prepare_targets_stops_the_gradient_in_jax(jax: Any) -> None:
    jnp = jax.numpy
    rng = np.random.default_rng(15)
    _, t2d = random_mapping(rng, 100, 20)
    logits = jnp.asarray(random_target_logits(rng, (2, 3, 100), t2d))
    weights = jnp.asarray(rng.standard_normal((2, 3, 20)), dtype=jnp.float32)

    def objective(target_logits: Any) -> Any:
        probs, _ = prepare_targets(target_logits, jnp.ones((2, 3)), jnp.asarray(t2d))
        return jnp.sum(probs * weights)

    assert float(objective(logits)) != 0.0
    np.testing.assert_array_equal(np.asarray(jax.grad(objective)(logits)), 0.0)


def test_prepare_targets_runs_under_jax_jit_with_draft_vocab_size(jax: Any) -> None:
    jnp = jax.numpy
    rng = np.random.default_rng(16)
    _, t2d = random_mapping(rng, 400, 64)
    logits = jnp.asarray(random_target_logits(rng, (2, 5, 400), t2d))
    mask, mapping = jnp.asarray(rng.random((2, 5)) < 0.7), jnp.asarray(t2d)
    jitted = jax.jit(prepare_targets, static_argnames="draft_vocab_size")
    for a, b in zip(
        jitted(logits, mask, mapping, draft_vocab_size=64),
        prepare_targets(logits, mask, mapping),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_prepare_targets_under_jax_jit_asks_for_draft_vocab_size(jax: Any) -> None:
    jnp = jax.numpy
    with pytest.raises(TypeError, match=r"t2d is counted inside jax.jit.*draft_vocab_size"):
        jax.jit(prepare_targets)(jnp.zeros((1, 2, 4)), jnp.ones((1, 2)), jnp.ones(4, dtype=bool))
    # The same for a t2d that is a constant of the traced function.
    t2d = jnp.ones(4, dtype=bool)
    with pytest.raises(TypeError, match=r"t2d is counted inside jax.jit.*draft_vocab_size"):
        jax.jit(lambda *args: prepare_targets(*args, t2d))(jnp.zeros((1, 2, 4)), jnp.ones((1, 2)))


@pytest.mark.parametrize(
    ("logits_shape", "mask_shape", "t2d", "error", "match"),
    [
        ((2, 3, 5), (2, 3), np.ones(6, bool), ValueError, r"t2d; got target_logits \(2, 3, 5\)"),
        ((2, 3, 5), (3, 2), np.ones(5, bool), ValueError, r"loss_mask must have shape \(2, 3\)"),
        ((2, 3, 5), (2, 3), np.ones(5, np.int8), TypeError, "t2d must be a bool array"),
        ((2, 3, 5), (2, 3), np.zeros(5, bool), ValueError, "t2d selects no token"),
    ],
)
def test_prepare_targets_checks_its_arguments(
    logits_shape: tuple, mask_shape: tuple, t2d: np.ndarray, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        prepare_targets(np.zeros(logits_shape), np.ones(mask_shape), t2d)


def test_prepare_targets_refuses_integer_logits() -> None:
    with pytest.raises(TypeError, match="target_logits must have a real floating dtype"):
        prepare_targets(np.zeros((1, 2, 3), dtype=np.int64), np.ones((1, 2)), np.ones(3, bool))


def test_prepare_targets_refuses_a_draft_vocab_size_beyond_the_target_vocabulary() -> None:
    with pytest.raises(ValueError, match=r"draft_vocab_size must be between 1 and .* 3, got 4"):
        prepare_targets(np.zeros((1, 2, 3)), np.ones((1, 2)), np.ones(3, bool), draft_vocab_size=4)


def _wrong_size_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits ``[2, 5, 60]``, a loss mask and a ``t2d`` of 20 draft tokens."""
    _, t2d = random_mapping(rng, 60, 20)
    return random_target_logits(rng, (2, 5, 60), t2d), rng.random((2, 5)) < 0.8, t2d


@pytest.mark.parametrize("size", [19, 21, 60])
@pytest.mark.parametrize("readable", [True, False], ids=["t2d-read", "t2d-not-read"])
def test_prepare_targets_never_trusts_a_draft_vocab_size_that_disagrees_with_t2d(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, size: int, readable: bool
) -> None:
    """A ValueError where t2d is read for free (the CPU backends); NaN targets computed on the
    device where it is not (GPUs, and every backend with the read switched off), without an
    index out of range."""
    if not readable:
        monkeypatch.setattr(eagle3._t2d, "_is_readable_for_free", lambda x, *, xp: False)
    logits, loss_mask, t2d = _wrong_size_case(np.random.default_rng(27))
    args = (backend.asarray(logits), backend.asarray(loss_mask), backend.asarray(t2d))
    if readable and backend.device == "cpu":
        match = rf"draft_vocab_size.*got draft_vocab_size={size}, and t2d selects 20 of its 60"
        with pytest.raises(ValueError, match=match):
            prepare_targets(*args, draft_vocab_size=size)
        return
    probs, position_mask = prepare_targets(*args, draft_vocab_size=size)
    assert tuple(probs.shape) == (2, 5, size)
    assert np.isnan(backend.to_numpy(probs)).all()
    expected_probs, expected_mask = prepare_targets(*args, draft_vocab_size=20)
    assert not np.isnan(backend.to_numpy(expected_probs)).any()
    np.testing.assert_array_equal(backend.to_numpy(position_mask), backend.to_numpy(expected_mask))


@pytest.mark.parametrize("function", ["prepare_targets", "prepare_targets_from_hidden"])
@pytest.mark.parametrize("size", [19, 21])
@pytest.mark.parametrize("t2d_constant", [False, True], ids=["t2d-argument", "t2d-constant"])
def test_a_wrong_draft_vocab_size_under_jax_jit_gives_nan_targets(
    jax: Any, function: str, size: int, t2d_constant: bool
) -> None:
    """Whether t2d is an argument of the traced function or a constant of it, its count is
    traced: it is compared on the device."""
    jnp = jax.numpy
    rng = np.random.default_rng(29)
    logits, loss_mask, t2d = _wrong_size_case(rng)
    hidden, weight = rng.standard_normal((2, 5, 8)), rng.standard_normal((60, 8))
    inputs = (logits,) if function == "prepare_targets" else (hidden, weight)
    args = [jnp.asarray(x) for x in (*inputs, loss_mask, t2d)]
    prepare = getattr(eagle3, function)
    if t2d_constant:
        mapping = args.pop()

        def targets(*arrays: Any, draft_vocab_size: int) -> Any:
            return getattr(eagle3, function)(*arrays, mapping, draft_vocab_size=draft_vocab_size)

        prepare = targets
    jitted = jax.jit(prepare, static_argnames="draft_vocab_size")
    probs, position_mask = jitted(*args, draft_vocab_size=size)
    assert probs.shape == (2, 5, size)
    assert np.isnan(np.asarray(probs)).all()
    expected_probs, expected_mask = jitted(*args, draft_vocab_size=20)
    assert not np.isnan(np.asarray(expected_probs)).any()
    np.testing.assert_array_equal(np.asarray(position_mask), np.asarray(expected_mask))


# --- shift_left -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.float32])
def test_shift_left_matches_torch_formulation(backend: Backend, torch: Any, dtype: type) -> None:
    x: np.ndarray = (np.random.default_rng(17).random((3, 6, 4)) * 10).astype(dtype)
    out = shift_left(backend.asarray(x))
    np.testing.assert_array_equal(backend.to_numpy(out), torch_shift_left(x))


def test_shift_left_along_another_axis_with_a_fill_value(backend: Backend) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = backend.to_numpy(shift_left(backend.asarray(x), axis=-1, fill=-np.inf))
    np.testing.assert_array_equal(out[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(out[:, -1], -np.inf)


def test_shift_left_of_an_empty_axis_is_empty(backend: Backend) -> None:
    out = shift_left(backend.asarray(np.zeros((2, 0), dtype=np.int64)))
    assert tuple(out.shape) == (2, 0)


def test_shift_left_passes_gradients_to_the_shifted_values(torch: Any) -> None:
    x = torch.randn(2, 5, requires_grad=True)
    (shift_left(x) * torch.arange(5.0)).sum().backward()
    expected = torch.cat([torch.zeros(2, 1), torch.arange(4.0).expand(2, 4)], dim=1)
    torch.testing.assert_close(x.grad, expected)


def test_shift_left_together_removes_the_last_position_from_training(backend: Backend) -> None:
    rng = np.random.default_rng(18)
    _, t2d = random_mapping(rng, 40, 40)  # every token is a draft token
    logits = backend.asarray(rng.standard_normal((2, 5, 40)).astype(np.float32))
    loss_mask = backend.asarray(np.ones((2, 5), dtype=bool))
    _, position_mask = prepare_targets(
        shift_left(logits), shift_left(loss_mask), backend.asarray(t2d)
    )
    np.testing.assert_array_equal(backend.to_numpy(position_mask)[:, :, 0], [[1, 1, 1, 1, 0]] * 2)


def test_shifting_prepared_targets_agrees_with_preparing_shifted_logits(backend: Backend) -> None:
    rng = np.random.default_rng(24)
    _, t2d = random_mapping(rng, 60, 20)
    logits = backend.asarray(random_target_logits(rng, (2, 7, 60), t2d))
    loss_mask, mapping = backend.asarray(rng.random((2, 7)) < 0.8), backend.asarray(t2d)
    probs, position_mask = prepare_targets(logits, loss_mask, mapping)
    shifted_probs, shifted_mask = prepare_targets(
        shift_left(logits), shift_left(loss_mask), mapping
    )
    assert backend.to_numpy(shifted_mask).any()
    np.testing.assert_array_equal(
        backend.to_numpy(shift_left(position_mask)), backend.to_numpy(shifted_mask)
    )
    np.testing.assert_array_equal(
        backend.to_numpy(shift_left(probs))[:, :-1], backend.to_numpy(shifted_probs)[:, :-1]
    )


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        (np.zeros((2, 3)), {"axis": 2}, ValueError, r"axis 2 is out of range.*\(2, 3\)"),
        (np.zeros((2, 3)), {"axis": 1.0}, TypeError, "axis must be an int"),
        (np.zeros((2, 3), np.int32), {"fill": 0.5}, TypeError, "whole number.*int32"),
        (np.zeros((2, 3), bool), {"fill": 2}, TypeError, "fill must be 0, 1, False or True"),
        (np.zeros((2, 3)), {"fill": "0"}, TypeError, "fill must be a bool or a real number"),
    ],
)
def test_shift_left_checks_its_arguments(
    x: np.ndarray, kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        shift_left(x, **kwargs)


# --- draft_accuracy ---------------------------------------------------------------------------


def test_draft_accuracy_matches_torch_formulation(backend: Backend, torch: Any) -> None:
    rng = np.random.default_rng(19)
    target = rng.random((4, 16, 50)).astype(np.float32)
    logits = np.where(rng.random((4, 16, 1)) < 0.5, target, rng.standard_normal((4, 16, 50)))
    logits = logits.astype(np.float32)
    mask = rng.random((4, 16, 1)) < 0.6
    accuracy = draft_accuracy(
        backend.asarray(logits), backend.asarray(target), backend.asarray(mask)
    )
    assert tuple(accuracy.shape) == ()
    assert is_of(backend, accuracy)
    expected = torch_draft_accuracy(logits, target, mask)
    assert 0.2 < expected < 0.9
    np.testing.assert_allclose(backend.to_numpy(accuracy), expected, rtol=RTOL_32)


def test_draft_accuracy_compares_the_first_of_tied_top_tokens(backend: Backend) -> None:
    target = np.array([[[0.2, 0.4, 0.4], [0.5, 0.0, 0.5]]])
    logits = np.array([[[0.0, 2.0, 1.0], [0.0, 0.0, 3.0]]])  # a hit, then a miss
    accuracy = draft_accuracy(
        backend.asarray(logits), backend.asarray(target), backend.asarray(np.ones((1, 2), bool))
    )
    np.testing.assert_allclose(backend.to_numpy(accuracy), 0.5, rtol=1e-12)


def test_draft_accuracy_is_zero_without_valid_positions(backend: Backend) -> None:
    logits = backend.asarray(np.random.default_rng(20).random((2, 3, 4)))
    mask = backend.asarray(np.zeros((2, 3), dtype=bool))
    assert float(backend.to_numpy(draft_accuracy(logits, logits, mask))) == 0.0


def test_draft_accuracy_counts_each_weighted_position_once(backend: Backend) -> None:
    target = np.eye(3)[None]  # argmax 0, 1, 2
    logits = np.array([[[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]])  # hits at 0 and 2
    weights = np.array([[5.0, 1.0, 0.5]])
    accuracy = draft_accuracy(
        backend.asarray(logits), backend.asarray(target), backend.asarray(weights)
    )
    np.testing.assert_allclose(backend.to_numpy(accuracy), 2.0 / 3.0, rtol=1e-12)


def test_draft_accuracy_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"target_probs must have the shape of logits"):
        draft_accuracy(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), np.ones((2, 3)))


# --- multi_step_loss --------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("as_sequence", [True, False])
def test_multi_step_loss_matches_torch_formulation(
    backend: Backend, torch: Any, normalize: bool, as_sequence: bool
) -> None:
    values = np.random.default_rng(22).random(5) * 4
    losses = backend.asarray(values)
    if as_sequence:
        losses = [losses[i] for i in range(5)]
    out = backend.to_numpy(multi_step_loss(losses, decay=0.7, normalize=normalize))
    assert out.shape == ()
    expected = torch_multi_step_loss(list(values), 0.7, normalize)
    np.testing.assert_allclose(out, expected, rtol=RTOL_64)


def test_multi_step_loss_defaults_to_decay_0_8_normalized() -> None:
    losses = [np.asarray(1.0), np.asarray(2.0), np.asarray(4.0)]
    expected = (1.0 + 0.8 * 2.0 + 0.64 * 4.0) / (1.0 + 0.8 + 0.64)
    np.testing.assert_allclose(multi_step_loss(losses), expected, rtol=1e-12)


def test_multi_step_loss_gradient_is_the_step_weights_in_torch(torch: Any) -> None:
    losses = [torch.tensor(float(v), requires_grad=True) for v in (0.3, 1.2, 2.5)]
    multi_step_loss(losses, decay=0.5).backward()
    grads = [loss.grad.item() for loss in losses]
    np.testing.assert_allclose(grads, np.array([1.0, 0.5, 0.25]) / 1.75, rtol=1e-6)


def test_multi_step_loss_gradient_is_the_step_weights_in_jax(jax: Any) -> None:
    jnp = jax.numpy
    grad = jax.jit(jax.grad(lambda v: multi_step_loss([v[0], v[1]], normalize=False)))
    np.testing.assert_allclose(np.asarray(grad(jnp.asarray([1.0, 3.0]))), [1.0, 0.8], rtol=1e-6)


@pytest.mark.parametrize(
    ("losses", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "at least one loss"),
        (np.zeros((2, 2)), {}, ValueError, r"an array of shape \(2, 2\)"),
        ([np.zeros(2)], {}, ValueError, r"0-d arrays, got shapes \{'step_losses\[0\]': \(2,\)\}"),
        ([np.asarray(1)], {}, TypeError, "step_losses must have a real floating dtype"),
        ([1.0, 2.0], {}, TypeError, r"step_losses\[0\] must be an array"),
        ([np.asarray(1.0)], {"decay": -0.1}, ValueError, "decay must be finite and non-negative"),
        ([np.asarray(1.0)], {"normalize": 1}, TypeError, "normalize must be a bool"),
    ],
)
def test_multi_step_loss_checks_its_arguments(
    losses: Any, kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        multi_step_loss(losses, **kwargs)


# --- calls by keyword ------------------------------------------------------------------------


def _arguments_by_name(function: str) -> dict[str, Any]:
    """Arguments of ``function``, under its parameter names, in the order of its signature."""
    rng = np.random.default_rng(30)
    d2t, t2d = random_mapping(rng, 60, 20)
    logits = random_target_logits(rng, (2, 5, 60), t2d)
    loss_mask = rng.random((2, 5)) < 0.8
    draft_logits = rng.standard_normal((2, 5, 20))
    target_probs = rng.dirichlet(np.ones(20), size=(2, 5))
    return {
        "build_vocab_mapping": {
            "token_counts": rng.integers(0, 9, size=60),
            "draft_vocab_size": 20,
        },
        "draft_to_target_ids": {"draft_ids": rng.integers(0, 20, size=(2, 5)), "d2t": d2t},
        "target_to_draft_ids": {"target_ids": rng.integers(0, 60, size=(2, 5)), "t2d": t2d},
        "prepare_targets": {"target_logits": logits, "loss_mask": loss_mask, "t2d": t2d},
        "prepare_targets_from_hidden": {
            "target_hidden": rng.standard_normal((2, 5, 8)),
            "target_head_weight": rng.standard_normal((60, 8)),
            "loss_mask": loss_mask,
            "t2d": t2d,
        },
        "shift_left": {"x": logits},
        "draft_accuracy": {
            "logits": draft_logits,
            "target_probs": target_probs,
            "position_mask": loss_mask,
        },
        "multi_step_loss": {"step_losses": [np.asarray(v) for v in rng.random(3)]},
    }[function]


@pytest.mark.parametrize(
    "function",
    [
        build_vocab_mapping,
        draft_to_target_ids,
        target_to_draft_ids,
        prepare_targets,
        prepare_targets_from_hidden,
        shift_left,
        draft_accuracy,
        multi_step_loss,
    ],
    ids=lambda function: function.__name__,
)
def test_the_arrays_are_passed_by_name_and_the_options_by_keyword_only(function: Any) -> None:
    arguments = _arguments_by_name(function.__name__)
    parameters = inspect.signature(inspect.unwrap(function)).parameters
    assert list(parameters)[: len(arguments)] == list(arguments)
    for name, parameter in parameters.items():
        expected = "POSITIONAL_OR_KEYWORD" if name in arguments else "KEYWORD_ONLY"
        assert parameter.kind.name == expected, name
    by_name, by_position = function(**arguments), function(*arguments.values())
    if not isinstance(by_name, tuple):
        by_name, by_position = (by_name,), (by_position,)
    for got, expected in zip(by_name, by_position, strict=True):
        np.testing.assert_array_equal(got, expected)


# --- one training step, end to end ------------------------------------------------------------


def test_training_step_matches_torch_formulation_and_trains_only_the_draft(torch: Any) -> None:
    """Three test-time steps of a linear draft head, against the same loop in plain PyTorch."""
    rng = np.random.default_rng(23)
    _, t2d = random_mapping(rng, 600, 120)
    hidden = torch.from_numpy(rng.standard_normal((2, 9, 16)).astype(np.float32))
    target_head = torch.nn.Linear(16, 600)  # stands for the frozen target model
    with torch.no_grad():
        target_head.bias[torch.from_numpy(t2d)] += 1.5  # most top tokens are draft tokens
    loss_mask = torch.from_numpy(rng.random((2, 9)) < 0.8)

    def run(library: bool) -> tuple[torch.Tensor, torch.nn.Linear]:
        torch.manual_seed(0)
        draft = torch.nn.Linear(16, 120)
        target, mask, state, losses = target_head(hidden), loss_mask, hidden, []
        target = torch.cat([target[:, 1:], torch.zeros_like(target[:, -1:])], dim=1)
        mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, -1:])], dim=1)
        for _ in range(3):
            logits = draft(state)
            if library:
                probs, position_mask = prepare_targets(target, mask, torch.from_numpy(t2d))
                losses.append(sc.masked_soft_cross_entropy(logits, probs, position_mask))
            else:
                with torch.no_grad():
                    probs = torch.softmax(target[..., torch.from_numpy(t2d)].float(), -1)
                    top_in_draft = torch.from_numpy(t2d)[target.argmax(-1)]
                    position_mask = (top_in_draft & mask)[..., None].float()
                per_position = -(probs * torch.log_softmax(logits, -1)).sum(-1, keepdim=True)
                losses.append(
                    (per_position * position_mask).sum() / position_mask.sum().clamp_min(1)
                )
            state = torch.tanh(state).roll(1, dims=-1)
            target, mask = shift_left(target), shift_left(mask)
        if library:
            return multi_step_loss(losses), draft
        weights = [0.8**i for i in range(3)]
        return sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights), draft

    loss, draft = run(library=True)
    expected, expected_draft = run(library=False)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(draft.weight.grad, expected_draft.weight.grad, rtol=1e-5, atol=1e-7)
    assert draft.weight.grad.abs().max() > 0
    assert target_head.weight.grad is None


# --- token ids and fills of every integer width -----------------------------------------------


def array_of(backend: Backend, values: Any, dtype: str) -> Any:
    """``values`` on ``backend`` in the dtype called ``dtype``, the integer widths that
    :class:`~softce_multi.testing.Backend` does not list (int8, int16, uint8...) included."""
    if backend.supports(dtype):
        return backend.asarray(values, dtype)
    wide = backend.asarray(np.asarray(values).astype(np.int64), "int64")
    xp = array_api_compat.array_namespace(wide)
    return xp.astype(wide, getattr(xp, dtype))


NARROW_SIGNED = ["int8", "int16", "int32"]


def reference_draft_ids(t2d: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """The draft id of each target id, -1 where there is none, by a lookup table."""
    table = np.full(t2d.shape[0], -1)
    table[t2d] = np.arange(int(t2d.sum()))
    inside = (target_ids >= 0) & (target_ids < t2d.shape[0])
    return np.where(inside, table[np.where(inside, target_ids, 0)], -1)


@pytest.mark.parametrize("dtype", [*NARROW_SIGNED, "int64"])
def test_target_to_draft_ids_of_any_signed_dtype_keep_their_dtype(
    backend: Backend, dtype: str
) -> None:
    t2d = np.random.default_rng(1).random(300) < 0.3
    target_ids = np.array([[0, 5, 17, 99], [126, 127, -1, -100]])
    out = target_to_draft_ids(array_of(backend, target_ids, dtype), backend.asarray(t2d))
    assert out.dtype == array_of(backend, [0], dtype).dtype
    np.testing.assert_array_equal(to_numpy(out), reference_draft_ids(t2d, target_ids))


@pytest.mark.parametrize("dtype", NARROW_SIGNED)
def test_draft_to_target_ids_of_narrow_dtypes_are_exact(backend: Backend, dtype: str) -> None:
    # Target ids up to 250 do not fit in int8: the result is at least the index dtype.
    t2d = np.zeros(251, dtype=bool)
    t2d[np.arange(2, 251, 2)] = True  # 125 draft tokens, the even target ids from 2 to 250
    d2t = np.flatnonzero(t2d) - np.arange(125)
    draft_ids = np.array([[0, 1, 124], [-1, 125, 60]])
    out = draft_to_target_ids(array_of(backend, draft_ids, dtype), array_of(backend, d2t, dtype))
    np.testing.assert_array_equal(to_numpy(out), [[2, 4, 250], [-1, -1, 122]])
    assert out.dtype == xpx.default_dtype(array_api_compat.array_namespace(out), "indexing")


def test_an_empty_map_translates_every_id_to_minus_one(backend: Backend) -> None:
    ids = backend.asarray(np.array([[0, 1], [-3, 7]]))
    empty_d2t = backend.asarray(np.zeros(0, dtype=np.int64))
    empty_t2d = backend.asarray(np.zeros(0, dtype=bool))

    for out in (draft_to_target_ids(ids, empty_d2t), target_to_draft_ids(ids, empty_t2d)):
        np.testing.assert_array_equal(to_numpy(out), np.full((2, 2), -1))
        assert out.dtype == ids.dtype


def test_draft_to_target_ids_accept_unsigned_ids(backend: Backend) -> None:
    ids = array_of(backend, [[0, 2], [1, 255]], "uint8")
    out = draft_to_target_ids(ids, backend.asarray(np.array([2, 2, 3])))
    np.testing.assert_array_equal(to_numpy(out), [[2, 5], [3, -1]])


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
def test_draft_to_target_ids_take_offsets_of_wide_unsigned_dtypes_in_torch(
    torch: Any, dtype: str
) -> None:
    # PyTorch's index_select has no uint16/32/64: the offsets are converted before the lookup.
    d2t = torch.tensor([2, 2, 3]).to(getattr(torch, dtype))
    out = draft_to_target_ids(torch.tensor([[0, 2], [1, 7]]), d2t)
    np.testing.assert_array_equal(out.numpy(), [[2, 5], [3, -1]])
    assert out.dtype == torch.int64


@pytest.mark.parametrize(
    ("dtype", "fill"),
    [
        ("uint8", -1),
        ("uint8", 256),
        ("int8", 1000),
        ("int8", -129),
        ("int16", 2**15),
        ("int32", 10**400),
        ("int8", 1e3),
        ("int64", math.nan),
        ("int64", math.inf),
        ("float32", 1e39),
        ("float32", -(10**400)),
        ("float64", 10**400),
    ],
    ids=repr,
)
def test_shift_left_refuses_a_fill_outside_the_dtype(
    backend: Backend, dtype: str, fill: Any
) -> None:
    x = array_of(backend, np.ones((1, 3)), dtype)
    with pytest.raises(TypeError, match=f"fill.*{dtype}"):
        shift_left(x, fill=fill)


@pytest.mark.parametrize("fill", [1e5, -7e4])
def test_shift_left_refuses_a_fill_beyond_float16(backend: Backend, fill: float) -> None:
    with pytest.raises(TypeError, match=r"fill.*float16"):
        shift_left(backend.asarray(np.ones((1, 3)), "float16"), fill=fill)


@pytest.mark.parametrize(
    ("dtype", "fill", "expected"),
    [
        ("uint8", 255, 255),
        ("int8", -128, -128),
        ("int8", True, 1),
        ("int16", 7.0, 7),
        ("int64", 2**63 - 1, 2**63 - 1),
        ("float32", math.inf, math.inf),
        ("float32", 10**38, 1e38),
        ("bool", 1, True),
    ],
    ids=repr,
)
def test_shift_left_writes_a_fill_that_fits(
    backend: Backend, dtype: str, fill: Any, expected: Any
) -> None:
    x = array_of(backend, np.zeros((1, 3)), dtype)
    out = to_numpy(shift_left(x, fill=fill))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, np.array([[0, 0, expected]]).astype(dtype))


# --- host arguments at the limits -------------------------------------------------------------


@pytest.mark.parametrize("always_include", [1, "ab", 2.5, b"\x01"], ids=repr)
def test_always_include_that_is_not_a_collection_of_ids_is_refused(
    backend: Backend, always_include: Any
) -> None:
    counts = backend.asarray(np.arange(6))
    with pytest.raises(TypeError, match="always_include"):
        build_vocab_mapping(counts, 3, always_include=always_include)


def test_many_steps_with_a_large_decay_give_the_weighted_mean(backend: Backend) -> None:
    values = np.random.default_rng(5).random(400) * 4
    losses = [backend.asarray(v, "float32") for v in values]
    out = to_numpy(multi_step_loss(losses, decay=10.0))
    weights = [Fraction(10) ** i for i in range(400)]
    stored = [Fraction(float(np.float32(v))) for v in values]
    expected = sum(w * v for w, v in zip(weights, stored, strict=True)) / sum(weights)
    np.testing.assert_allclose(out, float(expected), rtol=1e-5)


def test_many_steps_with_a_large_decay_unnormalized_are_refused(backend: Backend) -> None:
    losses = [backend.asarray(1.0, "float32")] * 400
    with pytest.raises(ValueError, match=r"decay.*400.*float32"):
        multi_step_loss(losses, decay=10.0, normalize=False)
