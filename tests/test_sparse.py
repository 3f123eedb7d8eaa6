"""Sparse (top-k) targets: ``target_ids=`` on every loss equals the dense loss on the targets
they stand for, on every backend.

The oracle is the float64 reference on :func:`softce_multi.testing.dense_targets` of the ids
and probabilities; the gradient to ``target_probs`` is the dense one gathered at the ids.
Every case has duplicate ids, a slot of probability 0 whose id lies outside the vocabulary, a
tail mass that is simply absent (the probabilities sum to less than 1), and padding positions
that hold NaN logits, NaN probabilities and ids outside the vocabulary with mass.
"""

from __future__ import annotations

import numpy as np
import pytest

import softce_multi as sc
from softce_multi import testing
from softce_multi.testing import (
    REDUCTIONS,
    assert_gradient_close,
    assert_loss_close,
    dense_targets,
    reference,
    to_float64,
    to_numpy,
)

K = 6
SHAPE = (2, 5, 37)  # [B, T, V]


class SparseCase:
    """Random logits and sparse targets on a backend, with the dense oracle's inputs."""

    def __init__(self, backend, rng, shape=SHAPE, *, logits_dtype="float64", ids_dtype="int64"):
        batch, vocab = shape[:-1], shape[-1]
        z = rng.standard_normal(shape) * 3
        ids = rng.integers(0, vocab, (*batch, K))
        probs = rng.dirichlet(np.ones(K), size=batch) * 0.9  # a tenth of the mass is absent
        ids[..., 1] = ids[..., 0]  # duplicates add up
        probs[..., -1] = 0.0  # a padding slot: probability 0, an id outside [0, V)
        ids[..., -1] = rng.choice([-1, vocab, vocab + 5], size=batch)
        mask = rng.random(batch) < 0.7
        mask.flat[0] = True
        padding = ~mask
        z[padding] = np.nan
        probs[padding] = np.nan
        ids[padding, 2] = vocab + 1
        self.vocab = vocab
        self.mask = mask
        self.ids_np = ids
        self.logits = backend.asarray(z, logits_dtype)
        self.target_probs = backend.asarray(probs, "float64")
        self.target_ids = backend.asarray(ids, ids_dtype)
        self.position_mask = backend.asarray(mask)
        # The oracle sees the exact values the backend holds, padding zeroed (it changes nothing).
        self.z = np.where(mask[..., None], to_float64(self.logits), 0.0)
        self.p_sparse = np.where(mask[..., None], probs, 0.0)
        self.p = dense_targets(np.where(mask[..., None], ids, 0), self.p_sparse, vocab)
        self.compute = "float64"  # the targets are float64

    def expected(self, **options):
        return reference(self.z, self.p, self.mask, **options)

    def gathered(self, grad_targets):
        """The dense targets gradient at the ids; 0 at slots of probability 0 outside [0, V)."""
        ids = self.ids_np
        valid = (ids >= 0) & (ids < self.vocab)
        picked = np.take_along_axis(grad_targets, np.where(valid, ids, 0), axis=-1)
        return np.where(valid & self.mask[..., None], picked, 0.0)


def sparse_loss(case, **options):
    return sc.masked_soft_cross_entropy(
        case.logits,
        case.target_probs,
        case.position_mask,
        target_ids=case.target_ids,
        **options,
    )


# --------------------------------------------------------------------------------------------
# Values on every backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids_dtype", ["int32", "int64"])
@pytest.mark.parametrize("logits_dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_loss_is_the_dense_loss_of_the_scattered_targets(
    backend, reduction, logits_dtype, ids_dtype
):
    backend.require(logits_dtype)
    case = SparseCase(
        backend, np.random.default_rng(0), logits_dtype=logits_dtype, ids_dtype=ids_dtype
    )

    loss = sparse_loss(case, reduction=reduction)

    assert_loss_close(loss, case.expected(reduction=reduction).loss, case.compute)


@pytest.mark.parametrize("ids_dtype", ["uint8", "uint16", "uint32", "uint64"])
def test_unsigned_target_ids_give_the_loss_and_gradients_of_int64_ids(backend, ids_dtype):
    """Every unsigned width, ids beyond the vocabulary (with probability 0) included; PyTorch's
    CPU kernels compare and gather no uint16, uint32 or uint64."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, SHAPE[-1], (*SHAPE[:-1], K))
    ids[..., -1] = SHAPE[-1] + 2
    probs = rng.dirichlet(np.ones(K), size=SHAPE[:-1])
    probs[..., -1] = 0.0
    z = backend.asarray(rng.standard_normal(SHAPE), "float64")
    p = backend.asarray(probs, "float64")
    mask = backend.asarray(rng.random(SHAPE[:-1]) < 0.8)
    hidden = backend.asarray(rng.standard_normal((*SHAPE[:-1], 4)), "float64")
    weight = backend.asarray(rng.standard_normal((SHAPE[-1], 4)), "float64")
    signed, unsigned = backend.asarray(ids, "int64"), backend.asarray(ids, ids_dtype)

    def results(ids):
        loss, grad = sc.masked_soft_cross_entropy_with_grad(z, p, mask, target_ids=ids)
        linear_loss, grads = sc.linear_masked_soft_cross_entropy_with_grad(
            hidden, weight, p, mask, target_ids=ids
        )
        return [loss, grad, linear_loss, grads.hidden, grads.weight]

    for actual, expected in zip(results(unsigned), results(signed), strict=True):
        np.testing.assert_array_equal(to_numpy(actual), to_numpy(expected))


@pytest.mark.parametrize(
    ("ids_dtype", "vocab"), [("int8", 200), ("uint8", 300), ("int16", 40000)], ids=str
)
def test_ids_of_a_dtype_narrower_than_the_vocabulary_give_the_loss_of_int64_ids(
    backend, ids_dtype, vocab
):
    """Every id fits its dtype, the vocabulary size does not: it bounds no id."""
    backend.require(ids_dtype)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 100, (2, 3, K))
    ids[0, 0, 0] = -1  # outside the vocabulary, with mass: that position is NaN
    probs = rng.dirichlet(np.ones(K), size=(2, 3))
    z = backend.asarray(rng.standard_normal((2, 3, vocab)), "float64")
    p = backend.asarray(probs, "float64")
    mask = backend.asarray(np.ones((2, 3), bool))

    narrow = backend.asarray(ids, ids_dtype)  # uint8 holds -1 as 255, an id of the vocabulary
    wide = backend.asarray(to_numpy(narrow).astype(np.int64), "int64")

    def losses(ids_array):
        loss = sc.masked_soft_cross_entropy(z, p, mask, target_ids=ids_array, reduction="none")
        _, grad = sc.masked_soft_cross_entropy_with_grad(
            z, p, mask, target_ids=ids_array, reduction="sum"
        )
        return to_numpy(loss), to_numpy(grad)

    (narrow_loss, narrow_grad), (wide_loss, wide_grad) = losses(narrow), losses(wide)
    np.testing.assert_array_equal(narrow_loss, wide_loss)
    np.testing.assert_array_equal(narrow_grad, wide_grad)
    assert np.isnan(narrow_loss[0, 0]) == ids_dtype.startswith("int")
    assert np.all(np.isfinite(narrow_loss.reshape(-1)[1:]))


@pytest.mark.parametrize(
    ("reduction", "num_valid"), [("mean", None), ("mean", 40.0), ("mean", 0), ("sum", None)]
)
def test_sparse_loss_with_grad_matches_the_dense_oracle(backend, reduction, num_valid):
    case = SparseCase(backend, np.random.default_rng(1))
    expected = case.expected(reduction=reduction, num_valid=num_valid)

    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits,
        case.target_probs,
        case.position_mask,
        reduction=reduction,
        num_valid=num_valid,
        target_ids=case.target_ids,
    )

    assert_loss_close(loss, expected.loss, case.compute)
    assert_gradient_close(grad, expected.grad_logits, case.compute)


@pytest.mark.parametrize("logits_dtype", ["float32", "bfloat16"])
def test_sparse_gradient_in_low_precision_matches_the_dense_oracle(backend, logits_dtype):
    backend.require(logits_dtype)
    case = SparseCase(backend, np.random.default_rng(2), logits_dtype=logits_dtype)

    _, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask, target_ids=case.target_ids
    )

    assert_gradient_close(grad, case.expected().grad_logits, case.compute)


def test_padding_positions_get_exact_zeros_whatever_they_hold(backend):
    case = SparseCase(backend, np.random.default_rng(3))

    losses = to_numpy(sparse_loss(case, reduction="none"))
    _, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask, target_ids=case.target_ids
    )

    padding = ~case.mask
    assert np.isfinite(losses).all()
    assert (losses[padding] == 0).all()
    assert (to_numpy(grad)[padding] == 0).all()


def test_an_id_outside_the_vocabulary_with_mass_makes_its_position_nan(backend):
    rng = np.random.default_rng(4)
    case = SparseCase(backend, rng)
    ids = case.ids_np.copy()
    ids[0, 0, 0] = case.vocab  # position (0, 0) is valid, and this slot has mass
    bad = backend.asarray(ids)

    losses = to_numpy(
        sc.masked_soft_cross_entropy(
            case.logits, case.target_probs, case.position_mask, reduction="none", target_ids=bad
        )
    )
    _, grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask, target_ids=bad
    )

    assert np.isnan(losses[0, 0])
    others = np.ones(losses.shape, dtype=bool)
    others[0, 0] = False
    assert np.isfinite(losses[others]).all()
    grad = to_numpy(grad)
    assert np.isnan(grad[0, 0]).any()
    assert np.isfinite(grad[others]).all()


def test_no_targets_at_all_cost_nothing(backend):
    case = SparseCase(backend, np.random.default_rng(5))
    empty = backend.asarray(np.zeros((*SHAPE[:-1], 0)))
    no_ids = backend.asarray(np.zeros((*SHAPE[:-1], 0), dtype=np.int64))

    loss = sc.masked_soft_cross_entropy(case.logits, empty, case.position_mask, target_ids=no_ids)

    assert float(to_numpy(loss)) == 0.0


@pytest.mark.parametrize("logits_dtype", ["float32", "bfloat16"])
def test_torch_cpu_blocks_shared_among_workers_match_the_dense_oracle(monkeypatch, logits_dtype):
    # 2 rows per block, 5 blocks taken by 2 workers, each mapping its block's pages first;
    # padding holds NaN, slots hold duplicates and bad ids.
    torch = pytest.importorskip("torch")
    from softce_multi import _core

    backend = next(b for b in testing.backends() if b.name == "torch-cpu")
    monkeypatch.setattr(_core, "BLOCK_ELEMENTS", 2 * SHAPE[-1])
    case = SparseCase(backend, np.random.default_rng(7), logits_dtype=logits_dtype)
    expected = case.expected()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loss, grad = sc.masked_soft_cross_entropy_with_grad(
            case.logits, case.target_probs, case.position_mask, target_ids=case.target_ids
        )
    finally:
        torch.set_num_threads(threads)

    assert_loss_close(loss, expected.loss, case.compute)
    assert_gradient_close(grad, expected.grad_logits, case.compute, dtype=logits_dtype)


# --------------------------------------------------------------------------------------------
# Autodiff: torch and JAX
# --------------------------------------------------------------------------------------------


def differentiate_sparse(backend, case, *, reduction, upstream):
    """Loss and (d/d logits, d/d target_probs) of the sparse loss by the backend's autodiff."""
    if backend.library == "torch":
        logits = case.logits.clone().requires_grad_(True)
        targets = case.target_probs.clone().requires_grad_(True)
        loss = sc.masked_soft_cross_entropy(
            logits,
            targets,
            case.position_mask,
            reduction=reduction,
            target_ids=case.target_ids,
        )
        loss.backward(backend.asarray(upstream).to(loss.dtype))
        return loss, logits.grad, targets.grad
    import jax

    def loss_of(logits, targets):
        return sc.masked_soft_cross_entropy(
            logits,
            targets,
            case.position_mask,
            reduction=reduction,
            target_ids=case.target_ids,
        )

    loss, pullback = jax.vjp(loss_of, case.logits, case.target_probs)
    return (loss, *pullback(backend.asarray(upstream).astype(loss.dtype)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autodiff_gradients_to_logits_and_targets_match_the_dense_oracle(
    autodiff_backend, reduction
):
    rng = np.random.default_rng(6)
    case = SparseCase(autodiff_backend, rng)
    upstream = rng.standard_normal(SHAPE[:-1]) if reduction == "none" else np.float64(1.7)
    expected = case.expected(reduction=reduction, upstream=upstream)

    loss, grad_logits, grad_targets = differentiate_sparse(
        autodiff_backend, case, reduction=reduction, upstream=upstream
    )

    assert_loss_close(loss, expected.loss, "float64")
    assert_gradient_close(grad_logits, expected.grad_logits, "float64")
    assert_gradient_close(grad_targets, case.gathered(expected.grad_targets), "float64")


def test_torch_compile_fullgraph_gives_the_eager_sparse_loss_and_gradient():
    torch = pytest.importorskip("torch")
    from softce_multi.testing import known_backends
    from softce_multi.torch import masked_soft_cross_entropy

    backend = next(b for b in known_backends() if b.name == "torch-cpu")
    case = SparseCase(backend, np.random.default_rng(7), logits_dtype="float32")
    compiled = torch.compile(masked_soft_cross_entropy, fullgraph=True)
    grads = []
    losses = []
    for function in (masked_soft_cross_entropy, compiled):
        logits = case.logits.clone().requires_grad_(True)
        loss = function(logits, case.target_probs, case.position_mask, target_ids=case.target_ids)
        loss.backward()
        losses.append(loss.detach())
        grads.append(logits.grad)

    # Inductor may sum in another order: float32 roundings apart, no more.
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)


def test_torch_func_grad_under_vmap_matches_the_dense_oracle():
    torch = pytest.importorskip("torch")
    from torch.func import grad, vmap

    from softce_multi.testing import known_backends
    from softce_multi.torch import masked_soft_cross_entropy

    backend = next(b for b in known_backends() if b.name == "torch-cpu")
    case = SparseCase(backend, np.random.default_rng(8))
    mask = case.position_mask

    def per_sequence(logits, targets, ids, weights):
        return masked_soft_cross_entropy(logits, targets, weights, target_ids=ids)

    grads = vmap(grad(per_sequence))(case.logits, case.target_probs, case.target_ids, mask)

    for b in range(SHAPE[0]):
        expected = reference(case.z[b], case.p[b], case.mask[b])
        assert_gradient_close(grads[b], expected.grad_logits, "float64")
    assert torch.isfinite(grads).all()


def test_jax_jit_grad_and_vmap_match_the_dense_oracle():
    jax = pytest.importorskip("jax")
    from softce_multi.testing import known_backends

    backend = next(b for b in known_backends() if b.name == "jax-cpu")
    case = SparseCase(backend, np.random.default_rng(9), ids_dtype="int32")

    def per_sequence(logits, targets, ids, weights):
        return sc.masked_soft_cross_entropy(logits, targets, weights, target_ids=ids)

    grads = jax.jit(jax.vmap(jax.grad(per_sequence)))(
        case.logits, case.target_probs, case.target_ids, case.position_mask
    )

    for b in range(SHAPE[0]):
        expected = reference(case.z[b], case.p[b], case.mask[b])
        assert_gradient_close(grads[b], expected.grad_logits, "float64")


# --------------------------------------------------------------------------------------------
# The linear loss
# --------------------------------------------------------------------------------------------


class SparseLinearCase:
    """Hidden states, an output layer and sparse targets, with the dense oracle's logits."""

    def __init__(self, backend, rng, *, hidden_size=8, dtype="float64"):
        batch, vocab = SHAPE[:-1], SHAPE[-1]
        self.sparse = SparseCase(backend, rng)
        hidden = rng.standard_normal((*batch, hidden_size))
        hidden[~self.sparse.mask] = np.nan
        weight = rng.standard_normal((vocab, hidden_size)) * 0.5
        bias = rng.standard_normal(vocab)
        self.hidden = backend.asarray(hidden, dtype)
        self.weight = backend.asarray(weight, dtype)
        self.bias = backend.asarray(bias, dtype)
        live = np.where(self.sparse.mask[..., None], to_float64(self.hidden), 0.0)
        self.z = live @ to_float64(self.weight).T + to_float64(self.bias)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_sparse_linear_loss_with_grad_matches_the_dense_oracle(backend, chunk_rows):
    case = SparseLinearCase(backend, np.random.default_rng(10))
    sparse = case.sparse

    loss, grads = sc.linear_masked_soft_cross_entropy_with_grad(
        case.hidden,
        case.weight,
        sparse.target_probs,
        sparse.position_mask,
        bias=case.bias,
        chunk_rows=chunk_rows,
        target_ids=sparse.target_ids,
    )

    expected = reference(case.z, sparse.p, sparse.mask)
    assert_loss_close(loss, expected.loss, "float64")
    live = np.where(sparse.mask[..., None], to_float64(case.hidden), 0.0)
    assert_gradient_close(grads.hidden, expected.grad_logits @ to_float64(case.weight), "float64")
    grad_logits_rows = expected.grad_logits.reshape(-1, SHAPE[-1])
    expected_weight = grad_logits_rows.T @ live.reshape(-1, live.shape[-1])
    assert_gradient_close(grads.weight, expected_weight, "float64")
    assert_gradient_close(grads.bias, grad_logits_rows.sum(axis=0), "float64")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_linear_loss_autodiff_matches_the_dense_oracle(autodiff_backend, reduction):
    rng = np.random.default_rng(11)
    case = SparseLinearCase(autodiff_backend, rng)
    sparse = case.sparse
    upstream = rng.standard_normal(SHAPE[:-1]) if reduction == "none" else np.float64(0.6)
    expected = reference(case.z, sparse.p, sparse.mask, reduction=reduction, upstream=upstream)

    def loss_of(hidden, targets):
        return sc.linear_masked_soft_cross_entropy(
            hidden,
            case.weight,
            targets,
            sparse.position_mask,
            bias=case.bias,
            reduction=reduction,
            chunk_rows=4,
            target_ids=sparse.target_ids,
        )

    if autodiff_backend.library == "torch":
        hidden = case.hidden.clone().requires_grad_(True)
        targets = sparse.target_probs.clone().requires_grad_(True)
        loss = loss_of(hidden, targets)
        loss.backward(autodiff_backend.asarray(upstream))
        grad_hidden, grad_targets = hidden.grad, targets.grad
    else:
        import jax

        loss, pullback = jax.vjp(loss_of, case.hidden, sparse.target_probs)
        grad_hidden, grad_targets = pullback(autodiff_backend.asarray(upstream))

    assert_loss_close(loss, expected.loss, "float64")
    assert_gradient_close(grad_hidden, expected.grad_logits @ to_float64(case.weight), "float64")
    assert_gradient_close(grad_targets, sparse.gathered(expected.grad_targets), "float64")


def test_torch_modules_take_target_ids():
    torch = pytest.importorskip("torch")
    from softce_multi.testing import known_backends
    from softce_multi.torch import LinearMaskedSoftCrossEntropy, MaskedSoftCrossEntropy

    backend = next(b for b in known_backends() if b.name == "torch-cpu")
    case = SparseLinearCase(backend, np.random.default_rng(12))
    sparse = case.sparse

    plain = MaskedSoftCrossEntropy(reduction="sum")(
        sparse.logits, sparse.target_probs, sparse.position_mask, target_ids=sparse.target_ids
    )
    linear = LinearMaskedSoftCrossEntropy(chunk_rows=3)(
        case.hidden,
        case.weight,
        sparse.target_probs,
        sparse.position_mask,
        bias=case.bias,
        target_ids=sparse.target_ids,
    )

    assert_loss_close(plain, sparse.expected(reduction="sum").loss, "float64")
    assert_loss_close(linear, reference(case.z, sparse.p, sparse.mask).loss, "float64")
    assert isinstance(linear, torch.Tensor)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_float_target_ids_are_a_type_error():
    rng = np.random.default_rng(13)
    logits, probs = rng.standard_normal((4, 9)), rng.random((4, 3))
    with pytest.raises(TypeError, match="target_ids must have an integer dtype, got float64"):
        sc.masked_soft_cross_entropy(logits, probs, np.ones(4), target_ids=probs)


@pytest.mark.parametrize(
    ("ids_shape", "probs_shape", "message"),
    [
        ((4, 3), (4, 2), r"target_ids must have the shape of target_probs .* \(4, 3\) .* \(4, 2\)"),
        ((5, 3), (5, 3), r"positions \(4,\) of logits, got \(5, 3\)"),
        ((4,), (4,), r"positions \(4,\) of logits, got \(4,\)"),
    ],
)
def test_target_ids_of_the_wrong_shape_are_a_value_error(ids_shape, probs_shape, message):
    rng = np.random.default_rng(14)
    logits = rng.standard_normal((4, 9))
    ids, probs = rng.integers(0, 9, ids_shape), rng.random(probs_shape)
    with pytest.raises(ValueError, match=message):
        sc.masked_soft_cross_entropy(logits, probs, np.ones(4), target_ids=ids)


def test_linear_loss_names_target_ids_in_its_shape_error():
    rng = np.random.default_rng(15)
    hidden, weight = rng.standard_normal((4, 5)), rng.standard_normal((9, 5))
    ids, probs = rng.integers(0, 9, (3, 2)), rng.random((3, 2))
    with pytest.raises(ValueError, match=r"positions \(4,\) of hidden, got \(3, 2\)"):
        sc.linear_masked_soft_cross_entropy(hidden, weight, probs, np.ones(4), target_ids=ids)


def test_target_ids_from_another_library_are_a_type_error():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    logits, probs = rng.standard_normal((4, 9)), rng.random((4, 3))
    ids = torch.zeros((4, 3), dtype=torch.int64)
    with pytest.raises(TypeError, match="target_ids"):
        sc.masked_soft_cross_entropy(logits, probs, np.ones(4), target_ids=ids)


# --------------------------------------------------------------------------------------------
# The Triton kernels (in Triton's interpreter, on CPU tensors, without a GPU)
# --------------------------------------------------------------------------------------------


def _operator_inputs(torch, logits_dtype, *, n_rows=9, vocab=37, slots=6):
    """Rows with duplicates, a padding slot, padding rows holding NaN and bad ids, a weight; on
    the GPU when there is one, else on the CPU for Triton's interpreter."""
    generator = torch.Generator().manual_seed(17)
    compute = torch.float64 if logits_dtype == torch.float64 else torch.float32
    z = (torch.randn(n_rows, vocab, generator=generator) * 3).to(logits_dtype)
    ids = torch.randint(0, vocab, (n_rows, slots), generator=generator)
    p = torch.rand(n_rows, slots, generator=generator, dtype=compute)
    ids[:, 1] = ids[:, 0]
    ids[:, -1], p[:, -1] = -1, 0.0
    weights = (torch.rand(n_rows, generator=generator) < 0.7).to(compute)
    weights[0] = 1.0
    padding = weights == 0
    z[padding], p[padding] = float("nan"), float("nan")
    ids[padding, 2] = vocab + 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(x.to(device) for x in (z, ids, p, weights, weights * 0.3))


@pytest.mark.parametrize("logits_dtype", ["float64", "float32", "bfloat16"])
def test_triton_sparse_kernels_match_the_generic_operators(logits_dtype):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from softce_multi.kernels import torch_sparse, triton_sparse

    z, ids, p, weights, scale = _operator_inputs(torch, getattr(torch, logits_dtype))
    tolerance = {"rtol": 2e-2, "atol": 1e-2} if logits_dtype == "bfloat16" else {}

    forward = triton_sparse.triton_sparse_row_routine(z, ids, p, weights, scale, True, 16)
    expected = torch_sparse.sparse_row_routine(z, ids, p, weights, scale, True)
    for got, want in zip(forward, expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    saved = expected[1:4]
    backward = triton_sparse.triton_sparse_gradient_routine(
        z, ids, p, *saved, scale, True, True, 16
    )
    expected_backward = torch_sparse.sparse_gradient_routine(z, ids, p, *saved, scale, True, True)
    for got, want in zip(backward, expected_backward, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def test_triton_sparse_kernels_launch_where_torch_refuses_to_wrap_an_interpreted_kernel(
    wrap_triton_of_jit_functions_only,
):
    torch = pytest.importorskip("torch")
    from softce_multi.kernels import torch_sparse, triton_sparse

    z, ids, p, weights, scale = _operator_inputs(torch, torch.float32)

    forward = triton_sparse.triton_sparse_row_routine(z, ids, p, weights, scale, True, 16)

    expected = torch_sparse.sparse_row_routine(z, ids, p, weights, scale, True)
    for got, want in zip(forward, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_triton_sparse_kernels_write_the_gradient_over_the_logits():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from softce_multi.kernels import torch_sparse, triton_sparse

    z, ids, p, weights, scale = _operator_inputs(torch, torch.float32)
    expected = torch_sparse.sparse_row_routine(z, ids, p, weights, scale, True)
    scratch = z.clone()

    statistics = triton_sparse.triton_sparse_row_routine_(scratch, ids, p, weights, scale, 16)

    torch.testing.assert_close(scratch, expected[4])
    for got, want in zip(statistics, expected[:4], strict=True):
        torch.testing.assert_close(got, want)
    scratch = z.clone()
    grad_p = triton_sparse.triton_sparse_gradient_routine_(
        scratch, ids, p, *expected[1:4], scale, True, 16
    )
    want_z, want_p = torch_sparse.sparse_gradient_routine(
        z, ids, p, *expected[1:4], scale, True, True
    )
    torch.testing.assert_close(scratch, want_z)
    torch.testing.assert_close(grad_p, want_p)


def test_triton_sparse_kernel_makes_a_row_with_a_bad_id_nan_and_no_other():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from softce_multi.kernels import triton_sparse

    z, ids, p, weights, scale = _operator_inputs(torch, torch.float32)
    ids[0, 0] = z.shape[1]  # row 0 is valid and this slot has mass

    weighted, *_, grad = triton_sparse.triton_sparse_row_routine(
        z, ids, p, weights, scale, True, None
    )

    assert torch.isnan(weighted[0]) and torch.isfinite(weighted[1:]).all()
    assert torch.isnan(grad[0]).any() and torch.isfinite(grad[1:]).all()


def test_triton_sparse_operators_have_fake_implementations():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from softce_multi.kernels import triton_sparse

    with FakeTensorMode() as mode:
        z, ids, p = torch.empty(5, 40), torch.empty(5, 3, dtype=torch.int32), torch.empty(5, 3)
        weights = torch.empty(5)
        outputs = triton_sparse.triton_sparse_row_routine(z, ids, p, weights, weights, True, None)
        grads = triton_sparse.triton_sparse_gradient_routine(
            z, ids, p, weights, weights, weights, weights, False, True, None
        )
    del mode
    assert [tuple(x.shape) for x in outputs] == [(5,), (5,), (5,), (5,), (5, 40)]
    assert [tuple(x.shape) for x in grads] == [(0, 40), (5, 3)]


def test_jax_sparse_training_step_needs_no_logits_sized_temporary(xla_on_the_cpu):
    jax = xla_on_the_cpu
    jnp = jax.numpy
    n_rows, vocab, slots = 4096, 8192, 16
    shapes = (
        jax.ShapeDtypeStruct((n_rows, vocab), jnp.float32),
        jax.ShapeDtypeStruct((n_rows, slots), jnp.float32),
        jax.ShapeDtypeStruct((n_rows, slots), jnp.int32),
        jax.ShapeDtypeStruct((n_rows,), jnp.bool_),
    )

    def loss(logits, probs, ids, mask):
        return sc.masked_soft_cross_entropy(logits, probs, mask, target_ids=ids)

    step = jax.jit(jax.value_and_grad(loss)).lower(*shapes).compile()

    temporaries = step.memory_analysis().temp_size_in_bytes
    assert temporaries <= 0.125 * n_rows * vocab * 4, temporaries


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sparse_16_bit_gradient_is_rounded_once_at_an_upstream_other_than_one(
    autodiff_backend, reduction
):
    pytest.importorskip("torch", reason="the float64 oracle needs torch")
    from softce_multi.testing import assert_gradient_rounded_once

    autodiff_backend.require("bfloat16")
    case = SparseCase(autodiff_backend, np.random.default_rng(18), logits_dtype="bfloat16")
    upstream = np.full(SHAPE[:-1], 0.8) if reduction == "none" else 0.8

    _, grad_logits, _ = differentiate_sparse(
        autodiff_backend, case, reduction=reduction, upstream=np.asarray(upstream)
    )

    padding = ~case.mask[..., None]
    logits = np.where(padding, 0.0, to_float64(case.logits))
    # Padding holds NaN logits, which the oracle needs not: their gradient is 0 either way.
    assert_gradient_rounded_once(
        grad_logits,
        autodiff_backend.asarray(logits, "bfloat16"),
        case.p,
        case.mask,
        reduction=reduction,
        upstream=upstream,
    )
