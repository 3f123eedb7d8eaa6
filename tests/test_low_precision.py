"""16-bit logits gradients are rounded once, from float32, whatever the upstream gradient.

Issue 15, point 3: for bfloat16 and float16 logits the logits gradient must be as accurate as
that of the plain float32 formula (``log_softmax(z.float())``, then the cast back), within
:data:`~softce_multi.testing.ULP_MARGIN`
(:func:`~softce_multi.testing.assert_gradient_rounded_once`), for any upstream gradient:
EAGLE-3 trainers always pass one other than 1 (step weights ``0.8**i / 2.44`` over
accumulation steps). A gradient made in 16 bits for a unit upstream and then multiplied by the
upstream in 16 bits is rounded twice, about 0.5 ulp further.

Each engine is checked on fresh random inputs: logits ``randn * scale`` (scale 1 in the first
half of the batch, 3 in the second, so every case holds both), targets the float32 softmax of
``randn``, a bool mask with about 20% padding; upstreams 1, 0.164, 0.131 and 3 with ``"mean"``
and ``"sum"``, and a random per-position upstream with ``"none"``:

1. the torch CPU path, through ``backward`` and through ``torch.autograd.grad`` with
   ``create_graph=True`` (the differentiable recomputation);
2. the Triton kernels (interpreted without a GPU, rounding to bfloat16 as a GPU does: see
   :func:`interpreter_rounds_to_nearest`): the forward kernel's gradient at a unit upstream, the
   backward kernel with the upstream folded into the row scale, and the torch adapter made to
   run them;
3. JAX on XLA: ``jax.grad``, eager and under ``jax.jit``, and
   ``masked_soft_cross_entropy_with_grad``;
4. the Pallas kernels (``interpret=True`` without a GPU), as the Triton ones;
5. the linear loss on torch and JAX, against the materialised formula (see
   :func:`assert_linear_gradients_as_accurate` for how a matmul's output is judged);
6. the vocabulary-parallel losses, on a torch gloo group of one and a one-device JAX mesh;
7. the torch CPU path at an upstream of exactly 1.

Run as a script, the module prints the measured errors of every engine next to the formula's
and a double-rounded gradient's: ``TRITON_INTERPRET=1 JAX_PLATFORMS=cpu python
tests/test_low_precision.py``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest

if __name__ == "__main__":  # the report reads the kernels as the test run does
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

torch = pytest.importorskip("torch", reason="the formula and the oracle need torch")

import softce_multi  # noqa: E402
from softce_multi import _core, testing  # noqa: E402
from softce_multi.testing import (  # noqa: E402
    REDUCTIONS,
    ULP_MARGIN,
    assert_gradient_rounded_once,
    dtype_name,
    formula_gradient,
    is_installed,
    random_mask,
    reference,
    to_float64,
    ulp_error,
)

DTYPES = ("bfloat16", "float16")
UPSTREAMS = (1.0, 0.164, 0.131, 3.0)
#: The upstreams where a second rounding happens (3 = 0b11 needs two significant bits).
NOT_ONE = (0.164, 0.131, 3.0)
#: The upstream of the vocabulary-parallel checks: an EAGLE-3 step weight (0.8 / 2.44 / 2).
EAGLE3_UPSTREAM = 0.164
SHAPE = (4, 64, 500)
#: For interpreted kernels, which run a Python loop per row and chunk.
SMALL_SHAPE = (2, 8, 300)
HIDDEN = 64
#: How much larger the root-sum-square error of a linear-loss gradient may be than the
#: materialised formula's (see :func:`assert_linear_gradients_as_accurate`).
LINEAR_MARGIN = 0.02
#: Bits of the significand after the leading one, per dtype: an ulp of ``x`` in ``[1, 2)``.
MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23, "float64": 52}
#: The fraction of entries of a unit-upstream gradient that must equal the formula's bits.
SAME_BITS = 0.999

CASES = [
    *(
        pytest.param(reduction, upstream, id=f"{reduction}-{upstream}")
        for reduction in ("mean", "sum")
        for upstream in UPSTREAMS
    ),
    pytest.param("none", None, id="none-per-position"),
]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class Inputs(NamedTuple):
    """Float64 logits (each engine rounds them to its dtype), float32 targets, a bool mask."""

    logits: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def softmax32(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32)
    exp = np.exp(values - values.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def draw_inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> Inputs:
    """Logits of scale 1 in the first half of the batch and 3 in the second."""
    scale = np.where(np.arange(shape[0]) < shape[0] // 2, 1.0, 3.0)
    logits = rng.standard_normal(shape) * scale.reshape(-1, *(1,) * (len(shape) - 1))
    return Inputs(logits, softmax32(rng.standard_normal(shape)), random_mask(rng, shape[:-1]))


def upstream_of(
    rng: np.random.Generator, reduction: str, upstream: float | None, positions: tuple[int, ...]
) -> Any:
    """The upstream gradient: the number, or for ``"none"`` a random float32 one per position."""
    if reduction == "none":
        return rng.uniform(0.05, 3.0, size=positions).astype(np.float32)
    assert upstream is not None
    return upstream


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh inputs every run; the seed is printed, and pytest shows it when a test fails."""
    seed = np.random.SeedSequence().entropy
    print(f"inputs from np.random.default_rng({seed})")
    return np.random.default_rng(seed)


def torch_arrays(inputs: Inputs, dtype: str, device: str = "cpu") -> tuple[Any, Any, Any]:
    logits = torch.from_numpy(inputs.logits.astype(np.float32)).to(getattr(torch, dtype))
    targets, mask = torch.from_numpy(inputs.targets), torch.from_numpy(inputs.mask)
    return logits.to(device), targets.to(device), mask.to(device)


def jax_arrays(inputs: Inputs, dtype: str) -> tuple[Any, Any, Any]:
    import jax.numpy as jnp

    return (
        jnp.asarray(inputs.logits, getattr(jnp, dtype)),
        jnp.asarray(inputs.targets),
        jnp.asarray(inputs.mask),
    )


def torch_upstream(loss: Any, upstream: Any) -> tuple[Any, Any]:
    """``(outputs, grad_outputs)`` that give ``loss`` the cotangent ``upstream``."""
    if isinstance(upstream, np.ndarray):
        return loss, torch.from_numpy(upstream).to(loss.device)
    return loss * upstream, None


# --------------------------------------------------------------------------------------------
# The engines: each returns the logits gradient and the arrays it is the gradient of
# --------------------------------------------------------------------------------------------


def torch_cpu_gradient(
    inputs: Inputs, dtype: str, reduction: str, upstream: Any, *, create_graph: bool = False
) -> tuple[Any, ...]:
    """The torch autograd function: ``backward``, or ``autograd.grad`` with ``create_graph``."""
    logits, targets, mask = torch_arrays(inputs, dtype)
    leaf = logits.clone().requires_grad_(True)
    loss = softce_multi.masked_soft_cross_entropy(leaf, targets, mask, reduction=reduction)
    outputs, grad_outputs = torch_upstream(loss, upstream)
    if create_graph:
        (grad,) = torch.autograd.grad(outputs, leaf, grad_outputs, create_graph=True)
        assert grad.requires_grad  # the differentiable recomputation ran
        return grad.detach(), logits, targets, mask
    torch.autograd.backward(outputs, grad_outputs)
    return leaf.grad, logits, targets, mask


def _triton_module() -> Any:
    from softce_multi.kernels import triton as triton_kernels

    return triton_kernels


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _kernel_backward(
    module: Any,
    xp: Any,
    logits: Any,
    targets: Any,
    mask: Any,
    reduction: str,
    upstream: Any,
    **options: Any,
) -> Any:
    """The kernel's forward (for the saved rows), then its backward with the upstream folded
    into the row scale, as the adapters call it."""
    forward = _core.loss_pass(
        logits,
        targets,
        mask,
        reduction=reduction,
        num_valid=None,
        with_logits_grad=False,
        row_routine=functools.partial(module.row_routine, **options),
        xp=xp,
    )
    grad, _ = _core.gradient_pass(
        logits,
        targets,
        forward.saved,
        forward.row_scale * upstream,
        logits_grad=True,
        targets_grad=False,
        gradient_routine=functools.partial(module.gradient_routine, **options),
        xp=xp,
    )
    return grad


def _kernel_forward(
    module: Any, xp: Any, logits: Any, targets: Any, mask: Any, reduction: str, **options: Any
) -> Any:
    """The gradient that the kernel's forward sweep makes, for a unit upstream."""
    result = _core.loss_pass(
        logits,
        targets,
        mask,
        reduction=reduction,
        num_valid=None,
        with_logits_grad=True,
        row_routine=functools.partial(module.row_routine, **options),
        xp=xp,
    )
    return result.logits_grad


def triton_backward_gradient(
    inputs: Inputs, dtype: str, reduction: str, upstream: Any
) -> tuple[Any, ...]:
    import array_api_compat.torch as xp

    logits, targets, mask = torch_arrays(inputs, dtype, triton_device())
    scale = torch.from_numpy(np.asarray(upstream, np.float32).reshape(-1)).to(logits.device)
    grad = _kernel_backward(_triton_module(), xp, logits, targets, mask, reduction, scale)
    return grad, logits, targets, mask


def triton_forward_gradient(inputs: Inputs, dtype: str, reduction: str) -> tuple[Any, ...]:
    import array_api_compat.torch as xp

    logits, targets, mask = torch_arrays(inputs, dtype, triton_device())
    grad = _kernel_forward(_triton_module(), xp, logits, targets, mask, reduction)
    return grad, logits, targets, mask


def jax_objective(logits: Any, targets: Any, mask: Any, upstream: Any, reduction: str) -> Any:
    """The loss with the cotangent ``upstream``: ``upstream * loss`` (summed for ``"none"``)."""
    import jax.numpy as jnp

    loss = softce_multi.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction)
    return jnp.sum(upstream * loss)


@functools.cache
def _jitted_jax_gradient() -> Any:
    import jax

    return jax.jit(jax.grad(jax_objective), static_argnums=4)


def jax_gradient(
    inputs: Inputs, dtype: str, reduction: str, upstream: Any, *, jit: bool
) -> tuple[Any, ...]:
    import jax
    import jax.numpy as jnp

    logits, targets, mask = jax_arrays(inputs, dtype)
    grad_of = _jitted_jax_gradient() if jit else jax.grad(jax_objective)
    grad = grad_of(logits, targets, mask, jnp.asarray(upstream, jnp.float32), reduction)
    return grad, logits, targets, mask


@functools.cache
def _jitted_pallas(direction: str, reduction: str) -> Any:
    import jax
    import jax.numpy as jnp

    from softce_multi.kernels import pallas

    interpret = jax.default_backend() != "gpu"
    if direction == "forward":
        return jax.jit(
            functools.partial(
                _kernel_forward, pallas, jnp, reduction=reduction, interpret=interpret
            )
        )
    return jax.jit(
        functools.partial(_kernel_backward, pallas, jnp, reduction=reduction, interpret=interpret)
    )


def pallas_backward_gradient(
    inputs: Inputs, dtype: str, reduction: str, upstream: Any
) -> tuple[Any, ...]:
    import jax.numpy as jnp

    logits, targets, mask = jax_arrays(inputs, dtype)
    scale = jnp.asarray(np.reshape(upstream, -1), jnp.float32)
    grad = _jitted_pallas("backward", reduction)(logits, targets, mask, upstream=scale)
    return grad, logits, targets, mask


def pallas_forward_gradient(inputs: Inputs, dtype: str, reduction: str) -> tuple[Any, ...]:
    logits, targets, mask = jax_arrays(inputs, dtype)
    grad = _jitted_pallas("forward", reduction)(logits, targets, mask)
    return grad, logits, targets, mask


def torch_vocab_parallel_gradient(
    inputs: Inputs, dtype: str, reduction: str, upstream: Any, group: Any
) -> tuple[Any, ...]:
    logits, targets, mask = torch_arrays(inputs, dtype)
    leaf = logits.clone().requires_grad_(True)
    loss = softce_multi.distributed.vocab_parallel_masked_soft_cross_entropy(
        leaf, targets, mask, group=group, reduction=reduction
    )
    torch.autograd.backward(*torch_upstream(loss, upstream))
    return leaf.grad, logits, targets, mask


def _one_device_mesh() -> Any:
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:1]), ("vocab",))


@functools.cache
def _jitted_jax_vocab_parallel_gradient(reduction: str) -> Any:
    """``jax.grad`` of the vocabulary-parallel loss inside ``jax.shard_map``, the vocabulary on
    a mesh of one device, jitted once per reduction."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    def block(logits: Any, targets: Any, mask: Any) -> Any:
        return softce_multi.distributed.vocab_parallel_masked_soft_cross_entropy(
            logits, targets, mask, axis_name="vocab", reduction=reduction
        )

    vocab = P(None, None, "vocab")
    loss = jax.shard_map(
        block, mesh=_one_device_mesh(), in_specs=(vocab, vocab, P()), out_specs=P()
    )

    def objective(logits: Any, targets: Any, mask: Any, upstream: Any) -> Any:
        return jnp.sum(upstream * loss(logits, targets, mask))

    return jax.jit(jax.grad(objective))


def jax_vocab_parallel_gradient(
    inputs: Inputs, dtype: str, reduction: str, upstream: Any
) -> tuple[Any, ...]:
    import jax.numpy as jnp

    logits, targets, mask = jax_arrays(inputs, dtype)
    grad_of = _jitted_jax_vocab_parallel_gradient(reduction)
    grad = grad_of(logits, targets, mask, jnp.asarray(upstream, jnp.float32))
    return grad, logits, targets, mask


def double_rounded(logits: Any, targets: Any, mask: Any, reduction: str, upstream: float) -> Any:
    """What the torch adapter did before the fix for ``"mean"`` and ``"sum"``: the formula's
    16-bit gradient for a unit upstream times the float32 upstream, rounded to 16 bits again."""
    unit = formula_gradient(logits, targets, mask, reduction=reduction)
    rounded = torch.from_numpy(unit).to(getattr(torch, dtype_name(logits)))
    return rounded * torch.tensor(upstream, dtype=torch.float32)  # a 0-d tensor: 16-bit result


# --------------------------------------------------------------------------------------------
# 1. The torch CPU path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reduction", "upstream"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backward_rounds_the_gradient_once(rng, dtype, reduction, upstream):
    inputs = draw_inputs(rng, SHAPE)
    upstream = upstream_of(rng, reduction, upstream, SHAPE[:-1])

    grad, *arrays = torch_cpu_gradient(inputs, dtype, reduction, upstream)

    assert_gradient_rounded_once(grad, *arrays, reduction=reduction, upstream=upstream)


@pytest.mark.parametrize(("reduction", "upstream"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_differentiable_recomputation_rounds_the_gradient_once(
    rng, dtype, reduction, upstream
):
    inputs = draw_inputs(rng, SHAPE)
    upstream = upstream_of(rng, reduction, upstream, SHAPE[:-1])

    grad, *arrays = torch_cpu_gradient(inputs, dtype, reduction, upstream, create_graph=True)

    assert_gradient_rounded_once(grad, *arrays, reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("upstream", NOT_ONE)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_gradient_rounded_twice_fails_the_assertion(rng, dtype, reduction, upstream):
    # The tests above can fail: the gradient of the code before the fix does.
    logits, targets, mask = torch_arrays(draw_inputs(rng, SHAPE), dtype)

    twice = double_rounded(logits, targets, mask, reduction, upstream)

    error, formula_error = measured_errors(twice, logits, targets, mask, reduction, upstream)
    assert error > formula_error + ULP_MARGIN
    with pytest.raises(AssertionError, match="ulp from the float64 gradient"):
        assert_gradient_rounded_once(
            twice, logits, targets, mask, reduction=reduction, upstream=upstream
        )


# --------------------------------------------------------------------------------------------
# 2. The Triton kernels
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def interpreter_rounds_to_nearest() -> Iterator[None]:
    """:func:`~softce_multi.testing.triton_interpreter_rounds_to_nearest`, or a skip where this
    Triton's interpreter cannot be made to."""
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_convert_float"):
        pytest.skip("this Triton's interpreter has no _convert_float to make round to nearest")
    with testing.triton_interpreter_rounds_to_nearest():
        yield


@pytest.fixture
def triton_kernels() -> Iterator[None]:
    """The Triton kernels on CUDA, else interpreted with a GPU's rounding to bfloat16."""
    if not is_installed("triton"):
        pytest.skip("needs triton")
    if torch.cuda.is_available():
        yield
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    with interpreter_rounds_to_nearest():
        yield


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_adapter_on_the_triton_kernels_rounds_the_gradient_once(
    triton_kernels, monkeypatch, rng, dtype, upstream
):
    from softce_multi import kernels

    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)
    calls: list[str] = []
    module = _triton_module()
    for name in ("row_routine", "gradient_routine"):
        routine = getattr(module, name)
        monkeypatch.setattr(module, name, _recording(routine, calls, name))
    logits, targets, mask = torch_arrays(draw_inputs(rng, SMALL_SHAPE), dtype, triton_device())
    leaf = logits.clone().requires_grad_(True)

    loss = softce_multi.masked_soft_cross_entropy(leaf, targets, mask)
    (loss * upstream).backward()

    assert calls  # the gradient came from the Triton kernels
    assert_gradient_rounded_once(leaf.grad, logits, targets, mask, upstream=upstream)


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backward_rewrites_the_forward_gradient_for_the_upstream_in_place(
    triton_kernels, monkeypatch, rng, dtype, upstream
):
    # The forward kernel writes the 16-bit gradient for an upstream of 1; the backward pass
    # turns that buffer into the upstream's, on the device, without the backward kernel's
    # functional recomputation and without a new [N, V] tensor.
    from softce_multi import kernels

    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)
    calls: list[str] = []
    module = _triton_module()
    for name in ("row_routine", "gradient_routine", "rewrite_for_upstream_"):
        routine = getattr(module, name)
        monkeypatch.setattr(module, name, _recording(routine, calls, name))
    logits, targets, mask = torch_arrays(draw_inputs(rng, SMALL_SHAPE), dtype, triton_device())
    leaf = logits.clone().requires_grad_(True)

    loss = softce_multi.masked_soft_cross_entropy(leaf, targets, mask)
    (grad,) = torch.autograd.grad(loss * upstream, leaf)

    assert calls == ["row_routine", "rewrite_for_upstream_"]
    assert_gradient_rounded_once(grad, logits, targets, mask, upstream=upstream)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backward_keeping_the_graph_computes_each_upstreams_gradient_anew(
    triton_kernels, monkeypatch, rng, dtype
):
    # With retain_graph the forward's buffer is not written: a later backward pass through the
    # same loss, with an upstream of exactly 1, still gets the unit gradient.
    from softce_multi import kernels

    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)
    logits, targets, mask = torch_arrays(draw_inputs(rng, SMALL_SHAPE), dtype, triton_device())
    leaf = logits.clone().requires_grad_(True)
    loss = softce_multi.masked_soft_cross_entropy(leaf, targets, mask)

    (scaled,) = torch.autograd.grad(loss * 0.131, leaf, retain_graph=True)
    (unit,) = torch.autograd.grad(loss, leaf)

    assert_gradient_rounded_once(scaled, logits, targets, mask, upstream=0.131)
    assert_gradient_rounded_once(unit, logits, targets, mask, upstream=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backward_of_a_batch_of_upstreams_rounds_each_gradient_once(
    triton_kernels, monkeypatch, rng, dtype
):
    # is_grads_batched (and vmap over torch.autograd.grad) hands the backward pass a batched
    # upstream, which the in-place rewrite cannot read: each gradient is computed anew.
    from softce_multi import kernels

    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)
    logits, targets, mask = torch_arrays(draw_inputs(rng, SMALL_SHAPE), dtype, triton_device())
    leaf = logits.clone().requires_grad_(True)
    loss = softce_multi.masked_soft_cross_entropy(leaf, targets, mask)
    upstreams = torch.tensor([1.0, 0.131, 3.0], device=logits.device)

    (grads,) = torch.autograd.grad(loss, leaf, upstreams, is_grads_batched=True)

    for grad, upstream in zip(grads, upstreams.tolist(), strict=True):
        assert_gradient_rounded_once(grad, logits, targets, mask, upstream=upstream)


def test_rewriting_for_an_upstream_of_exactly_one_writes_nothing(triton_kernels, rng):
    # Each program reads the upstream on the device and leaves its row alone for exactly 1:
    # a buffer of sevens stays sevens. Another upstream writes every row.
    import array_api_compat.torch as xp

    from softce_multi import _core

    module = _triton_module()
    logits, targets, mask = torch_arrays(draw_inputs(rng, SMALL_SHAPE), "bfloat16", triton_device())
    rows = _core.as_rows(logits, targets, mask, reduction="mean", num_valid=None, xp=xp)
    z, p, row_scale = rows.z, rows.p, _core.row_scale(rows)
    result = module.row_routine(rows, with_logits_grad=False)
    buffer = torch.full_like(z, 7.0)
    one = torch.ones((), device=z.device)

    module.rewrite_for_upstream_(buffer, z, p, result.saved, row_scale, one)
    assert bool((buffer == 7).all())

    module.rewrite_for_upstream_(buffer, z, p, result.saved, row_scale, one * 0.131)
    expected, _ = module.gradient_routine(
        _core.BackwardRows(z, p, result.saved, row_scale * 0.131),
        logits_grad=True,
        targets_grad=False,
    )
    assert torch.equal(buffer, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels_computing_in_float64_round_the_gradient_once(
    triton_kernels, monkeypatch, rng, dtype
):
    """float64 targets make the kernels compute in float64: the 16-bit logits are read and
    their gradient written with conversions from and to float64."""
    from softce_multi import kernels

    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)
    calls: list[str] = []
    module = _triton_module()
    monkeypatch.setattr(module, "row_routine", _recording(module.row_routine, calls, "row"))
    logits, targets, mask = torch_arrays(draw_inputs(rng, SMALL_SHAPE), dtype, triton_device())
    targets = targets.double()
    leaf = logits.clone().requires_grad_(True)

    loss = softce_multi.masked_soft_cross_entropy(leaf, targets, mask)
    (loss * EAGLE3_UPSTREAM).backward()

    assert calls
    assert_gradient_rounded_once(leaf.grad, logits, targets, mask, upstream=EAGLE3_UPSTREAM)


def _recording(routine: Any, calls: list[str], name: str) -> Any:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return routine(*args, **kwargs)

    return recorded


# --------------------------------------------------------------------------------------------
# 3. JAX on XLA
# --------------------------------------------------------------------------------------------


@pytest.fixture
def needs_jax() -> None:
    pytest.importorskip("jax", reason="jax not installed")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(("reduction", "upstream"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_grad_rounds_the_gradient_once(needs_jax, rng, dtype, reduction, upstream, jit):
    upstream = upstream_of(rng, reduction, upstream, SHAPE[:-1])

    grad, *arrays = jax_gradient(draw_inputs(rng, SHAPE), dtype, reduction, upstream, jit=jit)

    assert_gradient_rounded_once(grad, *arrays, reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_loss_with_grad_rounds_the_gradient_once(needs_jax, rng, dtype, reduction):
    logits, targets, mask = jax_arrays(draw_inputs(rng, SHAPE), dtype)

    _, grad = softce_multi.masked_soft_cross_entropy_with_grad(
        logits, targets, mask, reduction=reduction
    )

    assert_gradient_rounded_once(grad, logits, targets, mask, reduction=reduction)


# --------------------------------------------------------------------------------------------
# 4. The Pallas kernels
# --------------------------------------------------------------------------------------------


@pytest.fixture
def pallas_kernels() -> None:
    pytest.importorskip("jax", reason="jax not installed")
    if not is_installed("jax.experimental.pallas"):
        pytest.skip("this jax has no Pallas")


#: Each GPU kernel module's gradients, by the fixture that makes it run here: the forward
#: kernel's at a unit upstream, the backward kernel's with the upstream folded in.
KERNELS = {
    "triton": ("triton_kernels", triton_forward_gradient, triton_backward_gradient),
    "pallas": ("pallas_kernels", pallas_forward_gradient, pallas_backward_gradient),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", KERNELS)
def test_forward_kernel_gradient_at_a_unit_upstream_is_rounded_once(
    request, rng, kernels, dtype, reduction
):
    fixture, forward_gradient, _ = KERNELS[kernels]
    request.getfixturevalue(fixture)

    grad, *arrays = forward_gradient(draw_inputs(rng, SMALL_SHAPE), dtype, reduction)

    assert_gradient_rounded_once(grad, *arrays, reduction=reduction)


@pytest.mark.parametrize(("reduction", "upstream"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", KERNELS)
def test_backward_kernel_rounds_the_gradient_once(
    request, rng, kernels, dtype, reduction, upstream
):
    fixture, _, backward_gradient = KERNELS[kernels]
    request.getfixturevalue(fixture)
    upstream = upstream_of(rng, reduction, upstream, SMALL_SHAPE[:-1])

    grad, *arrays = backward_gradient(draw_inputs(rng, SMALL_SHAPE), dtype, reduction, upstream)

    assert_gradient_rounded_once(grad, *arrays, reduction=reduction, upstream=upstream)


#: The adapter test's shape, which no other test traces: the adapter's jitted functions are
#: cached by shape, and one traced for XLA would not run the kernels.
ADAPTER_SHAPE = (2, 7, 301)


@pytest.mark.parametrize("upstream", [1.0, EAGLE3_UPSTREAM, 3.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_adapter_on_the_pallas_kernels_rounds_the_gradient_once(
    pallas_kernels, monkeypatch, rng, dtype, upstream
):
    import jax

    from softce_multi import kernels
    from softce_multi._adapters import jax as jax_adapter
    from softce_multi.kernels import pallas

    monkeypatch.setattr(kernels, "use_pallas", lambda *arrays: True)
    if jax.default_backend() != "gpu":  # the CPU stands in for the GPU, and Pallas interprets
        monkeypatch.setattr(jax_adapter, "_KERNEL_PLATFORMS", ("cpu",))
    for name in ("row_routine", "gradient_routine"):
        monkeypatch.setattr(pallas, name, _recorded_when_run(getattr(pallas, name), name))
    _PALLAS_CALLS.clear()
    inputs = draw_inputs(rng, ADAPTER_SHAPE)

    grad, *arrays = jax_gradient(inputs, dtype, "mean", upstream, jit=False)

    jax.effects_barrier()
    assert "gradient_routine" in _PALLAS_CALLS  # the kernels ran
    assert_gradient_rounded_once(grad, *arrays, upstream=upstream)


#: The Pallas routines that ran, recorded by JAX debug callbacks: the adapter's compiled step is
#: cached by shape, and a later test runs the callbacks of the first one's trace.
_PALLAS_CALLS: list[str] = []


def _recorded_when_run(routine: Any, name: str) -> Any:
    import jax

    interpret = jax.default_backend() != "gpu"

    def recorded(*args: Any, **kwargs: Any) -> Any:
        jax.debug.callback(functools.partial(_PALLAS_CALLS.append, name))
        return routine(*args, **kwargs, interpret=interpret)

    return recorded


# --------------------------------------------------------------------------------------------
# 5. The linear loss
# --------------------------------------------------------------------------------------------


class LinearInputs(NamedTuple):
    """Float64 hidden states, weight and bias (rounded to the dtype by each engine), float32
    targets and a bool mask."""

    hidden: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


LINEAR_NAMES = ("hidden", "weight", "bias")


def random_linear_inputs(rng: np.random.Generator) -> LinearInputs:
    """Logits ``hidden @ weight.T + bias`` of standard deviation about 2."""
    positions, vocab = SHAPE[:-1], SHAPE[-1]
    return LinearInputs(
        rng.standard_normal((*positions, HIDDEN)),
        rng.standard_normal((vocab, HIDDEN)) * (1.5 / np.sqrt(HIDDEN)),
        rng.standard_normal(vocab),
        softmax32(rng.standard_normal(SHAPE)),
        random_mask(rng, positions),
    )


def exact_linear_gradients(
    logits: Any, inputs: dict[str, Any], targets: Any, mask: Any, reduction: str, upstream: Any
) -> dict[str, np.ndarray]:
    """The float64 gradients of the materialised path, from its logits rounded to 16 bits.

    The logits are those the formula's matmul rounded (the linear loss rounds the same ones);
    from them on everything is exact: the float64 logits gradient, then float64 matmuls with
    the 16-bit values of ``hidden`` and ``weight``. So only the rounding of the gradients
    differs between the formula and the loss under test.
    """
    grad_logits = reference(logits, targets, mask, reduction=reduction, upstream=upstream)
    rows = grad_logits.grad_logits.reshape(-1, SHAPE[-1])
    hidden = to_float64(inputs["hidden"])
    return {
        "hidden": (rows @ to_float64(inputs["weight"])).reshape(hidden.shape),
        "weight": rows.T @ hidden.reshape(-1, HIDDEN),
        "bias": rows.sum(axis=0),
    }


def linear_errors(
    actual: dict[str, Any], formula: dict[str, Any], exact: dict[str, np.ndarray]
) -> dict[str, tuple[float, float]]:
    """Per gradient: the root-sum-square error of ``actual`` and of ``formula`` from ``exact``."""
    return {
        name: (
            float(np.linalg.norm(to_float64(actual[name]) - exact[name])),
            float(np.linalg.norm(to_float64(formula[name]) - exact[name])),
        )
        for name in actual
    }


def assert_linear_gradients_as_accurate(
    actual: dict[str, Any], formula: dict[str, Any], exact: dict[str, np.ndarray]
) -> None:
    """Each gradient's root-sum-square error is at most ``1 + LINEAR_MARGIN`` times the formula's.

    Not :func:`~softce_multi.testing.ulp_error`: an entry of the hidden or weight gradient is a
    sum of ``V`` (or ``N``) products that cancel (each row of the logits gradient sums to 0),
    so its exact value is often far below the roundings of its terms, which add up as a random
    walk to hundreds or thousands of its ulps (measured), and which of two gradients lands
    nearer an entry is chance. No per-entry resolution fixes that without judging mostly that
    chance. Over a whole gradient the errors average out: one rounded once, as the formula's,
    has the formula's error norm to 0.1% (it rounds the same float32 values: mostly the same
    bits), and one rounded twice has 1.2 to 1.5 times it (measured). Hence the 2% margin.
    Beyond it, one entry may land one ulp (of the gradient's largest entry) on the other side:
    on the bias gradient, ``V`` entries of which a few dominate the norm, a single such entry
    can move the ratio past the margin (1.029 for the inputs of
    ``np.random.default_rng(231866371892804331723250729497281117312)`` with float16 and
    ``"none"``).
    """
    for name, (error, formula_error) in linear_errors(actual, formula, exact).items():
        assert dtype_name(actual[name]) == dtype_name(formula[name]), name
        largest = float(np.max(np.abs(to_float64(formula[name])), initial=0.0))
        bits = MANTISSA_BITS[dtype_name(formula[name])]
        one_ulp = float(np.ldexp(1.0, np.frexp(largest)[1] - 1 - bits)) if largest else 0.0
        if error > (1 + LINEAR_MARGIN) * formula_error and error**2 > formula_error**2 + one_ulp**2:
            msg = (
                f"the {dtype_name(actual[name])} gradient to {name} is {error:.4g} from the "
                f"float64 one (root-sum-square), {error / formula_error:.3f} times the "
                f"materialised formula's {formula_error:.4g} (allowed: {1 + LINEAR_MARGIN})"
            )
            raise AssertionError(msg)


def torch_linear_arrays(inputs: LinearInputs, dtype: str) -> dict[str, Any]:
    real = getattr(torch, dtype)
    return {
        name: torch.from_numpy(getattr(inputs, name).astype(np.float32)).to(real)
        for name in LINEAR_NAMES
    }


def torch_formula_linear(
    arrays: dict[str, Any], targets: Any, mask: Any, reduction: str, upstream: Any
) -> tuple[Any, dict[str, Any]]:
    """The materialised formula: ``F.linear`` in 16 bits, the float32 formula, autograd."""
    from softce_multi.reference import masked_soft_cross_entropy

    leaves = {name: x.clone().requires_grad_(True) for name, x in arrays.items()}
    bias = leaves.get("bias")
    logits = torch.nn.functional.linear(leaves["hidden"], leaves["weight"], bias)
    loss = masked_soft_cross_entropy(logits, targets, mask, reduction=reduction)
    torch.autograd.backward(*torch_upstream(loss, upstream))
    return logits.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def torch_linear_gradients(
    arrays: dict[str, Any], targets: Any, mask: Any, reduction: str, upstream: Any
) -> dict[str, Any]:
    leaves = {name: x.clone().requires_grad_(True) for name, x in arrays.items()}
    loss = softce_multi.linear_masked_soft_cross_entropy(
        leaves["hidden"], leaves["weight"], targets, mask, bias=leaves["bias"], reduction=reduction
    )
    torch.autograd.backward(*torch_upstream(loss, upstream))
    return {name: leaf.grad for name, leaf in leaves.items()}


def torch_linear_case(
    inputs: LinearInputs, dtype: str, reduction: str, upstream: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """softce_multi's gradients, the formula's and the exact ones, on torch."""
    arrays = torch_linear_arrays(inputs, dtype)
    targets, mask = torch.from_numpy(inputs.targets), torch.from_numpy(inputs.mask)
    logits, formula = torch_formula_linear(arrays, targets, mask, reduction, upstream)
    exact = exact_linear_gradients(logits, arrays, targets, mask, reduction, upstream)
    return torch_linear_gradients(arrays, targets, mask, reduction, upstream), formula, exact


def jax_formula_loss(logits: Any, targets: Any, mask: Any, reduction: str) -> Any:
    """:func:`softce_multi.reference.masked_soft_cross_entropy` written in JAX."""
    import jax
    import jax.numpy as jnp

    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_position = -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)
    weights = jnp.reshape(mask, per_position.shape).astype(jnp.float32)
    weighted = per_position * weights
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return jnp.sum(weighted)
    return jnp.sum(weighted) / jnp.maximum(jnp.sum(weights), 1.0)


def jax_linear_case(
    inputs: LinearInputs, dtype: str, reduction: str, upstream: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """softce_multi's gradients, the materialised formula's (``h @ W.T + b`` in 16 bits, the
    float32 formula, ``jax.grad``) and the exact ones, on JAX."""
    import jax
    import jax.numpy as jnp

    real = getattr(jnp, dtype)
    arrays = {name: jnp.asarray(getattr(inputs, name), real) for name in LINEAR_NAMES}
    targets, mask = jnp.asarray(inputs.targets), jnp.asarray(inputs.mask)
    weights = jnp.asarray(upstream, jnp.float32)

    def ours(hidden: Any, weight: Any, bias: Any) -> Any:
        loss = softce_multi.linear_masked_soft_cross_entropy(
            hidden, weight, targets, mask, bias=bias, reduction=reduction
        )
        return jnp.sum(weights * loss)

    def formula(hidden: Any, weight: Any, bias: Any) -> Any:
        logits = hidden @ weight.T + bias
        return jnp.sum(weights * jax_formula_loss(logits, targets, mask, reduction))

    values = tuple(arrays.values())
    logits = arrays["hidden"] @ arrays["weight"].T + arrays["bias"]
    exact = exact_linear_gradients(logits, arrays, targets, mask, reduction, upstream)
    grads = jax.grad(ours, argnums=(0, 1, 2))(*values)
    formula_grads = jax.grad(formula, argnums=(0, 1, 2))(*values)
    return (
        dict(zip(LINEAR_NAMES, grads, strict=True)),
        dict(zip(LINEAR_NAMES, formula_grads, strict=True)),
        exact,
    )


@pytest.mark.parametrize(("reduction", "upstream"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_linear_gradients_are_as_accurate_as_the_materialised_formula(
    rng, dtype, reduction, upstream
):
    upstream = upstream_of(rng, reduction, upstream, SHAPE[:-1])

    ours, formula, exact = torch_linear_case(random_linear_inputs(rng), dtype, reduction, upstream)

    assert_linear_gradients_as_accurate(ours, formula, exact)


@pytest.mark.parametrize(
    ("dtype", "reduction", "upstream"),
    [
        pytest.param(dtype, *case.values, id=f"{dtype}-{case.id}")
        for dtype in DTYPES
        for case in CASES
    ],
)
def test_jax_linear_gradients_are_as_accurate_as_the_materialised_formula(
    needs_jax, rng, dtype, reduction, upstream
):
    upstream = upstream_of(rng, reduction, upstream, SHAPE[:-1])

    ours, formula, exact = jax_linear_case(random_linear_inputs(rng), dtype, reduction, upstream)

    assert_linear_gradients_as_accurate(ours, formula, exact)


def rounded_again(grad: Any, upstream: float) -> Any:
    """A 16-bit gradient times a float32 upstream, rounded to its dtype again (torch or JAX)."""
    if isinstance(grad, torch.Tensor):
        return grad * torch.tensor(upstream, dtype=torch.float32)
    import jax.numpy as jnp

    return (grad.astype(jnp.float32) * jnp.float32(upstream)).astype(grad.dtype)


@pytest.mark.parametrize("upstream", NOT_ONE)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_gradients_rounded_twice_fail_the_comparison(rng, reduction, upstream):
    # What the torch linear loss did before the fix: the bfloat16 gradients to hidden, weight
    # and bias for a unit upstream (here the formula's), multiplied by the upstream in bfloat16.
    inputs = random_linear_inputs(rng)
    arrays = torch_linear_arrays(inputs, "bfloat16")
    targets, mask = torch.from_numpy(inputs.targets), torch.from_numpy(inputs.mask)
    logits, formula = torch_formula_linear(arrays, targets, mask, reduction, upstream)
    _, unit = torch_formula_linear(arrays, targets, mask, reduction, 1.0)
    exact = exact_linear_gradients(logits, arrays, targets, mask, reduction, upstream)

    for name in ("hidden", "weight"):
        twice = {name: rounded_again(unit[name], upstream)}
        with pytest.raises(AssertionError, match=f"gradient to {name} is"):
            assert_linear_gradients_as_accurate(twice, formula, exact)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_linear_loss_with_grad_at_a_unit_upstream_is_as_accurate_as_the_formula(rng, library):
    inputs = random_linear_inputs(rng)
    if library == "torch":
        _, formula, exact = torch_linear_case(inputs, "bfloat16", "mean", 1.0)
        arrays = torch_linear_arrays(inputs, "bfloat16")
        targets, mask = torch.from_numpy(inputs.targets), torch.from_numpy(inputs.mask)
    else:
        pytest.importorskip("jax", reason="jax not installed")
        import jax.numpy as jnp

        _, formula, exact = jax_linear_case(inputs, "bfloat16", "mean", 1.0)
        arrays = {name: jnp.asarray(getattr(inputs, name), jnp.bfloat16) for name in LINEAR_NAMES}
        targets, mask = jnp.asarray(inputs.targets), jnp.asarray(inputs.mask)

    _, grads = softce_multi.linear_masked_soft_cross_entropy_with_grad(
        arrays["hidden"], arrays["weight"], targets, mask, bias=arrays["bias"]
    )

    assert_linear_gradients_as_accurate(grads._asdict(), formula, exact)


# --------------------------------------------------------------------------------------------
# 6. The vocabulary-parallel losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_vocab_parallel_rounds_the_gradient_once(group_of_one, rng, dtype, reduction):
    upstream = upstream_of(rng, reduction, EAGLE3_UPSTREAM, SHAPE[:-1])

    grad, *arrays = torch_vocab_parallel_gradient(
        draw_inputs(rng, SHAPE), dtype, reduction, upstream, group_of_one
    )

    assert_gradient_rounded_once(grad, *arrays, reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_vocab_parallel_rounds_the_gradient_once(needs_jax, rng, dtype, reduction):
    upstream = upstream_of(rng, reduction, EAGLE3_UPSTREAM, SHAPE[:-1])

    grad, *arrays = jax_vocab_parallel_gradient(draw_inputs(rng, SHAPE), dtype, reduction, upstream)

    assert_gradient_rounded_once(grad, *arrays, reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_torch_vocab_parallel_linear_gradients_are_as_accurate_as_the_formula(
    group_of_one, rng, with_bias
):
    inputs = random_linear_inputs(rng)
    arrays = torch_linear_arrays(inputs, "bfloat16")
    if not with_bias:
        del arrays["bias"]
    targets, mask = torch.from_numpy(inputs.targets), torch.from_numpy(inputs.mask)
    logits, formula = torch_formula_linear(arrays, targets, mask, "mean", EAGLE3_UPSTREAM)
    exact = exact_linear_gradients(logits, arrays, targets, mask, "mean", EAGLE3_UPSTREAM)
    leaves = {name: x.clone().requires_grad_(True) for name, x in arrays.items()}

    loss = softce_multi.distributed.vocab_parallel_linear_masked_soft_cross_entropy(
        leaves["hidden"], leaves["weight"], targets, mask, bias_shard=leaves.get("bias")
    )
    (loss * EAGLE3_UPSTREAM).backward()

    ours = {name: leaf.grad for name, leaf in leaves.items()}
    assert_linear_gradients_as_accurate(ours, formula, exact)


def test_jax_vocab_parallel_linear_gradients_are_as_accurate_as_the_formula(needs_jax, rng):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    inputs = random_linear_inputs(rng)
    _, formula, exact = jax_linear_case(inputs, "bfloat16", "mean", EAGLE3_UPSTREAM)
    arrays = [jnp.asarray(getattr(inputs, name), jnp.bfloat16) for name in LINEAR_NAMES]
    targets, mask = jnp.asarray(inputs.targets), jnp.asarray(inputs.mask)

    def block(hidden: Any, weight: Any, bias: Any, targets: Any, mask: Any) -> Any:
        return softce_multi.distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            hidden, weight, targets, mask, bias_shard=bias, axis_name="vocab"
        )

    loss = jax.shard_map(
        block,
        mesh=_one_device_mesh(),
        in_specs=(P(), P("vocab"), P("vocab"), P(None, None, "vocab"), P()),
        out_specs=P(),
    )
    grads = jax.grad(
        lambda *arrays: EAGLE3_UPSTREAM * loss(*arrays, targets, mask), argnums=(0, 1, 2)
    )(*arrays)

    assert_linear_gradients_as_accurate(dict(zip(LINEAR_NAMES, grads, strict=True)), formula, exact)


# --------------------------------------------------------------------------------------------
# 7. The torch CPU path at an upstream of exactly 1
# --------------------------------------------------------------------------------------------

UNIT_CALLS = ["backward()", "backward(1.0)", "with_grad"]


@pytest.mark.parametrize("call", UNIT_CALLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_gradient_at_a_unit_upstream_is_the_formulas(rng, dtype, reduction, call):
    logits, targets, mask = torch_arrays(draw_inputs(rng, SHAPE), dtype)
    leaf = logits.clone().requires_grad_(True)

    if call == "with_grad":
        _, grad = softce_multi.masked_soft_cross_entropy_with_grad(
            logits, targets, mask, reduction=reduction
        )
    else:
        loss = softce_multi.masked_soft_cross_entropy(leaf, targets, mask, reduction=reduction)
        loss.backward(None if call == "backward()" else torch.tensor(1.0))
        grad = leaf.grad

    assert_gradient_rounded_once(grad, logits, targets, mask, reduction=reduction)
    formula = formula_gradient(logits, targets, mask, reduction=reduction)
    assert np.mean(to_float64(grad) == formula) >= SAME_BITS


# --------------------------------------------------------------------------------------------
# The measured errors (run this file as a script)
# --------------------------------------------------------------------------------------------


def measured_errors(
    grad: Any, logits: Any, targets: Any, mask: Any, reduction: str, upstream: Any
) -> tuple[float, float]:
    """The ulp errors of ``grad`` and of the formula, as assert_gradient_rounded_once measures
    them: each entry in the spacing at ``max(|exact|, 2**(m - 16) * terms)`` (its docstring)."""
    dtype = dtype_name(logits)
    options = {"reduction": reduction, "upstream": upstream}
    exact = reference(logits, targets, mask, **options).grad_logits
    formula = formula_gradient(logits, targets, mask, **options)
    z, p, w = (to_float64(x) for x in (logits, targets, mask))
    softmax = np.exp(z - z.max(axis=-1, keepdims=True))
    softmax /= softmax.sum(axis=-1, keepdims=True)
    denominator = max(w.sum(), 1.0) if reduction == "mean" else 1.0
    scale = (np.broadcast_to(upstream, w.shape) * w / denominator)[..., None]
    terms = np.abs(scale) * (np.abs(p.sum(axis=-1, keepdims=True)) * softmax + np.abs(p))
    mantissa_bits = {"bfloat16": 7, "float16": 10}[dtype]
    resolution = np.ldexp(terms, mantissa_bits - 16)
    return (
        ulp_error(grad, exact, dtype, resolution=resolution),
        ulp_error(formula, exact, dtype, resolution=resolution),
    )


def _report(repeats: int = 3) -> None:  # pragma: no cover (a script for the release notes)
    """Print the largest ulp errors over ``repeats`` random inputs, per engine, dtype and upstream
    (over "mean" and "sum"): softce_multi's, the formula's, and the double-rounded gradient's;
    then the linear losses' error norms relative to the materialised formula's."""
    import jax

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(f"softce_multi from {os.path.dirname(softce_multi.__file__)}")

    def row(name: str, make: Any, shape: tuple[int, ...]) -> None:
        for dtype in DTYPES:
            cells = []
            for upstream in UPSTREAMS:
                worst = np.zeros(3)
                for _ in range(repeats):
                    for reduction in ("mean", "sum"):
                        grad, *arrays = make(draw_inputs(rng, shape), dtype, reduction, upstream)
                        twice = double_rounded(*arrays, reduction, upstream)
                        ours, formula = measured_errors(grad, *arrays, reduction, upstream)
                        double, _ = measured_errors(twice, *arrays, reduction, upstream)
                        worst = np.maximum(worst, [ours, formula, double])
                cells.append("{:.3f} {:.3f} {:.3f}".format(*worst))
            print(f"{name:<28}{dtype:<10}" + " | ".join(cells))

    header = " | ".join(f"{f'upstream {u}':^17}" for u in UPSTREAMS)
    columns = " | ".join("ours  form  twice" for _ in UPSTREAMS)
    print(f"\nulp errors, max over mean/sum and {repeats} draws\n{'':<38}{header}")
    print(f"{'':<38}{columns}")
    row("torch CPU backward", torch_cpu_gradient, SHAPE)
    row(
        "torch CPU create_graph",
        functools.partial(torch_cpu_gradient, create_graph=True),
        SHAPE,
    )
    with interpreter_rounds_to_nearest():
        row("Triton backward (interp.)", triton_backward_gradient, SMALL_SHAPE)
    row("JAX XLA jax.grad, jit", functools.partial(jax_gradient, jit=True), SHAPE)
    row("Pallas backward (interp.)", pallas_backward_gradient, SMALL_SHAPE)
    with testing.group_of_one() as group:
        row(
            "torch vocab-parallel",
            lambda *args: torch_vocab_parallel_gradient(*args, group),
            SHAPE,
        )
    row("JAX vocab-parallel", jax_vocab_parallel_gradient, SHAPE)

    print("\nlinear loss, bfloat16: error norm / the materialised formula's (hidden, weight, bias)")
    for library, case in (("torch", torch_linear_case), ("JAX", jax_linear_case)):
        for upstream in UPSTREAMS:
            for reduction in ("mean", "sum"):
                inputs = random_linear_inputs(rng)
                ours, formula, exact = case(inputs, "bfloat16", reduction, upstream)
                _, unit, _ = case(inputs, "bfloat16", reduction, 1.0)
                twice = {name: rounded_again(grad, upstream) for name, grad in unit.items()}
                cells = [
                    " ".join(
                        f"{e / f:.3f}" for e, f in linear_errors(grads, formula, exact).values()
                    )
                    for grads in (ours, twice)
                ]
                print(
                    f"{library:<6} upstream {upstream:<6} {reduction:<5} ours {cells[0]}"
                    f"   double-rounded {cells[1]}"
                )


if __name__ == "__main__":
    _report()
