"""The accelerated kernels keep the contract of ``_core.loss_pass`` and agree with the reference.

Most tests run on both GPU kernels, Triton on torch tensors and Pallas on JAX arrays under
``jax.jit``, on the torch CPU operators, on the NumPy in-place routine and on the chunked XLA
routines under ``jax.jit``, each held to the reference and to the core's saved row
statistics. Without a GPU the kernels run interpreted: Pallas with ``interpret=True``, Triton
when the environment sets ``TRITON_INTERPRET=1`` before the test run starts (the nox sessions
do). The last section checks that the torch and JAX adapters run the kernels where they apply,
and only there, and that XLA's compiled loss and gradient need no logits-sized temporary.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import softce_multi
from softce_multi import _core, kernels
from softce_multi.kernels import blocked
from softce_multi.kernels import numpy as numpy_kernels
from softce_multi.testing import (
    REDUCTIONS,
    Backend,
    assert_gradient_close,
    assert_loss_close,
    is_installed,
    make_case,
    reference,
    to_float64,
)

#: A vocabulary that the test chunk size does not divide: three chunks, the last one partial.
SHAPE = (2, 3, 37)
BLOCK = 16


# --------------------------------------------------------------------------------------------
# The two kernels behind one interface
# --------------------------------------------------------------------------------------------


class Kernel:
    """One implementation's routines behind :func:`softce_multi._core.loss_pass` and ``backward``.

    ``forward`` and ``backward`` run the core's driver with the implementation's routines;
    ``core_forward`` runs it with the generic core's, for comparison.
    """

    backend: Backend
    module: Any
    xp: Any
    routine_options: dict[str, Any]

    def forward(self, logits, target_probs, position_mask, *, block_size=None, **options):
        routine = functools.partial(self.module.row_routine, **self._options(block_size))
        return _core.loss_pass(
            logits, target_probs, position_mask, row_routine=routine, xp=self.xp, **options
        )

    def backward(self, logits, target_probs, saved, row_scale, *, block_size=None, **options):
        routine = functools.partial(self.module.gradient_routine, **self._options(block_size))
        return _core.gradient_pass(
            logits, target_probs, saved, row_scale, gradient_routine=routine, xp=self.xp, **options
        )

    def core_forward(self, logits, target_probs, position_mask, **options):
        routine = blocked.blocked_row_routine(None, xp=self.xp)
        return _core.loss_pass(
            logits, target_probs, position_mask, row_routine=routine, xp=self.xp, **options
        )

    def _options(self, block_size: int | None) -> dict[str, Any]:
        return {**self.routine_options, "block_size": block_size}


class TritonKernel(Kernel):
    """The Triton kernels on torch tensors: on CUDA if present, else interpreted on the CPU."""

    def __init__(self) -> None:
        import array_api_compat.torch
        import torch

        self.module = importlib.import_module("softce_multi.kernels.triton")
        on_gpu = torch.cuda.is_available()
        self.backend = Backend("torch", "torch", "gpu" if on_gpu else "cpu")
        self.xp = array_api_compat.torch
        self.routine_options = {}


class PallasKernel(Kernel):
    """The Pallas kernels on JAX arrays under ``jax.jit``: compiled on a GPU, else interpreted."""

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self.module = importlib.import_module("softce_multi.kernels.pallas")
        on_gpu = jax.default_backend() == "gpu"
        self.backend = Backend("jax", "jax", "gpu" if on_gpu else "cpu")
        self.interpret = not on_gpu
        self.xp = jnp
        self.routine_options = {"interpret": self.interpret}

    def forward(self, logits, target_probs, position_mask, *, num_valid, **options):
        arrays = (logits, target_probs, position_mask)
        if num_valid is None or isinstance(num_valid, (int, float)):
            # A number stays a Python number: it is a static argument of the compiled call.
            return self._jitted("forward", num_valid=num_valid, **options)(*arrays)
        return self._jitted("forward", **options)(*arrays, num_valid=num_valid)

    def backward(self, *arrays, **options) -> tuple[Any, Any]:
        return self._jitted("backward", **options)(*arrays)

    @functools.cache  # noqa: B019 (two instances at most, alive for the session)
    def _jitted(self, name: str, **options: Any) -> Any:
        import jax

        return jax.jit(functools.partial(getattr(Kernel, name), self, **options))


class XlaRoutines(PallasKernel):
    """The chunked XLA routines on JAX arrays under ``jax.jit``, in chunks of a few rows.

    Chunks of :data:`XLA_CHUNK` rows divide some of the tests' numbers of rows (stacked by
    ``lax.map``) and not others (written in place by the traced loop of ``softce_multi._chunks``).
    """

    def __init__(self) -> None:
        import jax.numpy as jnp

        xla_kernels = importlib.import_module("softce_multi.kernels.xla")
        self.module = SimpleNamespace(
            row_routine=_without_block_size(xla_kernels.row_routine),
            gradient_routine=_without_block_size(xla_kernels.gradient_routine),
        )
        self.backend = Backend("jax", "jax", "cpu")
        self.xp = jnp
        self.routine_options = {"chunk": XLA_CHUNK}


#: Rows per chunk of the XLA routines in the tests.
XLA_CHUNK = 4


class NumpyRoutine(Kernel):
    """The NumPy in-place row routine.

    NumPy has no gradient routine of its own (its gradients come from the forward pass), so the
    backward tests run the core's on the statistics that the NumPy routine saved.
    """

    def __init__(self) -> None:
        self.module = SimpleNamespace(
            row_routine=_without_block_size(numpy_kernels.row_routine),
            gradient_routine=_without_block_size(blocked.blocked_gradient_routine(None, xp=np)),
        )
        self.backend = Backend("numpy", "numpy", "cpu")
        self.xp = np
        self.routine_options = {}

    def backward(self, *arrays, **options) -> tuple[Any, Any]:
        with np.errstate(all="ignore"):  # as the generic adapter runs NumPy: padding may be NaN
            return super().backward(*arrays, **options)


class TorchCpuPath(Kernel):
    """The torch adapter's routines on CPU tensors: its custom operators (no chunk size)."""

    def __init__(self) -> None:
        import array_api_compat.torch

        torch_adapter = importlib.import_module("softce_multi._adapters.torch_shared")
        self.module = SimpleNamespace(
            row_routine=_without_block_size(torch_adapter.row_routine),
            gradient_routine=_without_block_size(torch_adapter.gradient_routine),
        )
        self.backend = Backend("torch-cpu", "torch", "cpu")
        self.xp = array_api_compat.torch
        self.routine_options = {}


def _without_block_size(routine: Any) -> Any:
    """``routine``, accepting and ignoring the ``block_size`` that the kernels take."""

    def call(*arrays: Any, block_size: int | None, **options: Any) -> Any:
        return routine(*arrays, **options)

    return call


def _triton_kernel() -> TritonKernel:
    if not is_installed("torch") or not is_installed("triton"):
        pytest.skip("needs torch and triton")
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    return TritonKernel()


def _pallas_kernel() -> PallasKernel:
    if not is_installed("jax"):
        pytest.skip("needs jax")
    try:
        importlib.import_module("jax.experimental.pallas.triton")
    except ImportError:
        pytest.skip("this jax has no Pallas Triton backend (jax.experimental.pallas.triton)")
    return PallasKernel()


def backward_with_upstream(kernel, case, upstream, *, logits_grad, targets_grad):
    """The kernel's backward pass for reduction "none" with a per-position ``upstream``."""
    forward = kernel.forward(
        *case[:3], reduction="none", num_valid=None, with_logits_grad=False, block_size=BLOCK
    )
    row_scale = forward.row_scale * kernel.backend.asarray(upstream.reshape(-1))
    return kernel.backward(
        case.logits,
        case.target_probs,
        forward.saved,
        row_scale,
        logits_grad=logits_grad,
        targets_grad=targets_grad,
        block_size=BLOCK,
    )


def _torch_cpu_path() -> TorchCpuPath:
    if not is_installed("torch"):
        pytest.skip("needs torch")
    return TorchCpuPath()


def _xla_routines() -> XlaRoutines:
    if not is_installed("jax"):
        pytest.skip("needs jax")
    return XlaRoutines()


_IMPLEMENTATIONS = {
    "triton": _triton_kernel,
    "pallas": _pallas_kernel,
    "torch-cpu": _torch_cpu_path,
    "numpy": NumpyRoutine,
    "xla": _xla_routines,
}


@pytest.fixture(params=list(_IMPLEMENTATIONS), scope="module")
def kernel(request: pytest.FixtureRequest) -> Kernel:
    """Each kernel, on the device where it runs (or its interpreter), and the torch CPU path."""
    return _IMPLEMENTATIONS[request.param]()


@pytest.fixture(params=["triton", "pallas"], scope="module")
def gpu_kernel(request: pytest.FixtureRequest) -> Kernel:
    """Each GPU kernel, on the device where it runs (or its interpreter)."""
    return _IMPLEMENTATIONS[request.param]()


@pytest.fixture(scope="module")
def triton_kernel() -> TritonKernel:
    return _triton_kernel()


def valid_rows(case) -> np.ndarray:
    return case.w.reshape(-1) != 0


def assert_saved_rows_match_core(result, core_result, case) -> None:
    """Every saved row statistic agrees with the core at every row that is read."""
    rows = valid_rows(case)
    for actual, expected in zip(result.saved, core_result.saved, strict=True):
        actual, expected = to_float64(actual), to_float64(expected)
        np.testing.assert_allclose(actual[rows], expected[rows], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------

DTYPES = {
    "float64": ("float64", "float64"),
    "float32": ("float32", "float32"),
    "bfloat16 logits": ("bfloat16", "float32"),
    "float16 logits": ("float16", "float32"),
}


@pytest.mark.parametrize(("logits_dtype", "target_dtype"), DTYPES.values(), ids=DTYPES.keys())
def test_loss_and_gradient_match_reference_and_core(kernel, logits_dtype, target_dtype):
    rng = np.random.default_rng(10)
    case = make_case(
        kernel.backend,
        rng,
        SHAPE,
        logits_dtype=logits_dtype,
        target_dtype=target_dtype,
        mask_trailing_one=True,
    )
    compute = "float64" if "float64" in (logits_dtype, target_dtype) else "float32"
    expected = reference(case.z, case.p, case.w)
    options = dict(reduction="mean", num_valid=None, with_logits_grad=True)

    result = kernel.forward(*case[:3], block_size=BLOCK, **options)
    core_result = kernel.core_forward(*case[:3], **options)

    assert_loss_close(result.loss, expected.loss, compute)
    assert_gradient_close(result.logits_grad, expected.grad_logits, compute)
    assert result.logits_grad.dtype == case.logits.dtype
    assert_gradient_close(result.logits_grad, to_float64(core_result.logits_grad), compute)
    assert_saved_rows_match_core(result, core_result, case)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_other_reductions_match_reference(kernel, reduction):
    rng = np.random.default_rng(11)
    case = make_case(kernel.backend, rng, SHAPE, mask_kind="float")
    expected = reference(case.z, case.p, case.w, reduction=reduction)

    result = kernel.forward(
        *case[:3], reduction=reduction, num_valid=None, with_logits_grad=True, block_size=BLOCK
    )

    assert tuple(result.loss.shape) == (() if reduction == "sum" else SHAPE[:-1])
    assert_loss_close(result.loss, expected.loss, "float32")
    # For "none", the gradient of the sum of the per-position losses (a unit upstream).
    assert_gradient_close(result.logits_grad, expected.grad_logits, "float32")


@pytest.mark.parametrize(
    ("logits_grad", "targets_grad"),
    [(True, True), (True, False), (False, True)],
    ids=["both", "logits", "targets"],
)
def test_backward_matches_reference_for_a_per_position_upstream(kernel, logits_grad, targets_grad):
    rng = np.random.default_rng(12)
    case = make_case(kernel.backend, rng, SHAPE, logits_dtype="bfloat16", mask_kind="float")
    upstream = rng.uniform(0.5, 2.0, size=SHAPE[:-1]).astype(np.float32)
    expected = reference(case.z, case.p, case.w, reduction="none", upstream=upstream)

    grad_logits, grad_targets = backward_with_upstream(
        kernel, case, upstream, logits_grad=logits_grad, targets_grad=targets_grad
    )

    assert (grad_logits is not None, grad_targets is not None) == (logits_grad, targets_grad)
    if logits_grad:
        assert grad_logits.dtype == case.logits.dtype
        assert_gradient_close(grad_logits, expected.grad_logits, "float32")
    if targets_grad:
        assert grad_targets.dtype == case.target_probs.dtype
        assert_gradient_close(grad_targets, expected.grad_targets, "float32")


@pytest.mark.parametrize(
    ("vocab", "block_size"),
    [(1, None), (7, None), (1000, 256), (1000, None)],
    ids=["V=1", "V=7", "V=1000 in chunks of 256", "V=1000 in one chunk"],
)
def test_any_vocabulary_size_matches_reference(kernel, vocab, block_size):
    rng = np.random.default_rng(13)
    case = make_case(kernel.backend, rng, (3, vocab))
    expected = reference(case.z, case.p, case.w)

    result = kernel.forward(
        *case[:3], reduction="mean", num_valid=None, with_logits_grad=True, block_size=block_size
    )

    assert_loss_close(result.loss, expected.loss, "float32")
    assert_gradient_close(result.logits_grad, expected.grad_logits, "float32")


# --------------------------------------------------------------------------------------------
# Masks, counts and special values
# --------------------------------------------------------------------------------------------


def test_masked_rows_are_ignored_whatever_they_hold(kernel):
    rng = np.random.default_rng(14)
    case = make_case(kernel.backend, rng, SHAPE, mask_trailing_one=True)
    masked = ~valid_rows(case).reshape(SHAPE[:-1])
    z, p = case.z.copy(), case.p.copy()
    z[masked], p[masked] = np.nan, np.inf
    z[masked, 0] = -np.inf
    poisoned = (kernel.backend.asarray(z, "float32"), kernel.backend.asarray(p, "float32"))
    options = dict(reduction="mean", num_valid=None, with_logits_grad=True, block_size=BLOCK)

    clean = kernel.forward(*case[:3], **options)
    result = kernel.forward(*poisoned, case.position_mask, **options)

    np.testing.assert_array_equal(to_float64(result.loss), to_float64(clean.loss))
    np.testing.assert_array_equal(to_float64(result.logits_grad), to_float64(clean.logits_grad))
    assert np.all(to_float64(result.logits_grad)[masked] == 0)
    for statistic in result.saved:
        assert np.all(np.isfinite(to_float64(statistic)))


def test_no_valid_position_gives_zero_loss_and_gradient(kernel):
    rng = np.random.default_rng(15)
    case = make_case(kernel.backend, rng, SHAPE, valid="none")

    result = kernel.forward(
        *case[:3], reduction="mean", num_valid=None, with_logits_grad=True, block_size=BLOCK
    )

    assert to_float64(result.loss) == 0
    assert np.all(to_float64(result.logits_grad) == 0)


NUM_VALID = {
    "number": lambda backend: 9,
    "0-d array": lambda backend: backend.asarray(np.asarray(2.5, dtype=np.float32)),
}


@pytest.mark.parametrize("num_valid", NUM_VALID.values(), ids=NUM_VALID.keys())
def test_num_valid_replaces_the_denominator(kernel, num_valid):
    rng = np.random.default_rng(16)
    case = make_case(kernel.backend, rng, SHAPE)
    count = num_valid(kernel.backend)
    expected = reference(case.z, case.p, case.w, num_valid=float(to_float64(count)))

    result = kernel.forward(
        *case[:3], reduction="mean", num_valid=count, with_logits_grad=True, block_size=BLOCK
    )

    assert_loss_close(result.loss, expected.loss, "float32")
    assert_gradient_close(result.logits_grad, expected.grad_logits, "float32")


ZERO_COUNT = {
    "number": lambda backend: 0,
    "0-d array": lambda backend: backend.asarray(np.asarray(0, dtype=np.int32)),
}


@pytest.mark.parametrize("num_valid", ZERO_COUNT.values(), ids=ZERO_COUNT.keys())
def test_num_valid_zero_gives_zero_loss_and_gradient(kernel, num_valid):
    rng = np.random.default_rng(17)
    case = make_case(kernel.backend, rng, SHAPE)

    result = kernel.forward(
        *case[:3],
        reduction="mean",
        num_valid=num_valid(kernel.backend),
        with_logits_grad=True,
        block_size=BLOCK,
    )

    assert to_float64(result.loss) == 0
    assert np.all(to_float64(result.logits_grad) == 0)


def test_zero_targets_at_minus_infinite_logits_contribute_nothing(kernel):
    rng = np.random.default_rng(18)
    case = make_case(kernel.backend, rng, SHAPE, valid="all")
    z, p = case.z.copy(), case.p.copy()
    banned = rng.random(SHAPE) < 0.3
    banned[..., 0] = False  # keep a finite logit in every row
    z[banned], p[banned] = -np.inf, 0.0
    # The same loss as a logit so negative that its probability is exactly 0 in float32.
    expected = reference(np.where(banned, -1e4, z), p, case.w)

    result = kernel.forward(
        kernel.backend.asarray(z, "float32"),
        kernel.backend.asarray(p, "float32"),
        case.position_mask,
        reduction="mean",
        num_valid=None,
        with_logits_grad=True,
        block_size=BLOCK,
    )

    assert_loss_close(result.loss, expected.loss, "float32")
    assert_gradient_close(result.logits_grad, expected.grad_logits, "float32")
    assert np.all(to_float64(result.logits_grad)[banned] == 0)


def test_a_valid_row_of_minus_inf_logits_and_zero_targets_costs_nothing(kernel):
    rng = np.random.default_rng(19)
    case = make_case(kernel.backend, rng, SHAPE, valid="all")
    z, p = case.z.copy(), case.p.copy()
    z[0, 1], p[0, 1] = -np.inf, 0.0
    expected = reference(np.where(np.isinf(z), 0.0, z), p, case.w)  # that row adds 0 either way

    result = kernel.forward(
        kernel.backend.asarray(z, "float32"),
        kernel.backend.asarray(p, "float32"),
        case.position_mask,
        reduction="mean",
        num_valid=None,
        with_logits_grad=True,
        block_size=BLOCK,
    )
    saved = _core.SavedRows(*result.saved)
    grad_logits, _ = kernel.backward(
        kernel.backend.asarray(z, "float32"),
        kernel.backend.asarray(p, "float32"),
        saved,
        result.row_scale,
        logits_grad=True,
        targets_grad=False,
        block_size=BLOCK,
    )

    assert_loss_close(result.loss, expected.loss, "float32")
    assert_gradient_close(result.logits_grad, expected.grad_logits, "float32")
    assert np.all(to_float64(result.logits_grad)[0, 1] == 0)
    assert np.all(to_float64(grad_logits)[0, 1] == 0)


@pytest.mark.parametrize("offset", [-1000.0, 1000.0])
def test_logits_far_from_zero_match_reference(kernel, offset):
    # Every row maximum is about offset: the online statistics must rescale without overflow
    # (-1000), and the softmax must not go through a log-normalizer rounded near 1000.
    rng = np.random.default_rng(19)
    case = make_case(kernel.backend, rng, SHAPE)
    z = (case.z + offset).astype(np.float32)
    expected = reference(z.astype(np.float64), case.p, case.w)

    result = kernel.forward(
        kernel.backend.asarray(z),
        case.target_probs,
        case.position_mask,
        reduction="mean",
        num_valid=None,
        with_logits_grad=True,
        block_size=BLOCK,
    )

    assert_loss_close(result.loss, expected.loss, "float32")
    assert_gradient_close(result.logits_grad, expected.grad_logits, "float32")


def test_backward_from_saved_rows_is_accurate_far_from_zero(kernel):
    # float32 logits near 1000: a log-normalizer rounded there is off by up to 3e-5, which
    # exp(z - lse) would turn into a relative gradient error of that size.
    rng = np.random.default_rng(24)
    case = make_case(kernel.backend, rng, SHAPE, offset=1000.0, mask_kind="float")
    upstream = rng.uniform(0.5, 2.0, size=SHAPE[:-1]).astype(np.float32)
    expected = reference(case.z, case.p, case.w, reduction="none", upstream=upstream)

    grad_logits, grad_targets = backward_with_upstream(
        kernel, case, upstream, logits_grad=True, targets_grad=True
    )

    assert_gradient_close(grad_logits, expected.grad_logits, "float32")
    assert_gradient_close(grad_targets, expected.grad_targets, "float32")


def test_empty_batch_gives_zero_loss_and_empty_gradient(kernel):
    rng = np.random.default_rng(19)
    case = make_case(kernel.backend, rng, (0, 5), valid="none")

    result = kernel.forward(
        *case[:3], reduction="mean", num_valid=None, with_logits_grad=True, block_size=None
    )

    assert to_float64(result.loss) == 0
    assert tuple(result.logits_grad.shape) == (0, 5)


def test_long_chunks_get_a_warp_per_512_entries():
    # 8192 entries with 8 warps need more registers than a thread has (ptxas spills them); a
    # warp per 512 entries keeps 16 entries a thread, as 4096 with 8 warps.
    from softce_multi.kernels import launch_config

    assert [launch_config(100_000, block)[1] for block in (1024, 2048, 4096)] == [4, 8, 8]
    assert [launch_config(100_000, block)[1] for block in (8192, 16384, 65536)] == [16, 32, 32]
    assert launch_config(32000, None) == (4096, 8)


def test_block_size_must_be_a_power_of_two(gpu_kernel):
    rng = np.random.default_rng(20)
    case = make_case(gpu_kernel.backend, rng, SHAPE)

    with pytest.raises(ValueError, match="block_size must be a positive power of two, got 24"):
        gpu_kernel.forward(
            *case[:3], reduction="mean", num_valid=None, with_logits_grad=False, block_size=24
        )


# --------------------------------------------------------------------------------------------
# Triton: memory layout
# --------------------------------------------------------------------------------------------


def test_triton_reads_strided_rows_in_place(triton_kernel):
    import torch

    rng = np.random.default_rng(21)
    wide = make_case(triton_kernel.backend, rng, (2, 3, 50))
    logits, targets = wide.logits[..., :37], wide.target_probs[..., 5:42]
    expected = reference(wide.z[..., :37], wide.p[..., 5:42], wide.w)

    result = triton_kernel.forward(
        logits,
        targets,
        wide.position_mask,
        reduction="mean",
        num_valid=None,
        with_logits_grad=True,
        block_size=BLOCK,
    )

    assert not logits.is_contiguous()
    assert logits.reshape(6, 37).data_ptr() == logits.data_ptr()  # a view: no copy to read
    assert_loss_close(result.loss, expected.loss, "float32")
    assert_gradient_close(result.logits_grad, expected.grad_logits, "float32")
    assert result.logits_grad.dtype == torch.float32


def test_triton_copies_columns_whose_32_bit_offsets_would_overflow(triton_kernel):
    # The kernels multiply column indices by the column stride in 32 bits. A transposed
    # [N, V] view with (V - 1) * N >= 2**31 (V = 128256, N >= 16744) must be copied first; on
    # the meta device such a view costs no memory.
    import torch

    from softce_multi.kernels.triton import addressable

    transposed = torch.empty((128256, 16744), device="meta").T
    near = torch.empty((128256, 16743), device="meta").T

    assert addressable(transposed).is_contiguous()
    assert addressable(near) is near  # (V - 1) * 16743 < 2**31: read in place
    contiguous = torch.empty((3, 5))
    assert addressable(contiguous) is contiguous


def test_triton_kernels_launch_where_torch_refuses_to_wrap_an_interpreted_kernel(
    triton_kernel, wrap_triton_of_jit_functions_only
):
    case = make_case(triton_kernel.backend, np.random.default_rng(23), SHAPE)

    result = triton_kernel.forward(
        case.logits,
        case.target_probs,
        case.position_mask,
        reduction="mean",
        num_valid=None,
        with_logits_grad=True,
        block_size=BLOCK,
    )

    expected = reference(case.z, case.p, case.w)
    assert_loss_close(result.loss, expected.loss, "float32")
    assert_gradient_close(result.logits_grad, expected.grad_logits, "float32")


def test_triton_never_writes_its_inputs(triton_kernel):
    import torch

    rng = np.random.default_rng(22)
    case = make_case(triton_kernel.backend, rng, SHAPE, logits_dtype="bfloat16")
    before = [array.clone() for array in case[:3]]

    forward = triton_kernel.forward(
        *case[:3], reduction="mean", num_valid=None, with_logits_grad=True, block_size=BLOCK
    )
    triton_kernel.backward(
        case.logits,
        case.target_probs,
        forward.saved,
        forward.row_scale,
        logits_grad=True,
        targets_grad=True,
        block_size=BLOCK,
    )

    for old, new in zip(before, case[:3], strict=True):
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[old.element_size()]
        assert torch.equal(old.view(bits), new.view(bits))


# --------------------------------------------------------------------------------------------
# Compilation for the GPU, checked without one
# --------------------------------------------------------------------------------------------

_COMPILE_TRITON = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from softce_multi.kernels import triton as kernels

    def compile_for_sm80(fn, pointer_types, constexprs):
        signature, attrs = {}, {}
        for index, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            pointer = pointer_types.get(name, pointer_types["*"])
            signature[name] = "*" + pointer if name.endswith("_ptr") else "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(source, target=GPUTarget("cuda", 80, 32), options={"num_warps": 8})

    unit = {"z_col_stride": 1, "p_col_stride": 1, "BLOCK_SIZE": 4096}
    # The computation dtype is that of the per-row pointers ("*"): float32, or float64.
    for z, p, compute in [("bf16", "fp32", "fp32"), ("fp64", "fp64", "fp64")]:
        types = {"z_ptr": z, "p_ptr": p, "grad_ptr": z, "logits_grad_ptr": z,
                 "targets_grad_ptr": p, "*": compute}
        for with_grad in (True, False):
            flags = {"WITH_GRAD": with_grad, "STATS_EVICTION": "evict_last"}
            compiled = compile_for_sm80(kernels._forward_kernel, types, {**unit, **flags})
            assert "cubin" in compiled.asm
        for logits, targets in [(True, True), (True, False), (False, True)]:
            flags = {"LOGITS_GRAD": logits, "TARGETS_GRAD": targets}
            compiled = compile_for_sm80(kernels._backward_kernel, types, {**unit, **flags})
            assert "cubin" in compiled.asm
    """
)


def _has_nvidia_compiler() -> bool:
    if not is_installed("torch") or not is_installed("triton"):
        return False
    import triton

    return os.path.exists(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    )


@pytest.mark.skipif(not _has_nvidia_compiler(), reason="needs triton with its CUDA compiler")
def test_triton_kernels_compile_for_cuda():
    # The interpreter accepts programs the compiler rejects; compile them for an A100 (no GPU
    # needed). A fresh process, because kernels defined under TRITON_INTERPRET=1 cannot compile.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    package_root = os.path.dirname(os.path.dirname(softce_multi.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_TRITON], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def lowering_for_a_gpu() -> Any:
    """A context in which JAX lowers Pallas kernels for an H200 where it sees no GPU.

    Pallas's Triton lowering reads the GPU's compute capability; without a GPU, jax 0.11 and
    later take it from an abstract device, and fail without one.
    """
    import jax

    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    sharding = jax.sharding
    try:
        h200 = sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    except TypeError:  # a jax before 0.10.2, whose abstract devices name no platform
        return contextlib.nullcontext()
    axis_types = (sharding.AxisType.Explicit,)
    return sharding.use_abstract_mesh(
        sharding.AbstractMesh((1,), ("x",), axis_types, abstract_device=h200)
    )


@pytest.mark.parametrize("with_logits_grad", [True, False])
def test_pallas_kernels_lower_for_cuda(with_logits_grad):
    kernel = _pallas_kernel()
    import jax
    import jax.numpy as jnp

    logits = jnp.zeros((4, 1000), jnp.bfloat16)
    targets = jnp.zeros((4, 1000), jnp.float32)
    rows = jnp.ones(4, jnp.float32)

    def forward(z, p, w):
        return _core.loss_pass(
            z,
            p,
            w,
            reduction="mean",
            num_valid=None,
            with_logits_grad=with_logits_grad,
            row_routine=kernel.module.row_routine,
            xp=jnp,
        )

    def backward(z, p, saved, scale):
        return _core.gradient_pass(
            z,
            p,
            saved,
            scale,
            logits_grad=True,
            targets_grad=with_logits_grad,
            gradient_routine=kernel.module.gradient_routine,
            xp=jnp,
        )

    saved = _core.SavedRows(rows, rows, rows)
    calls = [(forward, (logits, targets, rows)), (backward, (logits, targets, saved, rows))]
    for function, arrays in calls:
        with lowering_for_a_gpu():
            lowered = jax.jit(function).trace(*arrays).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()


def test_pallas_forward_maps_over_a_leading_axis_under_vmap():
    kernel = _pallas_kernel()
    import jax

    rng = np.random.default_rng(23)
    case = make_case(kernel.backend, rng, SHAPE, mask_kind="float")
    options = dict(reduction="mean", num_valid=None, with_logits_grad=True)

    def per_batch(z, p, w):
        return Kernel.forward(kernel, z, p, w, block_size=BLOCK, **options)

    def per_batch_core(z, p, w):
        return kernel.core_forward(z, p, w, **options)

    result = jax.jit(jax.vmap(per_batch))(*case[:3])
    expected = jax.vmap(per_batch_core)(*case[:3])

    assert_loss_close(result.loss, to_float64(expected.loss), "float32")
    assert_gradient_close(result.logits_grad, to_float64(expected.logits_grad), "float32")


# --------------------------------------------------------------------------------------------
# The adapters run the kernels where they apply
# --------------------------------------------------------------------------------------------


class KernelSpy:
    """Replaces a kernel module's ``row_routine`` and ``gradient_routine`` by recording wrappers.

    A call is recorded as the function's name and the flags saying which gradients it computes.
    ``options`` are added to every call. With ``when_run=True`` a call is recorded when the
    kernel runs, through a JAX debug callback, rather than when it is traced: under ``jax.jit``
    the adapter traces both the kernel and the core, and the platform picks one at compile time.
    """

    def __init__(
        self,
        kernel: TritonKernel | PallasKernel,
        monkeypatch: pytest.MonkeyPatch,
        *,
        when_run: bool = False,
        **options: Any,
    ) -> None:
        self.backend = kernel.backend
        self.calls: list[tuple[str, dict[str, bool]]] = []
        for name in ("row_routine", "gradient_routine"):
            function = getattr(kernel.module, name)
            monkeypatch.setattr(kernel.module, name, self._wrap(name, function, when_run, options))

    def _wrap(self, name: str, function: Any, when_run: bool, options: dict[str, Any]) -> Any:
        def spied(*arrays: Any, **kwargs: Any) -> Any:
            flags = {key: value for key, value in kwargs.items() if key.endswith("grad")}
            record = functools.partial(self.calls.append, (name, flags))
            if when_run:
                import jax

                jax.debug.callback(record)
            else:
                record()
            return function(*arrays, **kwargs, **options)

        return spied


@pytest.fixture
def triton_spy(monkeypatch: pytest.MonkeyPatch) -> KernelSpy:
    """The Triton kernels apply to every torch tensor, and their calls are recorded."""
    kernel = _triton_kernel()
    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)
    return KernelSpy(kernel, monkeypatch)


@pytest.fixture
def pallas_spy(monkeypatch: pytest.MonkeyPatch) -> KernelSpy:
    """The Pallas kernels apply to every JAX array, and the calls that run are recorded.

    Without a GPU, the CPU stands in for the GPU platforms and the kernels run interpreted.
    """
    kernel = _pallas_kernel()
    monkeypatch.setattr(kernels, "use_pallas", lambda *arrays: True)
    if not kernel.interpret:
        return KernelSpy(kernel, monkeypatch, when_run=True)
    jax_adapter = importlib.import_module("softce_multi._adapters.jax")
    monkeypatch.setattr(jax_adapter, "_KERNEL_PLATFORMS", ("cpu",))
    return KernelSpy(kernel, monkeypatch, when_run=True, interpret=True)


WANTED = {"logits": (True, False), "targets": (False, True), "both": (True, True)}


@pytest.mark.parametrize(("logits_grad", "targets_grad"), WANTED.values(), ids=WANTED.keys())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_adapter_runs_the_triton_kernels(triton_spy, reduction, logits_grad, targets_grad):
    rng = np.random.default_rng(30)
    case = make_case(triton_spy.backend, rng, SHAPE, mask_kind="float")
    positions = SHAPE[:-1] if reduction == "none" else ()
    upstream = rng.uniform(0.5, 2.0, size=positions).astype(np.float32)
    expected = reference(case.z, case.p, case.w, reduction=reduction, upstream=upstream)
    logits = case.logits.requires_grad_(logits_grad)
    targets = case.target_probs.requires_grad_(targets_grad)

    loss = softce_multi.masked_soft_cross_entropy(
        logits, targets, case.position_mask, reduction=reduction
    )
    loss.backward(triton_spy.backend.asarray(upstream))

    assert_loss_close(loss.detach(), expected.loss, "float32")
    if logits_grad:
        assert_gradient_close(logits.grad, expected.grad_logits, "float32")
    if targets_grad:
        assert_gradient_close(targets.grad, expected.grad_targets, "float32")
    # The scalar reductions take the logits gradient from the forward kernel; the backward
    # kernel computes, in one sweep, whatever else is wanted.
    fused = logits_grad and reduction != "none"
    recomputed = logits_grad and not fused
    expected_calls = [("row_routine", {"with_logits_grad": fused})]
    if recomputed or targets_grad:
        expected_calls.append(
            ("gradient_routine", {"logits_grad": recomputed, "targets_grad": targets_grad})
        )
    assert triton_spy.calls == expected_calls


def test_torch_second_backward_reuses_the_gradient_of_the_triton_forward_kernel(triton_spy):
    # The buffer written by the forward kernel is saved unchanged, so retain_graph needs no
    # backward kernel.
    rng = np.random.default_rng(31)
    case = make_case(triton_spy.backend, rng, SHAPE)
    expected = reference(case.z, case.p, case.w)
    logits = case.logits.requires_grad_(True)

    loss = softce_multi.masked_soft_cross_entropy(logits, case.target_probs, case.position_mask)
    loss.backward(retain_graph=True)
    loss.backward()

    assert_gradient_close(logits.grad, 2 * expected.grad_logits, "float32")
    assert triton_spy.calls == [("row_routine", {"with_logits_grad": True})]


def test_torch_loss_with_grad_runs_the_triton_kernel(triton_spy):
    rng = np.random.default_rng(32)
    case = make_case(triton_spy.backend, rng, SHAPE, logits_dtype="bfloat16")
    expected = reference(case.z, case.p, case.w, reduction="sum")

    loss, grad = softce_multi.masked_soft_cross_entropy_with_grad(*case[:3], reduction="sum")

    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(grad, expected.grad_logits, "float32")
    assert triton_spy.calls == [("row_routine", {"with_logits_grad": True})]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_adapter_runs_the_pallas_kernels(pallas_spy, reduction):
    import jax

    rng = np.random.default_rng(33)
    case = make_case(pallas_spy.backend, rng, SHAPE, mask_kind="float")
    positions = SHAPE[:-1] if reduction == "none" else ()
    upstream = rng.uniform(0.5, 2.0, size=positions).astype(np.float32)
    expected = reference(case.z, case.p, case.w, reduction=reduction, upstream=upstream)

    def loss(logits, targets):
        return softce_multi.masked_soft_cross_entropy(
            logits, targets, case.position_mask, reduction=reduction
        )

    @jax.jit
    def loss_and_grads(logits, targets, upstream):
        value, pullback = jax.vjp(loss, logits, targets)
        return value, *pullback(upstream)

    value, grad_logits, grad_targets = loss_and_grads(
        case.logits, case.target_probs, pallas_spy.backend.asarray(upstream)
    )
    jax.effects_barrier()

    assert_loss_close(value, expected.loss, "float32")
    assert_gradient_close(grad_logits, expected.grad_logits, "float32")
    assert_gradient_close(grad_targets, expected.grad_targets, "float32")
    # One backward kernel per gradient, so that jit can drop the one that is not used.
    assert sorted(pallas_spy.calls, key=str) == [
        ("gradient_routine", {"logits_grad": False, "targets_grad": True}),
        ("gradient_routine", {"logits_grad": True, "targets_grad": False}),
        ("row_routine", {"with_logits_grad": False}),
    ]


def test_jax_adapter_runs_the_pallas_kernels_under_vmap(pallas_spy):
    import jax

    rng = np.random.default_rng(34)
    case = make_case(pallas_spy.backend, rng, SHAPE, mask_kind="float")
    expected = [reference(case.z[i], case.p[i], case.w[i]).grad_logits for i in range(SHAPE[0])]

    grad = jax.jit(jax.vmap(jax.grad(softce_multi.masked_soft_cross_entropy)))(*case[:3])
    jax.effects_barrier()

    assert_gradient_close(grad, np.stack(expected), "float32")
    assert ("row_routine", {"with_logits_grad": False}) in pallas_spy.calls
    assert ("gradient_routine", {"logits_grad": True, "targets_grad": False}) in pallas_spy.calls


def test_second_derivatives_through_the_pallas_kernels_are_the_references(pallas_spy):
    """A hessian differentiates the backward pass's kernel, whose derivative is the core's."""
    import jax
    import jax.numpy as jnp

    torch = pytest.importorskip("torch")
    from softce_multi import reference as torch_reference

    rng = np.random.default_rng(35)
    case = make_case(pallas_spy.backend, rng, (2, 3, 11), mask_kind="float")

    def loss(logits):
        return softce_multi.masked_soft_cross_entropy(logits, case.target_probs, case.position_mask)

    got = jax.jit(jax.hessian(loss))(case.logits)
    jax.effects_barrier()
    want = torch.autograd.functional.hessian(
        lambda z: torch_reference.masked_soft_cross_entropy(
            z, torch.from_numpy(case.p), torch.from_numpy(case.w)
        ),
        torch.from_numpy(case.z),
    )

    np.testing.assert_allclose(np.asarray(got, np.float64), want.numpy(), rtol=0, atol=1e-6)
    assert ("gradient_routine", {"logits_grad": True, "targets_grad": False}) in pallas_spy.calls
    assert jnp.all(jnp.isfinite(got))


@pytest.mark.parametrize(
    ("argnums", "backward_kernels"),
    [(0, 1), (1, 1), ((0, 1), 2)],
    ids=["logits", "targets", "both"],
)
def test_jax_adapter_compiles_the_pallas_kernels_for_gpus_only(
    monkeypatch, argnums, backward_kernels
):
    _pallas_kernel()
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(kernels, "use_pallas", lambda *arrays: True)
    logits = jnp.zeros((4, 1000), jnp.bfloat16)
    targets = jnp.zeros((4, 1000), jnp.float32)
    mask = jnp.ones(4, bool)

    def loss(logits, targets):
        return softce_multi.masked_soft_cross_entropy(logits, targets, mask)

    with lowering_for_a_gpu():
        traced = jax.jit(jax.grad(loss, argnums=argnums)).trace(logits, targets)
        cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
        cpu = traced.lower(lowering_platforms=("cpu",)).as_text()

    assert cuda.count('name = "_forward_kernel"') == 1
    assert cuda.count('name = "_backward_kernel"') == backward_kernels
    assert "triton" not in cpu


_RUN_ON_THE_CPU = {
    "torch": """
        import torch
        before = set(sys.modules)
        import softce_multi.torch
        logits = torch.randn(2, 3, 11, requires_grad=True)
        target = torch.softmax(torch.randn(2, 3, 11), dim=-1)
        mask = torch.ones(2, 3, dtype=torch.bool)
        loss = softce_multi.masked_soft_cross_entropy(logits, target, mask, reduction="none")
        loss.sum().backward()
    """,
    "jax": """
        import jax, jax.numpy as jnp
        before = set(sys.modules)
        import softce_multi.jax
        logits = jnp.ones((2, 3, 11))
        target = jax.nn.softmax(jnp.arange(66.0).reshape(2, 3, 11))
        mask = jnp.ones((2, 3), dtype=bool)
        jax.jit(jax.grad(softce_multi.masked_soft_cross_entropy))(logits, target, mask)
    """,
}

#: The kernel modules that must stay unloaded on the CPU, by library. Torch itself imports Triton
#: (through ``torch._dynamo``) the first time a custom operator runs, so for torch it is this
#: package's Triton module that must not be loaded; JAX loads neither Pallas nor Triton.
_OUR_KERNELS = ("softce_multi.kernels.triton", "softce_multi.kernels.pallas")
_KERNEL_MODULES = {
    "torch": _OUR_KERNELS,
    "jax": (*_OUR_KERNELS, "jax.experimental.pallas", "jax._src.pallas", "triton"),
}


@pytest.mark.parametrize("library", _RUN_ON_THE_CPU)
def test_adapters_load_no_kernel_module_on_the_cpu(library):
    if not is_installed(library):
        pytest.skip(f"{library} not installed")
    script = (
        "import sys\n"
        + textwrap.dedent(_RUN_ON_THE_CPU[library])
        + textwrap.dedent(
            f"""
        loaded = set(sys.modules) - before
        kernel_modules = [name for name in loaded if name.startswith({_KERNEL_MODULES[library]})]
        assert not kernel_modules, sorted(kernel_modules)
        """
        )
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    package_root = os.path.dirname(os.path.dirname(softce_multi.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_xla_chunks_on_a_gpu_hold_the_gpu_budget_of_rows(monkeypatch):
    # [32768, 32000] logits: 32 rows per chunk on the CPU (1024 chunks that run one after the
    # other), 2048 on a GPU (16 chunks). The platform is asked of the array, or of JAX's
    # default backend under a trace.
    jax = pytest.importorskip("jax", reason="jax not installed")
    from softce_multi import kernels
    from softce_multi.kernels import xla

    logits = jax.ShapeDtypeStruct((32768, 32000), jax.numpy.float32)
    rows_here = jax.eval_shape(lambda z: jax.numpy.zeros((xla._chunk(z, None),)), logits).shape
    monkeypatch.setattr(kernels, "jax_platforms", lambda *arrays: {"gpu"})
    rows_on_a_gpu = jax.eval_shape(lambda z: jax.numpy.zeros((xla._chunk(z, None),)), logits).shape

    assert rows_here == (xla.CHUNK_ELEMENTS // 32000,) == (32,)
    assert rows_on_a_gpu == (2048,)
    assert xla.chunk_rows(32768, 32000, elements=xla.GPU_CHUNK_ELEMENTS) == 2048


@pytest.mark.parametrize("n_rows", [2048, 2053], ids=["N=2048", "prime N=2053"])
def test_jax_loss_and_gradient_under_jit_need_no_logits_sized_temporary(xla_on_the_cpu, n_rows):
    """On XLA, the compiled step's temporaries stay within an eighth of one float32 gradient."""
    jax = xla_on_the_cpu
    jnp = jax.numpy

    import softce_multi.jax

    shape = (1, n_rows, 32000)
    logits = jax.ShapeDtypeStruct(shape, jnp.float32)
    targets = jax.ShapeDtypeStruct(shape, jnp.float32)
    mask = jax.ShapeDtypeStruct(shape[:-1], jnp.bool_)
    step = jax.jit(jax.value_and_grad(softce_multi.jax.masked_soft_cross_entropy))

    compiled = step.lower(logits, targets, mask).compile()

    gradient_bytes = n_rows * 32000 * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= gradient_bytes / 8
