"""A drop-in for NeMo AutoModel's loss: arrays by keyword, and whole graphs under torch.compile.

NeMo's trainer holds its loss as an attribute and calls it by keyword
(``self.loss_fn(logits=..., target_probs=..., position_mask=...)``), so every public loss takes
its arrays as positional-or-keyword parameters under NeMo's names; the keyword call gives what
the positional call gives. Training steps that call the public names (not only the torch
adapter's) compile into one graph with ``fullgraph=True`` on aot_eager and Inductor, with the
eager loss and gradients. Dispatch stays lazy: importing the package, and computing the loss of
NumPy arrays, imports neither torch nor JAX.

The oracle is :func:`softce_multi.testing.reference` in float64 on the values the backend holds.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

import softce_multi as sc
from softce_multi.testing import (
    Backend,
    assert_gradient_close,
    assert_loss_close,
    make_case,
    random_logits,
    random_mask,
    random_targets,
    reference,
    to_float64,
    to_numpy,
)

#: A compiled loss that steps into a cached helper of array-api-compat (Dynamo warns) fails.
pytestmark = pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")

#: Positions ``[2, 5]``, hidden size 8 and a vocabulary of 33 entries.
POSITIONS, HIDDEN, VOCAB = (2, 5), 8, 33
SHAPE = (*POSITIONS, VOCAB)

POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD = inspect.Parameter.KEYWORD_ONLY
REQUIRED = inspect.Parameter.empty


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch", reason="torch not installed")


@pytest.fixture(scope="module")
def jax() -> Any:
    return pytest.importorskip("jax", reason="jax not installed")


# --------------------------------------------------------------------------------------------
# The signatures, as inspect reads them
# --------------------------------------------------------------------------------------------


def arrays(*names: str) -> list[tuple[str, Any, Any]]:
    """Required positional-or-keyword parameters: the arrays."""
    return [(name, POSITIONAL, REQUIRED) for name in names]


def options(**defaults: Any) -> list[tuple[str, Any, Any]]:
    """Keyword-only parameters with their defaults."""
    return [(name, KEYWORD, default) for name, default in defaults.items()]


LOGITS_ARRAYS = ("logits", "target_probs", "position_mask")
LINEAR_ARRAYS = ("hidden", "weight", "target_probs", "position_mask")
LOSS_OPTIONS = {"reduction": "mean", "num_valid": None}
LINEAR_OPTIONS = {"bias": None, **LOSS_OPTIONS, "chunk_rows": None}
SPARSE = {"target_ids": None}
VOCAB_PARALLEL_OPTIONS = {"group": None, "axis_name": None, **LOSS_OPTIONS, "check_shapes": True}

#: Every public loss, by module and qualified name: (its library, its parameters in order).
SIGNATURES: dict[str, tuple[str | None, list[tuple[str, Any, Any]]]] = {
    "softce_multi:masked_soft_cross_entropy": (
        None,
        arrays(*LOGITS_ARRAYS) + options(**LOSS_OPTIONS, **SPARSE),
    ),
    "softce_multi:masked_soft_cross_entropy_with_grad": (
        None,
        arrays(*LOGITS_ARRAYS) + options(**LOSS_OPTIONS, **SPARSE),
    ),
    "softce_multi:linear_masked_soft_cross_entropy": (
        None,
        arrays(*LINEAR_ARRAYS) + options(**LINEAR_OPTIONS, **SPARSE),
    ),
    "softce_multi:linear_masked_soft_cross_entropy_with_grad": (
        None,
        arrays(*LINEAR_ARRAYS) + options(**LINEAR_OPTIONS, **SPARSE),
    ),
    "softce_multi.torch:masked_soft_cross_entropy": (
        "torch",
        arrays(*LOGITS_ARRAYS) + options(**LOSS_OPTIONS, **SPARSE),
    ),
    "softce_multi.jax:masked_soft_cross_entropy": (
        "jax",
        arrays(*LOGITS_ARRAYS) + options(**LOSS_OPTIONS, **SPARSE),
    ),
    "softce_multi.torch:MaskedSoftCrossEntropy.forward": (
        "torch",
        arrays("self", *LOGITS_ARRAYS) + options(num_valid=None, **SPARSE),
    ),
    "softce_multi.torch:LinearMaskedSoftCrossEntropy.forward": (
        "torch",
        arrays("self", *LINEAR_ARRAYS) + options(bias=None, num_valid=None, **SPARSE),
    ),
    "softce_multi.distributed:global_num_valid": (
        None,
        arrays("position_mask") + options(group=None, axis_name=None),
    ),
    "softce_multi.distributed:vocab_parallel_masked_soft_cross_entropy": (
        None,
        arrays("logits_shard", "target_probs_shard", "position_mask")
        + options(**VOCAB_PARALLEL_OPTIONS),
    ),
    "softce_multi.distributed:vocab_parallel_linear_masked_soft_cross_entropy": (
        None,
        arrays("hidden", "weight_shard", "target_probs_shard", "position_mask")
        + options(bias_shard=None, **VOCAB_PARALLEL_OPTIONS),
    ),
}


def public_callable(path: str, library: str | None) -> Callable[..., Any]:
    """The object at ``module:qualified.name``, skipping the test if its library is missing."""
    if library is not None:
        pytest.importorskip(library, reason=f"{library} not installed")
    module_name, qualified_name = path.split(":")
    target: Any = pytest.importorskip(module_name)
    for attribute in qualified_name.split("."):
        target = getattr(target, attribute)
    return target


@pytest.mark.parametrize(
    ("path", "library", "parameters"),
    [(path, *expected) for path, expected in SIGNATURES.items()],
    ids=SIGNATURES.keys(),
)
def test_the_arrays_are_positional_or_keyword_under_nemos_names(path, library, parameters):
    function = public_callable(path, library)

    signature = inspect.signature(function)

    actual = [(p.name, p.kind, p.default) for p in signature.parameters.values()]
    assert actual == parameters


# --------------------------------------------------------------------------------------------
# Calls by keyword give the positional calls' values, on every backend
# --------------------------------------------------------------------------------------------


def assert_same_values(by_keyword: Any, positionally: Any) -> None:
    """The same arrays, bit for bit: the keywords only name the arguments."""
    np.testing.assert_array_equal(to_numpy(by_keyword), to_numpy(positionally), strict=True)


class LinearInputs(NamedTuple):
    """Inputs of the linear loss on a backend, and the float64 values they hold."""

    hidden: Any
    weight: Any
    bias: Any
    target_probs: Any
    position_mask: Any
    h: np.ndarray
    W: np.ndarray
    b: np.ndarray
    p: np.ndarray
    w: np.ndarray


def make_linear_inputs(
    backend: Backend, rng: np.random.Generator, dtype: str = "float64"
) -> LinearInputs:
    """Random hidden states, head and bias in ``dtype``, float64 targets and a bool mask."""
    values = (
        random_logits(rng, (*POSITIONS, HIDDEN), scale=1.0),
        random_logits(rng, (VOCAB, HIDDEN), scale=0.7),
        random_logits(rng, (VOCAB,), scale=0.5),
    )
    hidden, weight, bias = (backend.asarray(x, dtype) for x in values)
    target_probs = backend.asarray(random_targets(rng, SHAPE), "float64")
    mask = random_mask(rng, POSITIONS)
    return LinearInputs(
        hidden,
        weight,
        bias,
        target_probs,
        backend.asarray(mask),
        *(to_float64(x) for x in (hidden, weight, bias, target_probs)),
        mask.astype(np.float64),
    )


class LinearExpected(NamedTuple):
    loss: np.ndarray
    hidden: np.ndarray
    weight: np.ndarray
    bias: np.ndarray


def linear_reference(h: np.ndarray, W: np.ndarray, b: np.ndarray, p: Any, w: Any, **options: Any):
    """The reference on the float64 logits ``h @ W.T + b``, and the chain rule through them."""
    expected = reference(h @ W.T + b, p, w, **options)
    g = expected.grad_logits.reshape(-1, W.shape[0])
    rows = h.reshape(-1, W.shape[1])
    return LinearExpected(expected.loss, (g @ W).reshape(h.shape), g.T @ rows, g.sum(axis=0))


def test_the_loss_takes_its_arrays_by_keyword(backend):
    case = make_case(backend, np.random.default_rng(101), SHAPE)
    expected = reference(case.z, case.p, case.w)

    # In another order than the signature's: the names, not the places, bind them.
    by_keyword = sc.masked_soft_cross_entropy(
        position_mask=case.position_mask, target_probs=case.target_probs, logits=case.logits
    )
    positionally = sc.masked_soft_cross_entropy(case.logits, case.target_probs, case.position_mask)

    assert_same_values(by_keyword, positionally)
    assert_loss_close(by_keyword, expected.loss, "float32")


def test_the_loss_with_grad_takes_its_arrays_by_keyword(backend):
    case = make_case(backend, np.random.default_rng(102), SHAPE)
    expected = reference(case.z, case.p, case.w, reduction="sum")

    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        logits=case.logits,
        target_probs=case.target_probs,
        position_mask=case.position_mask,
        reduction="sum",
    )
    positional_loss, positional_grad = sc.masked_soft_cross_entropy_with_grad(
        case.logits, case.target_probs, case.position_mask, reduction="sum"
    )

    assert_same_values(loss, positional_loss)
    assert_same_values(grad, positional_grad)
    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(grad, expected.grad_logits, "float32")


def test_the_linear_loss_takes_its_arrays_and_bias_by_keyword(backend):
    case = make_linear_inputs(backend, np.random.default_rng(103))
    expected = linear_reference(case.h, case.W, case.b, case.p, case.w)

    by_keyword = sc.linear_masked_soft_cross_entropy(
        position_mask=case.position_mask,
        target_probs=case.target_probs,
        weight=case.weight,
        hidden=case.hidden,
        bias=case.bias,
    )
    positionally = sc.linear_masked_soft_cross_entropy(
        case.hidden, case.weight, case.target_probs, case.position_mask, bias=case.bias
    )

    assert_same_values(by_keyword, positionally)
    assert_loss_close(by_keyword, expected.loss, "float64")


def test_the_linear_loss_with_grad_takes_its_arrays_and_bias_by_keyword(backend):
    case = make_linear_inputs(backend, np.random.default_rng(104))
    expected = linear_reference(case.h, case.W, case.b, case.p, case.w)

    loss, grads = sc.linear_masked_soft_cross_entropy_with_grad(
        hidden=case.hidden,
        weight=case.weight,
        target_probs=case.target_probs,
        position_mask=case.position_mask,
        bias=case.bias,
    )
    positional_loss, positional_grads = sc.linear_masked_soft_cross_entropy_with_grad(
        case.hidden, case.weight, case.target_probs, case.position_mask, bias=case.bias
    )

    assert_same_values(loss, positional_loss)
    for grad, positional_grad in zip(grads, positional_grads, strict=True):
        assert_same_values(grad, positional_grad)
    assert_loss_close(loss, expected.loss, "float64")
    for grad, desired in zip(grads, expected[1:], strict=True):
        assert_gradient_close(grad, desired, "float64")


def cpu_backend(library: str) -> Backend:
    from softce_multi.testing import known_backends

    return next(b for b in known_backends() if b.library == library and b.device == "cpu")


def test_the_torch_function_takes_its_arrays_by_keyword(torch):
    from softce_multi.torch import masked_soft_cross_entropy

    case = make_case(cpu_backend("torch"), np.random.default_rng(105), SHAPE)
    count = case.position_mask.sum() + 3
    expected = reference(case.z, case.p, case.w, num_valid=float(count))

    by_keyword = masked_soft_cross_entropy(
        logits=case.logits,
        target_probs=case.target_probs,
        position_mask=case.position_mask,
        num_valid=count,
    )
    positionally = masked_soft_cross_entropy(
        case.logits, case.target_probs, case.position_mask, num_valid=count
    )

    assert_same_values(by_keyword, positionally)
    assert_loss_close(by_keyword, expected.loss, "float32")


def test_the_jax_function_takes_its_arrays_by_keyword(jax):
    from softce_multi.jax import masked_soft_cross_entropy

    case = make_case(cpu_backend("jax"), np.random.default_rng(106), SHAPE)
    expected = reference(case.z, case.p, case.w, reduction="none")

    by_keyword = masked_soft_cross_entropy(
        logits=case.logits,
        target_probs=case.target_probs,
        position_mask=case.position_mask,
        reduction="none",
    )
    positionally = masked_soft_cross_entropy(
        case.logits, case.target_probs, case.position_mask, reduction="none"
    )

    assert_same_values(by_keyword, positionally)
    assert_loss_close(by_keyword, expected.loss, "float32")


def test_the_module_takes_its_arrays_by_keyword(torch):
    from softce_multi.torch import MaskedSoftCrossEntropy

    case = make_case(cpu_backend("torch"), np.random.default_rng(107), SHAPE)
    criterion = MaskedSoftCrossEntropy(reduction="sum")
    expected = reference(case.z, case.p, case.w, reduction="sum")

    by_keyword = criterion(
        logits=case.logits, target_probs=case.target_probs, position_mask=case.position_mask
    )
    positionally = criterion(case.logits, case.target_probs, case.position_mask)

    assert_same_values(by_keyword, positionally)
    assert_loss_close(by_keyword, expected.loss, "float32")


def test_the_linear_module_takes_its_arrays_and_bias_by_keyword(torch):
    from softce_multi.torch import LinearMaskedSoftCrossEntropy

    case = make_linear_inputs(cpu_backend("torch"), np.random.default_rng(108))
    criterion = LinearMaskedSoftCrossEntropy()
    expected = linear_reference(case.h, case.W, case.b, case.p, case.w)

    by_keyword = criterion(
        hidden=case.hidden,
        weight=case.weight,
        target_probs=case.target_probs,
        position_mask=case.position_mask,
        bias=case.bias,
    )
    positionally = criterion(
        case.hidden, case.weight, case.target_probs, case.position_mask, bias=case.bias
    )

    assert_same_values(by_keyword, positionally)
    assert_loss_close(by_keyword, expected.loss, "float64")


# --------------------------------------------------------------------------------------------
# The distributed functions by keyword, on a group of one
# --------------------------------------------------------------------------------------------


def on_a_group_of_one(
    backend: Backend, request: pytest.FixtureRequest, compute: Callable[..., Any], *arrays: Any
) -> Any:
    """``compute(communicator, *arrays)`` on one rank that holds the whole vocabulary.

    torch: with ``group=`` a one-process gloo group; JAX: with ``axis_name="vocab"`` inside
    ``jax.shard_map`` over a one-device mesh.
    """
    if backend.library == "torch":
        if backend.device != "cpu":
            pytest.skip("the group of one here is a gloo group on the CPU")
        return compute({"group": request.getfixturevalue("group_of_one")}, *arrays)
    jax = pytest.importorskip("jax")
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array([backend.jax_device]), ("vocab",))

    def block(*blocks: Any) -> Any:
        return compute({"axis_name": "vocab"}, *blocks)

    specs = tuple(PartitionSpec() for _ in arrays)
    return jax.shard_map(block, mesh=mesh, in_specs=specs, out_specs=PartitionSpec())(*arrays)


def test_the_global_count_takes_the_mask_by_keyword(autodiff_backend, request):
    mask = random_mask(np.random.default_rng(109), POSITIONS)

    def by_keyword(communicator: dict, position_mask: Any) -> Any:
        return sc.distributed.global_num_valid(position_mask=position_mask, **communicator)

    count = on_a_group_of_one(autodiff_backend, request, by_keyword, autodiff_backend.asarray(mask))

    assert int(to_numpy(count)) == int(mask.sum())


def test_the_vocab_parallel_loss_takes_its_arrays_by_keyword(autodiff_backend, request):
    case = make_case(autodiff_backend, np.random.default_rng(110), SHAPE)
    expected = reference(case.z, case.p, case.w)

    def by_keyword(communicator: dict, logits: Any, target_probs: Any, mask: Any) -> Any:
        return sc.distributed.vocab_parallel_masked_soft_cross_entropy(
            logits_shard=logits, target_probs_shard=target_probs, position_mask=mask, **communicator
        )

    def positionally(communicator: dict, logits: Any, target_probs: Any, mask: Any) -> Any:
        return sc.distributed.vocab_parallel_masked_soft_cross_entropy(
            logits, target_probs, mask, **communicator
        )

    inputs = (case.logits, case.target_probs, case.position_mask)
    loss = on_a_group_of_one(autodiff_backend, request, by_keyword, *inputs)

    assert_same_values(loss, on_a_group_of_one(autodiff_backend, request, positionally, *inputs))
    assert_loss_close(loss, expected.loss, "float32")


def test_the_vocab_parallel_linear_loss_takes_its_arrays_and_bias_by_keyword(
    autodiff_backend, request
):
    case = make_linear_inputs(autodiff_backend, np.random.default_rng(111))
    expected = linear_reference(case.h, case.W, case.b, case.p, case.w)

    def by_keyword(communicator: dict, hidden, weight, bias, target_probs, mask) -> Any:
        return sc.distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            hidden=hidden,
            weight_shard=weight,
            target_probs_shard=target_probs,
            position_mask=mask,
            bias_shard=bias,
            **communicator,
        )

    def positionally(communicator: dict, hidden, weight, bias, target_probs, mask) -> Any:
        return sc.distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            hidden, weight, target_probs, mask, bias_shard=bias, **communicator
        )

    inputs = (case.hidden, case.weight, case.bias, case.target_probs, case.position_mask)
    loss = on_a_group_of_one(autodiff_backend, request, by_keyword, *inputs)

    assert_same_values(loss, on_a_group_of_one(autodiff_backend, request, positionally, *inputs))
    assert_loss_close(loss, expected.loss, "float64")


# --------------------------------------------------------------------------------------------
# The public function bound, unwrapped, into a trainer that calls it by keyword
# --------------------------------------------------------------------------------------------


def as_float32(values: np.ndarray) -> np.ndarray:
    """The float64 values of ``values`` rounded to float32."""
    return values.astype(np.float32).astype(np.float64)


class DraftInputs(NamedTuple):
    """A batch of a draft model's training data, in float32, and the float64 values."""

    hidden: np.ndarray
    target_probs: np.ndarray
    position_mask: np.ndarray
    weight: np.ndarray
    bias: np.ndarray


def draft_inputs(seed: int) -> DraftInputs:
    """Hidden states, targets, a bool mask and a head, all rounded to float32."""
    rng = np.random.default_rng(seed)
    return DraftInputs(
        as_float32(random_logits(rng, (*POSITIONS, HIDDEN), scale=1.0)),
        as_float32(random_targets(rng, SHAPE)),
        random_mask(rng, POSITIONS),
        as_float32(random_logits(rng, (VOCAB, HIDDEN), scale=0.7)),
        as_float32(random_logits(rng, (VOCAB,), scale=0.5)),
    )


class TorchTrainer:
    """A stand-in for NeMo's trainer: it holds the loss function and calls it by keyword."""

    def __init__(self, model: Any, loss_fn: Callable[..., Any]) -> None:
        self.model = model
        self.loss_fn = loss_fn

    def training_step(self, hidden: Any, target_probs: Any, position_mask: Any) -> Any:
        logits = self.model(hidden)
        loss = self.loss_fn(logits=logits, target_probs=target_probs, position_mask=position_mask)
        loss.backward()
        return loss.detach()

    def training_step_with_count(
        self, hidden: Any, target_probs: Any, position_mask: Any, num_valid: Any
    ) -> Any:
        logits = self.model(hidden)
        loss = self.loss_fn(
            logits=logits,
            target_probs=target_probs,
            position_mask=position_mask,
            num_valid=num_valid,
        )
        loss.backward()
        return loss.detach()


def torch_head(torch: Any, batch: DraftInputs) -> Any:
    head = torch.nn.Linear(HIDDEN, VOCAB)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(batch.weight))
        head.bias.copy_(torch.tensor(batch.bias))
    return head


def torch_batch(torch: Any, batch: DraftInputs) -> tuple[Any, Any, Any]:
    hidden = torch.tensor(batch.hidden, dtype=torch.float32, requires_grad=True)
    target_probs = torch.tensor(batch.target_probs, dtype=torch.float32)
    return hidden, target_probs, torch.tensor(batch.position_mask)


def assert_torch_step_matches_reference(head: Any, hidden: Any, loss: Any, expected) -> None:
    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(hidden.grad, expected.hidden, "float32")
    assert_gradient_close(head.weight.grad, expected.weight, "float32")
    assert_gradient_close(head.bias.grad, expected.bias, "float32")


def test_a_torch_trainer_calling_the_public_function_by_keyword_trains(torch):
    batch = draft_inputs(112)
    head = torch_head(torch, batch)
    trainer = TorchTrainer(head, sc.masked_soft_cross_entropy)  # as it is: no lambda, no partial
    hidden, target_probs, mask = torch_batch(torch, batch)
    expected = linear_reference(
        batch.hidden, batch.weight, batch.bias, batch.target_probs, batch.position_mask
    )

    loss = trainer.training_step(hidden, target_probs, mask)

    assert_torch_step_matches_reference(head, hidden, loss, expected)


def test_a_torch_trainer_passes_the_global_count_by_keyword(torch):
    batch = draft_inputs(113)
    head = torch_head(torch, batch)
    trainer = TorchTrainer(head, sc.masked_soft_cross_entropy)
    hidden, target_probs, mask = torch_batch(torch, batch)
    count = mask.sum() + 4  # the valid positions of every data-parallel rank
    expected = linear_reference(
        batch.hidden,
        batch.weight,
        batch.bias,
        batch.target_probs,
        batch.position_mask,
        num_valid=float(count),
    )

    loss = trainer.training_step_with_count(hidden, target_probs, mask, num_valid=count)

    assert_torch_step_matches_reference(head, hidden, loss, expected)


class JaxTrainer:
    """The JAX stand-in: the loss function is an attribute, called by keyword under jax.grad."""

    def __init__(self, loss_fn: Callable[..., Any]) -> None:
        self.loss_fn = loss_fn

    def objective(self, params: dict, hidden: Any, target_probs: Any, position_mask: Any) -> Any:
        logits = hidden @ params["weight"].T + params["bias"]
        return self.loss_fn(logits=logits, target_probs=target_probs, position_mask=position_mask)

    def objective_with_count(
        self, params: dict, hidden: Any, target_probs: Any, position_mask: Any, num_valid: Any
    ) -> Any:
        logits = hidden @ params["weight"].T + params["bias"]
        return self.loss_fn(
            logits=logits,
            target_probs=target_probs,
            position_mask=position_mask,
            num_valid=num_valid,
        )


def jax_batch(jax: Any, batch: DraftInputs) -> tuple[dict, Any, Any, Any]:
    weight, bias, hidden, target_probs = (
        jax.numpy.asarray(x, dtype=jax.numpy.float32)
        for x in (batch.weight, batch.bias, batch.hidden, batch.target_probs)
    )
    mask = jax.numpy.asarray(batch.position_mask)
    return {"weight": weight, "bias": bias}, hidden, target_probs, mask


def assert_jax_step_matches_reference(loss: Any, grads: tuple, expected) -> None:
    params_grad, hidden_grad = grads
    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(hidden_grad, expected.hidden, "float32")
    assert_gradient_close(params_grad["weight"], expected.weight, "float32")
    assert_gradient_close(params_grad["bias"], expected.bias, "float32")


def test_a_jax_trainer_calling_the_public_function_by_keyword_trains(jax):
    batch = draft_inputs(114)
    trainer = JaxTrainer(sc.masked_soft_cross_entropy)  # as it is: no lambda, no partial
    expected = linear_reference(
        batch.hidden, batch.weight, batch.bias, batch.target_probs, batch.position_mask
    )

    step = jax.jit(jax.value_and_grad(trainer.objective, argnums=(0, 1)))
    loss, grads = step(*jax_batch(jax, batch))

    assert_jax_step_matches_reference(loss, grads, expected)


def test_a_jax_trainer_passes_the_global_count_by_keyword(jax):
    batch = draft_inputs(115)
    trainer = JaxTrainer(sc.masked_soft_cross_entropy)
    params, hidden, target_probs, mask = jax_batch(jax, batch)
    count = mask.sum() + 4  # the valid positions of every data-parallel rank
    expected = linear_reference(
        batch.hidden,
        batch.weight,
        batch.bias,
        batch.target_probs,
        batch.position_mask,
        num_valid=float(count),
    )

    step = jax.jit(jax.value_and_grad(trainer.objective_with_count, argnums=(0, 1)))
    loss, grads = step(params, hidden, target_probs, mask, count)

    assert_jax_step_matches_reference(loss, grads, expected)


# --------------------------------------------------------------------------------------------
# torch.compile of training steps that call the public names
# --------------------------------------------------------------------------------------------


def count_of(position_mask: Any, reduction: str) -> Any:
    """The count of valid positions as users pass it, a 0-d tensor: only "mean" takes one."""
    return position_mask.sum() if reduction == "mean" else None


def logits_function_step(reduction: str) -> Callable[..., Any]:
    """``softce_multi.masked_soft_cross_entropy`` of a ``Linear`` head's logits, by keyword."""

    def step(head: Any, hidden: Any, target_probs: Any, position_mask: Any) -> Any:
        return sc.masked_soft_cross_entropy(
            logits=head(hidden),
            target_probs=target_probs,
            position_mask=position_mask,
            reduction=reduction,
            num_valid=count_of(position_mask, reduction),
        )

    return step


def linear_function_step(reduction: str) -> Callable[..., Any]:
    """``softce_multi.linear_masked_soft_cross_entropy`` of the head's weight and bias."""

    def step(head: Any, hidden: Any, target_probs: Any, position_mask: Any) -> Any:
        return sc.linear_masked_soft_cross_entropy(
            hidden=hidden,
            weight=head.weight,
            target_probs=target_probs,
            position_mask=position_mask,
            bias=head.bias,
            reduction=reduction,
            num_valid=count_of(position_mask, reduction),
        )

    return step


def logits_module_step(reduction: str) -> Callable[..., Any]:
    """``softce_multi.torch.MaskedSoftCrossEntropy`` of the head's logits."""
    criterion = sc.torch.MaskedSoftCrossEntropy(reduction)

    def step(head: Any, hidden: Any, target_probs: Any, position_mask: Any) -> Any:
        return criterion(
            head(hidden), target_probs, position_mask, num_valid=count_of(position_mask, reduction)
        )

    return step


def linear_module_step(reduction: str) -> Callable[..., Any]:
    """``softce_multi.torch.LinearMaskedSoftCrossEntropy`` of the head's weight and bias."""
    criterion = sc.torch.LinearMaskedSoftCrossEntropy(reduction)

    def step(head: Any, hidden: Any, target_probs: Any, position_mask: Any) -> Any:
        return criterion(
            hidden,
            head.weight,
            target_probs,
            position_mask,
            bias=head.bias,
            num_valid=count_of(position_mask, reduction),
        )

    return step


STEPS = {
    "masked_soft_cross_entropy": logits_function_step,
    "linear_masked_soft_cross_entropy": linear_function_step,
    "MaskedSoftCrossEntropy": logits_module_step,
    "LinearMaskedSoftCrossEntropy": linear_module_step,
}
LINEAR_STEPS = {name: STEPS[name] for name in STEPS if "linear" in name.lower()}

#: Every public name with "mean"; the linear ones also with "sum" and "none".
COMPILED_CASES = [
    pytest.param(make_step, "mean", id=f"{name}-mean") for name, make_step in STEPS.items()
] + [
    pytest.param(make_step, reduction, id=f"{name}-{reduction}")
    for name, make_step in LINEAR_STEPS.items()
    for reduction in ("sum", "none")
]


class Trained(NamedTuple):
    """The loss of one training step, and the gradients of hidden, head.weight and head.bias."""

    loss: Any
    grads: tuple[Any, Any, Any]


def train_once(torch: Any, step: Callable[..., Any], head: Any, batch: DraftInputs) -> Trained:
    """One forward and backward pass; for "none", the upstream gradient is a random vector."""
    head.zero_grad(set_to_none=True)
    hidden, target_probs, mask = torch_batch(torch, batch)
    loss = step(head, hidden, target_probs, mask)
    if loss.ndim == 0:
        loss.backward()
    else:
        upstream = np.random.default_rng(0).uniform(0.5, 2.0, loss.shape)
        loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    return Trained(loss.detach(), (hidden.grad, head.weight.grad, head.bias.grad))


def assert_compiled_equals_eager(
    torch: Any, step: Callable[..., Any], backend: str, batch: DraftInputs
) -> None:
    head = torch_head(torch, batch)
    eager = train_once(torch, step, head, batch)

    compiled = train_once(torch, torch.compile(step, backend=backend, fullgraph=True), head, batch)

    assert_loss_close(compiled.loss, eager.loss)
    for grad, eager_grad in zip(compiled.grads, eager.grads, strict=True):
        assert_gradient_close(grad, eager_grad)


@pytest.mark.parametrize(("make_step", "reduction"), COMPILED_CASES)
def test_dynamo_traces_the_training_step_as_one_graph(torch, make_step, reduction):
    torch._dynamo.reset()
    batch = draft_inputs(116)
    step = make_step(reduction)

    explanation = torch._dynamo.explain(step)(torch_head(torch, batch), *torch_batch(torch, batch))

    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(("make_step", "reduction"), COMPILED_CASES)
def test_aot_eager_full_graph_training_step_equals_eager(torch, make_step, reduction):
    torch._dynamo.reset()

    assert_compiled_equals_eager(torch, make_step(reduction), "aot_eager", draft_inputs(117))


@pytest.mark.parametrize("make_step", STEPS.values(), ids=STEPS.keys())
def test_inductor_full_graph_training_step_equals_eager(torch, make_step):
    torch._dynamo.reset()

    assert_compiled_equals_eager(torch, make_step("mean"), "inductor", draft_inputs(118))


def without_sequences(batch: DraftInputs) -> DraftInputs:
    """``batch`` with a batch size of 0: its arrays ``[0, ...]``, its head unchanged."""
    return batch._replace(
        hidden=batch.hidden[:0],
        target_probs=batch.target_probs[:0],
        position_mask=batch.position_mask[:0],
    )


@pytest.mark.parametrize(("make_step", "reduction"), COMPILED_CASES)
def test_a_full_graph_training_step_of_an_empty_batch_equals_eager(torch, make_step, reduction):
    torch._dynamo.reset()

    batch = without_sequences(draft_inputs(119))
    assert_compiled_equals_eager(torch, make_step(reduction), "aot_eager", batch)


#: Compiles a training step through each public loss, dense and sparse targets, and each
#: eagle3 function a training step calls, in a fresh interpreter (Dynamo warns once per
#: process), and prints the warnings tracing them raised.
COMPILE_EVERY_PUBLIC_NAME = """
import warnings
import torch
import softce_multi as sc
from softce_multi import eagle3

torch.manual_seed(120)
hidden = torch.randn(2, 5, 8, requires_grad=True)
head = torch.nn.Linear(8, 33)
targets = torch.softmax(torch.randn(2, 5, 33), dim=-1)
probs, ids = torch.topk(targets, 4, dim=-1)
mask = torch.rand(2, 5) < 0.7
steps = [
    lambda: sc.masked_soft_cross_entropy(logits=head(hidden), target_probs=targets,
                                         position_mask=mask, num_valid=mask.sum()),
    lambda: sc.masked_soft_cross_entropy(head(hidden), probs, mask, reduction="none",
                                         target_ids=ids).sum(),
    lambda: sc.masked_soft_cross_entropy_with_grad(head(hidden).detach(), targets, mask)[1].sum(),
    lambda: sc.linear_masked_soft_cross_entropy(hidden, head.weight, targets, mask,
                                                bias=head.bias),
    lambda: sc.linear_masked_soft_cross_entropy(hidden, head.weight, probs, mask, bias=head.bias,
                                                reduction="sum", target_ids=ids),
    lambda: sc.torch.MaskedSoftCrossEntropy()(head(hidden), targets, mask),
    lambda: sc.torch.LinearMaskedSoftCrossEntropy()(hidden, head.weight, targets, mask),
]
target_head = torch.randn(40, 8)
t2d = torch.arange(40) % 3 != 0
loss_mask = torch.ones(2, 5, dtype=torch.long)
token_ids = torch.randint(0, 40, (2, 5))
d2t = torch.nonzero(t2d).flatten()
steps += [
    lambda: eagle3.multi_step_loss(
        [sc.masked_soft_cross_entropy(head(hidden), targets, mask) for _ in range(2)]
    ),
    lambda: eagle3.prepare_targets(hidden @ target_head.T, loss_mask, t2d, draft_vocab_size=26)[0],
    lambda: eagle3.prepare_targets_from_hidden(hidden, target_head, loss_mask, t2d,
                                               draft_vocab_size=26)[0],
    lambda: eagle3.prepare_top_k_targets_from_hidden(hidden, target_head, loss_mask, t2d, 4,
                                                     draft_vocab_size=26)[1],
    lambda: eagle3.top_k_targets(targets, 4)[1],
    lambda: eagle3.draft_accuracy(head(hidden), targets, mask),
    lambda: eagle3.shift_left(head(hidden)).sum(),
    lambda: eagle3.target_to_draft_ids(token_ids, t2d),
    lambda: eagle3.draft_to_target_ids(token_ids % 26, d2t),
]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in steps:
        result = torch.compile(step, fullgraph=True, backend="aot_eager")()
        if result.requires_grad:
            result.sum().backward()
print(repr([str(warning.message).splitlines()[0] for warning in caught]))
"""


def test_compiling_the_public_names_raises_no_warning(torch):
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_EVERY_PUBLIC_NAME],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


# --------------------------------------------------------------------------------------------
# Lazy dispatch
# --------------------------------------------------------------------------------------------


def imported_after(code: str) -> set[str]:
    """Which of torch, jax and the package's adapters a fresh interpreter holds after ``code``."""
    watched = [
        "torch",
        "jax",
        "softce_multi.torch",
        "softce_multi.jax",
        "softce_multi._adapters.torch",
        "softce_multi._adapters.jax",
    ]
    program = f"import sys\n{code}\nprint(' '.join(m for m in {watched!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize(
    ("module", "library", "hint"),
    [
        ("softce_multi.torch", "torch", "download.pytorch.org/whl/cpu"),
        ("softce_multi.reference", "torch", "download.pytorch.org/whl/cpu"),
        ("softce_multi.jax", "jax", "pip install 'softce_multi[jax]'"),
    ],
)
def test_a_face_without_its_framework_says_what_to_install(module, library, hint):
    code = f"""
import sys
sys.modules[{library!r}] = None  # as if it were not installed
try:
    import {module}
except ModuleNotFoundError as error:
    print(error.name, error)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )

    assert result.stdout.startswith(f"{library} {module} needs "), result.stdout
    assert hint in result.stdout


def test_the_testing_module_is_an_attribute_of_the_package():
    assert imported_after("import softce_multi as sc; sc.testing.assert_loss_close") == set()


def test_importing_the_package_imports_neither_torch_nor_jax():
    assert imported_after("import softce_multi") == set()


def test_the_loss_of_numpy_arrays_imports_neither_torch_nor_jax():
    code = """
import numpy as np
import softce_multi as sc

rng = np.random.default_rng(119)
logits, targets = rng.standard_normal((2, 5, 33)), rng.dirichlet(np.ones(33), (2, 5))
hidden, weight = rng.standard_normal((2, 5, 8)), rng.standard_normal((33, 8))
mask = rng.random((2, 5)) < 0.7
losses = [
    sc.masked_soft_cross_entropy(logits, targets, mask),
    sc.masked_soft_cross_entropy_with_grad(logits, targets, mask)[0],
    sc.linear_masked_soft_cross_entropy(hidden, weight, targets, mask),
    sc.linear_masked_soft_cross_entropy_with_grad(hidden, weight, targets, mask)[0],
]
assert all(np.isfinite(loss) and loss > 0 for loss in losses), losses
"""
    assert imported_after(code) == set()
