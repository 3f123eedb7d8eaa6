"""The torch loss as a torch operator: custom operators, autograd, torch.func and torch.compile.

The oracle is :mod:`softce_multi.reference` (plain torch, differentiable to any order) in
float64 on the same inputs, so higher derivatives are compared entry by entry.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np
import pytest

from softce_multi.testing import (
    REDUCTIONS,
    assert_gradient_close,
    assert_loss_close,
    is_installed,
    numpy_reference,
    random_mask,
    random_targets,
    to_float64,
)

torch = pytest.importorskip("torch")

import softce_multi  # noqa: E402
from softce_multi import _core, reference  # noqa: E402
from softce_multi.kernels import torch_cpu, torch_cpu_blocks  # noqa: E402
from softce_multi.torch import MaskedSoftCrossEntropy, masked_soft_cross_entropy  # noqa: E402

SHAPE = (2, 3, 7)

#: The installed PyTorch's (major, minor) release.
TORCH_RELEASE = tuple(int(part) for part in torch.__version__.split(".")[:2])

#: Differences between two float64 computations of the same derivative (rounding only).
FLOAT64_TOL = {"rtol": 1e-10, "atol": 1e-12}

#: A compiled loss that steps into a cached helper of array-api-compat (Dynamo warns) fails.
pytestmark = pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")


def float64_inputs(seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[Any, Any, Any]:
    """Normal logits, unnormalised targets with exact zeros and a weight mask (some 0)."""
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.standard_normal(shape) * 2)
    targets = torch.tensor(random_targets(rng, shape, normalised=False))
    mask = torch.tensor(random_mask(rng, shape[:-1], kind="float"))
    return logits, targets, mask


def float32_inputs(seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[Any, Any, Any]:
    logits, targets, mask = float64_inputs(seed, shape)
    return logits.float(), targets.float(), mask > 0


def loss_of(reduction: str, mask: Any, **options: Any) -> Callable[[Any, Any], Any]:
    """Our loss as a function of the logits and targets."""

    def loss(logits: Any, targets: Any) -> Any:
        return masked_soft_cross_entropy(logits, targets, mask, reduction=reduction, **options)

    return loss


def reference_of(reduction: str, mask: Any, **options: Any) -> Callable[[Any, Any], Any]:
    """The reference loss as a function of the logits and targets."""

    def loss(logits: Any, targets: Any) -> Any:
        return reference.masked_soft_cross_entropy(
            logits, targets, mask, reduction=reduction, **options
        )

    return loss


def summed(function: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args: function(*args).sum()


def leaves(*tensors: Any) -> list[Any]:
    return [tensor.detach().clone().requires_grad_(True) for tensor in tensors]


# --------------------------------------------------------------------------------------------
# The operators
# --------------------------------------------------------------------------------------------


def row_routine_arguments(logits_dtype: Any, target_dtype: Any, with_logits_grad: bool) -> tuple:
    """Arguments of a row-routine operator: rows, weights (one 0) and the scale of "mean"."""
    logits, targets, _ = float64_inputs(1, (5, 37))
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5])
    compute = torch.float64 if torch.float64 in (logits_dtype, target_dtype) else torch.float32
    weights = weights.to(compute)
    return (
        logits.to(logits_dtype),
        targets.to(target_dtype),
        weights,
        weights / weights.sum(),
        with_logits_grad,
    )


def gradient_routine_arguments(row_arguments: tuple, logits_grad: bool, targets_grad: bool):
    """Arguments of a gradient-routine operator, with the statistics of the row routine."""
    z, p, weights, row_scale, _ = row_arguments
    _, *saved, _ = torch_cpu.torch_row_routine(z, p, weights, row_scale, False)
    return (z, p, *saved, 3.0 * row_scale, logits_grad, targets_grad)


DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16 logits": (torch.bfloat16, torch.float32),
    "float64": (torch.float64, torch.float64),
}
GRADIENTS = {"logits": (True, False), "targets": (False, True), "both": (True, True)}


@pytest.mark.parametrize("with_logits_grad", [True, False], ids=["with grad", "loss only"])
@pytest.mark.parametrize(("logits_dtype", "target_dtype"), DTYPES.values(), ids=DTYPES.keys())
def test_torch_row_routine_passes_opcheck(logits_dtype, target_dtype, with_logits_grad):
    arguments = row_routine_arguments(logits_dtype, target_dtype, with_logits_grad)

    torch.library.opcheck(torch_cpu.torch_row_routine, arguments)


@pytest.mark.parametrize(("logits_grad", "targets_grad"), GRADIENTS.values(), ids=GRADIENTS.keys())
@pytest.mark.parametrize(("logits_dtype", "target_dtype"), DTYPES.values(), ids=DTYPES.keys())
def test_torch_gradient_routine_passes_opcheck(
    logits_dtype, target_dtype, logits_grad, targets_grad
):
    rows = row_routine_arguments(logits_dtype, target_dtype, False)
    arguments = gradient_routine_arguments(rows, logits_grad, targets_grad)

    torch.library.opcheck(torch_cpu.torch_gradient_routine, arguments)


@pytest.mark.parametrize(("logits_dtype", "target_dtype"), DTYPES.values(), ids=DTYPES.keys())
def test_torch_row_routine_in_place_passes_opcheck(logits_dtype, target_dtype):
    arguments = row_routine_arguments(logits_dtype, target_dtype, True)[:4]

    torch.library.opcheck(torch_cpu.torch_row_routine_, arguments)


@pytest.mark.parametrize(("logits_dtype", "target_dtype"), DTYPES.values(), ids=DTYPES.keys())
def test_torch_row_routine_in_place_writes_the_gradient_over_the_logits(logits_dtype, target_dtype):
    """The in-place operator's outputs, and the gradient left in ``z``, are the functional
    operator's, bit for bit; NaN in the row of weight 0 leaves a zero gradient row."""
    z, p, weights, row_scale, _ = row_routine_arguments(logits_dtype, target_dtype, True)
    z[1] = float("nan")
    expected = torch_cpu.torch_row_routine(z, p, weights, row_scale, True)

    stats = torch_cpu.torch_row_routine_(z, p, weights, row_scale)

    for got, want in zip((*stats, z), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.all(z[1] == 0)


@pytest.mark.parametrize("targets_grad", [True, False], ids=["and targets", "logits only"])
@pytest.mark.parametrize(("logits_dtype", "target_dtype"), DTYPES.values(), ids=DTYPES.keys())
def test_torch_gradient_routine_in_place_passes_opcheck(logits_dtype, target_dtype, targets_grad):
    rows = row_routine_arguments(logits_dtype, target_dtype, False)
    arguments = gradient_routine_arguments(rows, True, targets_grad)

    torch.library.opcheck(torch_cpu.torch_gradient_routine_, (*arguments[:6], targets_grad))


@pytest.mark.parametrize(("logits_dtype", "target_dtype"), DTYPES.values(), ids=DTYPES.keys())
def test_torch_gradient_routine_in_place_writes_the_logits_gradient_over_the_logits(
    logits_dtype, target_dtype
):
    """The logits gradient left in ``z`` and the targets gradient returned are the functional
    operator's, bit for bit; NaN in the row of scale 0 leaves zero gradient rows."""
    rows = row_routine_arguments(logits_dtype, target_dtype, False)
    z, p, *saved, row_scale, _, _ = gradient_routine_arguments(rows, True, True)
    z[1] = float("nan")
    expected = torch_cpu.torch_gradient_routine(z, p, *saved, row_scale, True, True)

    grad_p = torch_cpu.torch_gradient_routine_(z, p, *saved, row_scale, True)

    for got, want in zip((z, grad_p), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.all(z[1] == 0) and torch.all(grad_p[1] == 0)


def triton_module_and_opcheck_tests() -> tuple[Any, tuple[str, ...]]:
    """The Triton kernel module, and the opcheck tests that apply where it runs.

    In Triton's interpreter ``torch.library.wrap_triton`` hands back the interpreted kernel, which
    AOT dispatch would launch on fake tensors, so ``test_aot_dispatch_dynamic`` needs a GPU.
    """
    if not is_installed("triton"):
        pytest.skip("triton not installed")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    from softce_multi.kernels import triton as triton_kernels

    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if torch.cuda.is_available():
        tests = (*tests, "test_aot_dispatch_dynamic")
    return triton_kernels, tests


def on_triton_device(arguments: tuple) -> tuple:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in arguments)


@pytest.mark.parametrize("with_logits_grad", [True, False], ids=["with grad", "loss only"])
def test_triton_row_routine_passes_opcheck(with_logits_grad):
    triton_kernels, tests = triton_module_and_opcheck_tests()
    arguments = row_routine_arguments(torch.bfloat16, torch.float32, with_logits_grad)

    torch.library.opcheck(
        triton_kernels.triton_row_routine, (*on_triton_device(arguments), 16), test_utils=tests
    )


def test_triton_row_routine_in_place_passes_opcheck():
    triton_kernels, tests = triton_module_and_opcheck_tests()
    arguments = row_routine_arguments(torch.bfloat16, torch.float32, True)[:4]

    torch.library.opcheck(
        triton_kernels.triton_row_routine_, (*on_triton_device(arguments), 16), test_utils=tests
    )


def test_triton_row_routine_in_place_writes_the_gradient_over_the_logits():
    """As the functional Triton operator, with the gradient left in ``z``."""
    triton_kernels, _ = triton_module_and_opcheck_tests()
    z, p, weights, row_scale, _ = on_triton_device(
        row_routine_arguments(torch.float32, torch.float32, True)
    )
    z[1] = float("nan")
    expected = triton_kernels.triton_row_routine(z, p, weights, row_scale, True, 16)

    stats = triton_kernels.triton_row_routine_(z, p, weights, row_scale, 16)

    for got, want in zip((*stats, z), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.all(z[1] == 0)


def test_triton_row_routine_in_place_refuses_strided_logits():
    triton_kernels, _ = triton_module_and_opcheck_tests()
    z, p, weights, row_scale, _ = on_triton_device(
        row_routine_arguments(torch.float32, torch.float32, True)
    )
    strided = torch.cat([z, z], dim=1)[:, ::2]

    with pytest.raises(ValueError, match="z must be contiguous"):
        triton_kernels.triton_row_routine_(strided, p, weights, row_scale, 16)


@pytest.mark.parametrize("targets_grad", [True, False], ids=["and targets", "logits only"])
def test_triton_gradient_routine_in_place_passes_opcheck(targets_grad):
    triton_kernels, tests = triton_module_and_opcheck_tests()
    rows = row_routine_arguments(torch.bfloat16, torch.float32, False)
    arguments = gradient_routine_arguments(rows, True, targets_grad)

    torch.library.opcheck(
        triton_kernels.triton_gradient_routine_,
        (*on_triton_device(arguments[:6]), targets_grad, 16),
        test_utils=tests,
    )


def test_triton_gradient_routine_in_place_writes_the_logits_gradient_over_the_logits():
    """As the functional Triton operator, with the logits gradient left in ``z``."""
    triton_kernels, _ = triton_module_and_opcheck_tests()
    rows = row_routine_arguments(torch.float32, torch.float32, False)
    z, p, *saved, row_scale, _, _ = on_triton_device(gradient_routine_arguments(rows, True, True))
    z[1] = float("nan")
    expected = triton_kernels.triton_gradient_routine(z, p, *saved, row_scale, True, True, 16)

    grad_p = triton_kernels.triton_gradient_routine_(z, p, *saved, row_scale, True, 16)

    for got, want in zip((z, grad_p), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.all(z[1] == 0)


def test_triton_gradient_routine_in_place_refuses_strided_logits():
    triton_kernels, _ = triton_module_and_opcheck_tests()
    rows = row_routine_arguments(torch.float32, torch.float32, False)
    z, p, *saved, row_scale, _, _ = on_triton_device(gradient_routine_arguments(rows, True, False))
    strided = torch.cat([z, z], dim=1)[:, ::2]

    with pytest.raises(ValueError, match="z must be contiguous"):
        triton_kernels.triton_gradient_routine_(strided, p, *saved, row_scale, False, 16)


@pytest.mark.parametrize(("logits_grad", "targets_grad"), GRADIENTS.values(), ids=GRADIENTS.keys())
def test_triton_gradient_routine_passes_opcheck(logits_grad, targets_grad):
    triton_kernels, tests = triton_module_and_opcheck_tests()
    rows = row_routine_arguments(torch.bfloat16, torch.float32, False)
    arguments = gradient_routine_arguments(rows, logits_grad, targets_grad)

    torch.library.opcheck(
        triton_kernels.triton_gradient_routine,
        (*on_triton_device(arguments), 16),
        test_utils=tests,
    )


def test_operators_batch_under_vmap_as_a_loop_would():
    # The vmap rule folds the batch into the rows; an argument without a batch axis (here the
    # targets) is shared by every call.
    z, p, weights, row_scale, _ = row_routine_arguments(torch.float32, torch.float32, True)
    batch = torch.stack([z, z.flip(0), 2 * z])

    batched = torch.func.vmap(torch_cpu.torch_row_routine, in_dims=(0, None, None, None, None))(
        batch, p, weights, row_scale, True
    )
    looped = [torch_cpu.torch_row_routine(z, p, weights, row_scale, True) for z in batch]

    for index, output in enumerate(batched):
        torch.testing.assert_close(output, torch.stack([result[index] for result in looped]))


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks_shared_among_workers_give_the_reference_loss_and_gradients(
    monkeypatch, logits_dtype
):
    # 3 rows per block, 14 blocks taken by 2 workers; padding holds NaN and inf, and a valid
    # row has zero targets at -inf logits.
    monkeypatch.setattr(torch_cpu, "BLOCK_ELEMENTS", 3 * 37)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        logits, targets, mask = float32_inputs(7, (41, 37))
        valid_row = int(torch.nonzero(mask)[0])
        logits[valid_row, :5] = -torch.inf
        targets[valid_row, :5] = 0.0
        padded = logits.clone()
        padded[~mask] = torch.nan
        padded[~mask, 0] = torch.inf
        z, p = leaves(padded.to(logits_dtype), targets)
        loss = masked_soft_cross_entropy(z, p, mask)
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    # The oracle sees the rows before padding: masked rows do not count either way.
    expected = numpy_reference(to_float64(logits.to(logits_dtype)), to_float64(targets), mask)
    finite = torch.arange(41) != valid_row  # the targets gradient is inf at -inf logits

    assert_loss_close(loss, expected.loss, "float32", dtype="float32")
    assert_gradient_close(z.grad, expected.grad_logits, "float32", dtype=str(logits_dtype)[6:])
    assert_gradient_close(p.grad[finite], expected.grad_targets[finite], "float32")


@pytest.mark.parametrize("vocab", [128256, 2**18], ids=["llama3", "2**18"])
def test_long_rows_meet_the_float32_tolerance(vocab):
    """PyTorch's softmax kernel adds a row one element after another: at these vocabularies
    its total is off by more than float32's tolerance, so the row's sum is taken again."""
    rng = np.random.default_rng(8)
    logits = torch.tensor(rng.standard_normal((3, vocab)) * 4, dtype=torch.float32)
    targets = torch.softmax(torch.tensor(rng.standard_normal((3, vocab)) * 3), -1).float()
    mask = torch.ones(3, dtype=torch.bool)
    (z,) = leaves(logits)

    loss = masked_soft_cross_entropy(z, targets, mask)
    loss.backward()

    expected = numpy_reference(to_float64(logits), to_float64(targets), mask)
    assert_loss_close(loss, expected.loss, "float32", dtype="float32")
    assert_gradient_close(z.grad, expected.grad_logits, "float32", dtype="float32")


def row_routine_out_of_place(z: Any, p: Any, weights: Any, row_scale: Any) -> tuple[Any, ...]:
    return torch_cpu.torch_row_routine(z, p, weights, row_scale, True)


def row_routine_over_the_logits(z: Any, p: Any, weights: Any, row_scale: Any) -> tuple[Any, ...]:
    z = z.clone()
    losses, row_max, log_sum_exp, target_sum = torch_cpu.torch_row_routine_(
        z, p, weights, row_scale
    )
    return losses, row_max, log_sum_exp, target_sum, z


#: The two ways the torch CPU rows are checked: after all blocks (a gradient of its own) and in
#: each block (the gradient written over the logits, which are gone after their block).
ROW_ROUTINES = {
    "checked after the blocks": row_routine_out_of_place,
    "checked in each block": row_routine_over_the_logits,
}


@pytest.mark.parametrize("routine", ROW_ROUTINES.values(), ids=ROW_ROUTINES.keys())
def test_rows_without_a_finite_maximum_get_the_statistics_and_gradient_of_the_core(
    monkeypatch, routine
):
    # Valid rows of all -inf logits (with and without target mass), with a +inf logit and with
    # a NaN, and a finite row with zero targets at -inf logits (a 0 * -inf term), among finite
    # rows, 2 rows per block on 2 workers: the softmax kernel's shortcut (the sum as the
    # reciprocal of the softmax's maximum) must not apply to them.
    monkeypatch.setattr(torch_cpu, "BLOCK_ELEMENTS", 2 * 37)
    z, p, _ = float32_inputs(23, (9, 37))
    z[1], z[2] = -torch.inf, -torch.inf
    p[2] = 0.0
    z[4, 3], z[7, 5] = torch.inf, torch.nan
    z[8, :4], p[8, :4] = -torch.inf, 0.0
    weights = torch.ones(9)
    row_scale = torch.full((9,), 0.25)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        losses, row_max, log_sum_exp, target_sum, grad = routine(z, p, weights, row_scale)
    finally:
        torch.set_num_threads(threads)
    xp = array_api_compat.array_namespace(z)
    stats = _core.row_statistics(z, p, xp=xp)
    expected_grad = _core.logits_gradient_rows(
        z, p, stats.row_max, torch.log(stats.sum_exp), stats.target_sum, row_scale, xp=xp
    )

    for got, want in [
        (losses, _core.row_losses(stats, xp=xp)),
        (row_max, stats.row_max),
        (log_sum_exp, torch.log(stats.sum_exp)),
        (target_sum, stats.target_sum),
        (grad, expected_grad),
    ]:
        torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(grad[[1, 4, 7]]).any(dim=-1).all()  # the core's NaN, not a shortcut's
    assert torch.all(grad[2] == 0)  # no target mass
    assert torch.isfinite(losses[8]) and torch.isfinite(grad[8]).all()


@pytest.mark.parametrize("routine", ROW_ROUTINES.values(), ids=ROW_ROUTINES.keys())
def test_only_valid_rows_are_computed_again(monkeypatch, routine):
    """Padding rows (weight 0) holding NaN and inf cost no second pass; a valid row without a
    finite maximum gets one."""
    monkeypatch.setattr(torch_cpu, "BLOCK_ELEMENTS", 2 * 37)
    redone: list[list[int]] = []
    redo = torch_cpu._redo_rows_without_finite_maximum

    def spy(rows: Any, *arguments: Any) -> None:
        redone.append(rows.tolist())
        redo(rows, *arguments)

    monkeypatch.setattr(torch_cpu, "_redo_rows_without_finite_maximum", spy)
    z, p, _ = float32_inputs(29, (9, 37))
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    z[weights == 0] = torch.nan
    z[[3, 6], 0] = torch.inf
    z[5] = -torch.inf

    *_, grad = routine(z, p, weights, weights / 6)

    assert [row for rows in redone for row in rows] == [5]
    assert torch.all(grad[weights == 0] == 0)


def test_block_workers_run_their_operators_on_one_thread():
    """Each worker's PyTorch operators run on that worker alone (a worker that ran them as
    parallel regions would compete with the other workers for the cores), and the caller keeps
    its thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch_cpu_blocks._pool = None  # a fresh pool, as a new process makes
    seen: list[int] = []

    def work(blocks: Any) -> None:
        for _ in blocks:
            seen.append(torch.get_num_threads())

    try:
        torch_cpu_blocks.run_blocks(work, torch.zeros(64, 5), 4)
        caller = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)

    assert len(seen) == 16 and set(seen) == {1}
    assert caller == 2


def worker_threads() -> list[Any]:
    import threading

    return [thread for thread in threading.enumerate() if thread.name.startswith("softce_multi")]


def test_one_pool_serves_every_worker_count(monkeypatch):
    """Calls over 2, 3, 4 and 5 blocks share one pool: the threads do not pile up per count."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch_cpu_blocks, "_pool", None)
    torch.set_num_threads(5)
    try:
        before = len(worker_threads())
        for rows in (8, 12, 16, 20, 8, 20):
            torch_cpu_blocks.run_blocks(lambda blocks: list(blocks), torch.zeros(rows, 5), 4)
        grown = len(worker_threads()) - before
    finally:
        torch.set_num_threads(threads)
    assert grown <= 5


def test_an_interrupt_while_the_pool_starts_leaves_no_worker_waiting(monkeypatch):
    """Ctrl-C while the caller waits for its workers to start: they are released, and end."""
    import threading

    class InterruptedBarrier(threading.Barrier):
        def wait(self, timeout: float | None = None) -> int:
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt
            return super().wait(timeout)

    threads = torch.get_num_threads()
    monkeypatch.setattr(torch_cpu_blocks, "_pool", None)
    monkeypatch.setattr(torch_cpu_blocks.threading, "Barrier", InterruptedBarrier)
    before = set(worker_threads())
    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            torch_cpu_blocks.run_blocks(lambda blocks: list(blocks), torch.zeros(8, 5), 4)
        caller = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    started = [thread for thread in worker_threads() if thread not in before]
    for thread in started:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in started)
    assert caller == 2


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inference_mode_over_many_blocks_gives_the_loss_of_no_grad(monkeypatch, reduction):
    """The workers write the caller's outputs, inference tensors under inference mode."""
    monkeypatch.setattr(torch_cpu, "BLOCK_ELEMENTS", 3 * 37)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        logits, targets, mask = float32_inputs(9, (41, 37))
        with torch.no_grad():
            expected = masked_soft_cross_entropy(logits, targets, mask, reduction=reduction)
        with torch.inference_mode():
            loss = masked_soft_cross_entropy(logits, targets, mask, reduction=reduction)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def resident_pages(tensor: Any) -> int:
    """How many of the pages holding ``tensor``'s memory are mapped (Linux ``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    stop = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    pages = -(-(stop - start) // page)
    vector = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), vector) == 0
    return sum(entry & 1 for entry in vector)


def populate_write_works() -> bool:
    """Whether this kernel maps pages on ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+)."""
    if not sys.platform.startswith("linux"):
        return False
    region = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    works = libc.madvise(address, 4 * mmap.PAGESIZE, torch_cpu_blocks.MADV_POPULATE_WRITE) == 0
    del address
    return works


@pytest.mark.skipif(not populate_write_works(), reason="needs Linux 5.14 or later")
def test_populate_maps_the_pages_of_a_fresh_block():
    """The pages of a block of a fresh output are mapped by one system call before its first
    write (and before its first read, as ``mincore`` shows), not faulted in one by one."""
    # 78 MiB: above the C library's largest threshold for memory mapped afresh (32 MiB).
    fresh = torch.empty(600, 32_000)
    block = fresh[16:48]
    before = resident_pages(block)

    torch_cpu_blocks.populate(block)

    interior_pages = block.numel() * block.element_size() // mmap.PAGESIZE - 1
    assert before == 0 and resident_pages(block) >= interior_pages
    assert resident_pages(fresh[48:]) < resident_pages(block)  # rows outside stay as they were


def test_populate_keeps_the_values():
    values = torch.randn(5, 100_000)
    expected = values.clone()

    torch_cpu_blocks.populate(values[1:4])

    assert torch.equal(values, expected)


# --------------------------------------------------------------------------------------------
# No private aten operator
# --------------------------------------------------------------------------------------------


def private_aten_calls(run: Callable[[], Any], directory: Path) -> set[str]:
    """Private aten operators (``aten::_name``) that code in ``directory`` calls during ``run()``.

    Calls are seen with a profile hook: through ``torch.ops.aten`` (an ``OpOverload`` or its
    packet) and through torch functions and tensor methods that bind an aten operator. The
    package's custom operators run their Python code in this thread, so they are seen too.
    """
    found: set[str] = set()
    ours = str(directory)

    def private_aten(name: str) -> bool:
        return (
            name.startswith("_")
            and not name.startswith("__")
            and bool(torch._C._jit_get_schemas_for_operator(f"aten::{name}"))
        )

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "__call__":
            op = frame.f_locals.get("self")
            caller = frame.f_back
            if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and (
                caller is not None and caller.f_code.co_filename.startswith(ours)
            ):
                namespace, _, name = str(op).partition(".")
                if namespace == "aten" and private_aten(name.partition(".")[0]):
                    found.add(str(op))
        elif event == "c_call" and frame.f_code.co_filename.startswith(ours):
            name = getattr(arg, "__name__", "")
            if private_aten(name):
                found.add(name)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return found


def test_the_private_operator_detector_finds_private_calls():
    z = torch.randn(3, 5)

    def calls_private_operators() -> None:
        torch.ops.aten._softmax.out(z, -1, False, out=torch.empty_like(z))
        torch._softmax(z, -1, False)
        torch.softmax(z, -1)

    found = private_aten_calls(calls_private_operators, Path(__file__).parent)

    assert found == {"aten._softmax.out", "_softmax"}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_the_eager_path_calls_no_private_aten_operator(reduction):
    logits, targets = leaves(*float32_inputs(2)[:2])
    mask = float32_inputs(2)[2]
    loss = loss_of(reduction, mask)

    def forward_backward_and_double_backward() -> None:
        value = loss(logits, targets).sum()
        (grad_logits,) = torch.autograd.grad(value, logits, create_graph=True)
        (value + grad_logits.square().sum()).backward()
        softce_multi.masked_soft_cross_entropy_with_grad(
            logits.detach(), targets.detach(), mask, reduction="sum"
        )

    package = Path(softce_multi.__file__).parent
    assert private_aten_calls(forward_backward_and_double_backward, package) == set()


# --------------------------------------------------------------------------------------------
# Saved tensors
# --------------------------------------------------------------------------------------------


def test_saved_tensor_hooks_see_the_gradient_made_in_forward():
    # A hook that doubles the one saved [N, V] tensor that is not an input doubles the logits
    # gradient: backward uses what save_for_backward stored, not a private copy.
    logits, targets, mask = float32_inputs(3)
    (logits,) = leaves(logits)
    expected = reference_gradient(logits, targets, mask)
    packed: list[Any] = []

    def pack(tensor: Any) -> Any:
        is_buffer = tensor.shape == logits.shape and tensor is not logits and tensor is not targets
        packed.append(is_buffer)
        return (tensor, is_buffer)

    def unpack(saved: tuple[Any, bool]) -> Any:
        tensor, is_buffer = saved
        return 2 * tensor if is_buffer else tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = masked_soft_cross_entropy(logits, targets, mask)
    loss.backward()

    assert packed.count(True) == 1
    assert_gradient_close(logits.grad, 2 * expected, "float32")


def reference_gradient(logits: Any, targets: Any, mask: Any, **options: Any) -> np.ndarray:
    """The float64 reference gradient to the logits."""
    (z,) = leaves(logits.double())
    reference.masked_soft_cross_entropy(z, targets.double(), mask, **options).sum().backward()
    return z.grad.numpy()


def test_a_unit_upstream_receives_the_saved_buffer_itself():
    # Eagerly on the CPU, a unit upstream gradient needs no pass over the buffer, when no later
    # backward pass (retain_graph) could hand the same buffer out again.
    logits, targets, mask = float32_inputs(4)
    (logits,) = leaves(logits)
    saved: list[Any] = []

    def pack(tensor: Any) -> Any:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = masked_soft_cross_entropy(logits, targets, mask)
    (scaled,) = torch.autograd.grad(loss, logits, torch.tensor(2.0), retain_graph=True)
    (unit,) = torch.autograd.grad(loss, logits)

    assert any(tensor is unit for tensor in saved)
    assert all(tensor is not scaled for tensor in saved)
    torch.testing.assert_close(scaled, 2 * unit, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_checkpoint_gives_the_same_gradients(reduction):
    logits, targets, mask = float32_inputs(5)
    loss = loss_of(reduction, mask)
    plain_logits, plain_targets = leaves(logits, targets)
    checkpointed_logits, checkpointed_targets = leaves(logits, targets)

    loss(plain_logits, plain_targets).sum().backward()
    torch.utils.checkpoint.checkpoint(
        loss, checkpointed_logits, checkpointed_targets, use_reentrant=False
    ).sum().backward()

    torch.testing.assert_close(checkpointed_logits.grad, plain_logits.grad, rtol=0, atol=0)
    torch.testing.assert_close(checkpointed_targets.grad, plain_targets.grad, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Higher derivatives
# --------------------------------------------------------------------------------------------

#: num_valid only exists for "mean".
REDUCTION_CASES = {
    "mean": ("mean", {}),
    "mean, num_valid": ("mean", {"num_valid": 4.0}),
    "sum": ("sum", {}),
    "none": ("none", {}),
}


@pytest.mark.parametrize(("reduction", "options"), REDUCTION_CASES.values(), ids=REDUCTION_CASES)
def test_hessian_matches_the_reference(reduction, options):
    logits, targets, mask = float64_inputs(6)

    hessian = torch.autograd.functional.hessian(
        summed(loss_of(reduction, mask, **options)), (logits, targets)
    )
    expected = torch.autograd.functional.hessian(
        summed(reference_of(reduction, mask, **options)), (logits, targets)
    )

    for row, expected_row in zip(hessian, expected, strict=True):
        for block, expected_block in zip(row, expected_row, strict=True):
            torch.testing.assert_close(block, expected_block, **FLOAT64_TOL)
    assert expected[0][0].abs().max() > 0.01  # the logits block is not trivially zero


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_gradient_penalty_keeps_its_term(reduction):
    logits, targets, mask = float64_inputs(7)

    def penalised(loss: Callable[[Any, Any], Any]) -> tuple[Any, Any]:
        z, p = leaves(logits, targets)
        value = loss(z, p).sum()
        (grad_z,) = torch.autograd.grad(value, z, create_graph=True)
        (value + grad_z.square().sum()).backward()
        return z.grad, p.grad

    actual = penalised(loss_of(reduction, mask))
    expected = penalised(reference_of(reduction, mask))

    for gradient, expected_gradient in zip(actual, expected, strict=True):
        torch.testing.assert_close(gradient, expected_gradient, **FLOAT64_TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_an_upstream_gradient_that_requires_grad_is_differentiated(reduction):
    logits, targets, mask = float64_inputs(8)
    positions = SHAPE[:-1] if reduction == "none" else ()
    upstream_values = torch.linspace(-1.0, 2.0, int(np.prod(positions))).reshape(positions)

    def derivative_to_upstream(loss: Callable[[Any, Any], Any]) -> Any:
        z, p, upstream = leaves(logits, targets, upstream_values.double())
        grads = torch.autograd.grad(loss(z, p), (z, p), upstream, create_graph=True)
        (sum(grad.sin().sum() for grad in grads)).backward()
        return upstream.grad

    actual = derivative_to_upstream(loss_of(reduction, mask))
    expected = derivative_to_upstream(reference_of(reduction, mask))

    torch.testing.assert_close(actual, expected, **FLOAT64_TOL)
    assert expected.abs().max() > 0


def test_padding_gets_exactly_zero_derivatives_of_every_order():
    # Rows of weight 0 hold NaN and inf; neither the gradient nor its derivative may see them.
    logits, targets, mask = float64_inputs(9)
    padding = mask == 0
    logits[padding], targets[padding] = torch.nan, torch.inf
    z, p = leaves(logits, targets)

    value = masked_soft_cross_entropy(z, p, mask).sum()
    grad_z, grad_p = torch.autograd.grad(value, (z, p), create_graph=True)
    (grad_z.square().sum() + grad_p.square().sum()).backward()

    for tensor in (grad_z, grad_p, z.grad, p.grad):
        assert torch.isfinite(tensor).all()
        assert (tensor[padding] == 0).all()


@pytest.mark.parametrize(("reduction", "options"), REDUCTION_CASES.values(), ids=REDUCTION_CASES)
def test_a_differentiable_backward_gives_the_plain_backward_values(reduction, options):
    logits, targets, mask = float64_inputs(10)
    loss = summed(loss_of(reduction, mask, **options))

    z, p = leaves(logits, targets)
    plain = torch.autograd.grad(loss(z, p), (z, p))
    differentiable = torch.autograd.grad(loss(z, p), (z, p), create_graph=True)

    for actual, expected in zip(differentiable, plain, strict=True):
        assert actual.requires_grad
        torch.testing.assert_close(actual, expected, **FLOAT64_TOL)


# --------------------------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reduction", "options"), REDUCTION_CASES.values(), ids=REDUCTION_CASES)
def test_func_grad_equals_autograd(reduction, options):
    logits, targets, mask = float64_inputs(11)
    loss = summed(loss_of(reduction, mask, **options))

    func_grads = torch.func.grad(loss, argnums=(0, 1))(logits, targets)
    z, p = leaves(logits, targets)
    autograd_grads = torch.autograd.grad(loss(z, p), (z, p))

    for actual, expected in zip(func_grads, autograd_grads, strict=True):
        torch.testing.assert_close(actual, expected, **FLOAT64_TOL)


def test_func_jacrev_of_grad_equals_the_reference_hessian():
    logits, targets, mask = float64_inputs(12)

    def hessian(loss: Callable[[Any, Any], Any]) -> Any:
        return torch.func.jacrev(torch.func.grad(lambda z: loss(z, targets)))(logits)

    torch.testing.assert_close(
        hessian(loss_of("mean", mask)), hessian(reference_of("mean", mask)), **FLOAT64_TOL
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_func_vmap_equals_a_loop_over_the_batch(reduction):
    logits, targets, mask = float64_inputs(13, (4, *SHAPE))

    def loss(z: Any, p: Any, w: Any) -> Any:
        return masked_soft_cross_entropy(z, p, w, reduction=reduction)

    batched = torch.func.vmap(loss)(logits, targets, mask)
    looped = torch.stack([loss(*example) for example in zip(logits, targets, mask, strict=True)])

    torch.testing.assert_close(batched, looped, **FLOAT64_TOL)


def test_func_vmap_of_grad_equals_a_loop_over_the_batch():
    logits, targets, mask = float64_inputs(14, (4, *SHAPE))
    grad = torch.func.grad(summed(lambda z, p, w: masked_soft_cross_entropy(z, p, w)))

    # The targets are shared: one argument without a batch axis.
    batched = torch.func.vmap(grad, in_dims=(0, None, 0))(logits, targets[0], mask)
    looped = torch.stack([grad(z, targets[0], w) for z, w in zip(logits, mask, strict=True)])

    torch.testing.assert_close(batched, looped, **FLOAT64_TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inference_mode_gives_the_loss_of_grad_mode(reduction):
    logits, targets, mask = float32_inputs(22)
    loss = loss_of(reduction, mask)
    (z,) = leaves(logits)
    expected = loss(z, targets)

    with torch.inference_mode():
        actual = loss(z, targets)

    assert actual.is_inference()
    torch.testing.assert_close(actual, expected.detach(), rtol=0, atol=0)


def forward_mode_case(name: str) -> tuple[Callable[[Any], Any], Any]:
    """A loss as a function of one tensor, and that tensor: of the logits for the loss of
    logits, of the weight for the linear loss."""
    logits, targets, mask = float64_inputs(21)
    if name == "masked_soft_cross_entropy":
        return (lambda z: masked_soft_cross_entropy(z, targets, mask)), logits
    hidden = logits[..., :4]
    weight = logits[0, :, :4].new_ones((SHAPE[-1], 4))

    def linear(w: Any) -> Any:
        return softce_multi.linear_masked_soft_cross_entropy(hidden, w, targets, mask)

    return linear, weight


@pytest.mark.parametrize("name", ["masked_soft_cross_entropy", "linear_masked_soft_cross_entropy"])
def test_forward_mode_differentiation_is_refused_by_name(name):
    # A custom jvp would make Dynamo break the graph, so forward mode (jvp, jacfwd,
    # torch.func.hessian) is left out; the loss says so, and names reverse mode, rather than
    # giving a wrong tangent.
    loss, x = forward_mode_case(name)
    refused = rf"softce_multi's {name} has no forward-mode derivative \(jvp\).*reverse mode"

    with pytest.raises(NotImplementedError, match=refused):
        torch.func.jvp(loss, (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match=refused):
        torch.func.hessian(loss)(x)
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match=refused):
        loss(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("name", ["masked_soft_cross_entropy", "linear_masked_soft_cross_entropy"])
def test_a_loss_that_a_jvp_does_not_differentiate_runs_under_it(name):
    loss, x = forward_mode_case(name)
    scale = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)

    def scaled(s: Any) -> Any:
        return s * loss(x)

    value, tangent = torch.func.jvp(scaled, (scale,), (torch.ones_like(scale),))

    torch.testing.assert_close(value, scale * loss(x))
    torch.testing.assert_close(tangent, loss(x).expand(3))


def test_batched_upstream_gradients_equal_a_loop():
    # is_grads_batched runs backward under vmap: the upstream has no single value to test.
    logits, targets, mask = float32_inputs(15)
    (z,) = leaves(logits)
    loss = masked_soft_cross_entropy(z, targets, mask)
    upstreams = torch.tensor([1.0, 2.0, -0.5])

    (batched,) = torch.autograd.grad(loss, z, upstreams, retain_graph=True, is_grads_batched=True)
    looped = [
        torch.autograd.grad(loss, z, upstream, retain_graph=True)[0] for upstream in upstreams
    ]

    torch.testing.assert_close(batched, torch.stack(looped))


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


class DraftHead(torch.nn.Module):
    """A linear head over hidden states, trained with a loss criterion (a training step)."""

    def __init__(self, criterion: Callable[..., Any], hidden: int = 8, vocab: int = 33) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(hidden, vocab)
        self.criterion = criterion

    def forward(self, hidden: Any, targets: Any, mask: Any) -> Any:
        return self.criterion(self.head(hidden), targets, mask, num_valid=mask.sum())


def loss_function(logits: Any, targets: Any, mask: Any, *, num_valid: Any) -> Any:
    return masked_soft_cross_entropy(logits, targets, mask, num_valid=num_valid)


CRITERIA = {"function": loss_function, "module": MaskedSoftCrossEntropy()}


def training_inputs(seed: int) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    hidden = torch.tensor(rng.standard_normal((2, 5, 8)), dtype=torch.float32)
    targets = torch.tensor(random_targets(rng, (2, 5, 33)), dtype=torch.float32)
    mask = torch.tensor(random_mask(rng, (2, 5)))
    return hidden, targets, mask


def train_once(model: DraftHead, inputs: tuple[Any, Any, Any]) -> tuple[Any, list[Any]]:
    """One forward and backward pass; the loss and the parameters' gradients."""
    model.zero_grad()
    loss = model(*inputs)
    loss.backward()
    return loss.detach(), [parameter.grad.clone() for parameter in model.parameters()]


def assert_same_training_step(compiled: DraftHead, eager: DraftHead, seed: int) -> None:
    inputs = training_inputs(seed)
    compiled_loss, compiled_grads = train_once(compiled, inputs)
    eager_loss, eager_grads = train_once(eager, inputs)

    assert_loss_close(compiled_loss, to_float64(eager_loss), "float32")
    for grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        assert_gradient_close(grad, to_float64(eager_grad), "float32")


@pytest.mark.parametrize("criterion", CRITERIA.values(), ids=CRITERIA.keys())
def test_aot_eager_training_step_equals_eager(criterion):
    torch._dynamo.reset()
    model = DraftHead(criterion)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    assert_same_training_step(compiled, model, seed=16)
    assert_same_training_step(compiled, model, seed=17)  # a second step reuses the graph


def test_inductor_training_step_equals_eager():
    # Inductor's code generation takes tens of seconds on a 2-core machine: one case.
    torch._dynamo.reset()
    model = DraftHead(MaskedSoftCrossEntropy())
    compiled = torch.compile(model, backend="inductor", fullgraph=True)

    assert_same_training_step(compiled, model, seed=18)


@pytest.mark.parametrize("criterion", CRITERIA.values(), ids=CRITERIA.keys())
def test_dynamo_finds_no_graph_break(criterion):
    torch._dynamo.reset()
    model = DraftHead(criterion)

    explanation = torch._dynamo.explain(model)(*training_inputs(19))

    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("counts", [(6, 8, 10), (6.0, 7.5, 9.0)], ids=["int", "float"])
def test_a_num_valid_that_changes_between_calls_compiles_without_a_graph_break(counts):
    """Dynamo makes a number that changes between calls symbolic (a ``SymInt``): the loss
    takes it in one graph, as SpecForge's ``num_valid=batch * seq`` needs."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_function, backend="aot_eager", fullgraph=True)
    logits, targets, mask = float32_inputs(5)

    for count in counts:
        got = compiled(logits, targets, mask, num_valid=count)
        want = loss_function(logits, targets, mask, num_valid=count)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def logits_loss_of_hidden(hidden: Any, weight: Any, targets: Any, mask: Any, count: Any) -> Any:
    return masked_soft_cross_entropy(hidden @ weight.T, targets, mask, num_valid=count)


def linear_loss_of_hidden(hidden: Any, weight: Any, targets: Any, mask: Any, count: Any) -> Any:
    return softce_multi.linear_masked_soft_cross_entropy(
        hidden, weight, targets, mask, num_valid=count
    )


NUMBERED_LOSSES = {"logits": logits_loss_of_hidden, "linear": linear_loss_of_hidden}


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic dynamic", "dynamic"])
@pytest.mark.parametrize("kind", [int, float], ids=["int", "float"])
@pytest.mark.parametrize("loss", NUMBERED_LOSSES.values(), ids=NUMBERED_LOSSES.keys())
def test_a_python_number_num_valid_compiles_into_one_graph_for_every_value(loss, kind, dynamic):
    """EAGLE/SpecForge's ``num_valid=batch * seq`` changes with the padded length: past the
    first value, Dynamo makes it symbolic, and every later value reuses that graph (a graph per
    value would stop ``fullgraph=True`` at Dynamo's recompile limit of 8)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter, fullgraph=True, dynamic=dynamic)
    rng = np.random.default_rng(29)
    weight = torch.tensor(rng.standard_normal((11, 4)), dtype=torch.float32)
    targets = torch.tensor(random_targets(rng, (6, 11)), dtype=torch.float32)
    mask = torch.tensor(random_mask(rng, (6,)))

    for step in range(12):
        count = kind(10 + step) if kind is int else 10.25 + step
        hidden = torch.tensor(rng.standard_normal((6, 4)), dtype=torch.float32)
        eager_hidden, compiled_hidden = leaves(hidden, hidden)
        eager = loss(eager_hidden, weight, targets, mask, count)
        got = compiled(compiled_hidden, weight, targets, mask, count)
        eager.backward()
        got.backward()

        torch.testing.assert_close(got, eager, rtol=0, atol=0)
        torch.testing.assert_close(compiled_hidden.grad, eager_hidden.grad, rtol=0, atol=0)
    assert counter.frame_count <= 2


def weight_losses() -> dict[str, Callable[[Any], Any]]:
    """Losses as functions of the weight of a head, which goes into them as it is."""
    rng = np.random.default_rng(31)
    hidden = torch.tensor(rng.standard_normal((2, 3, 4)))
    targets = torch.tensor(random_targets(rng, (2, 3, 7)))
    mask = torch.tensor(random_mask(rng, (2, 3)))
    head = LinearLossHead()
    return {
        "logits": lambda logits: masked_soft_cross_entropy(logits, targets, mask),
        "linear": lambda weight: softce_multi.linear_masked_soft_cross_entropy(
            hidden, weight, targets, mask
        ),
        "functional_call": lambda weight: torch.func.functional_call(
            head, {"weight": weight}, (hidden, targets, mask)
        ),
    }


class LinearLossHead(torch.nn.Module):
    """The linear loss over a head's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(7, 4, dtype=torch.float64))

    def forward(self, hidden: Any, targets: Any, mask: Any) -> Any:
        return softce_multi.linear_masked_soft_cross_entropy(hidden, self.weight, targets, mask)


@pytest.mark.skipif(
    TORCH_RELEASE < (2, 13),
    reason="Dynamo before torch 2.13 refuses torch.func.grad through the losses' autograd "
    "functions with torch's setup_context error (documented in kernels.rst)",
)
@pytest.mark.parametrize("name", ["logits", "linear", "functional_call"])
def test_compiled_func_grad_equals_eager_func_grad(name):
    # torch.func.grad makes its argument require grad after Dynamo has seen it; handed to the
    # autograd function as it is, Dynamo inlined the function (a zero gradient, or an error).
    torch._dynamo.reset()
    loss = weight_losses()[name]
    x = torch.tensor(
        np.random.default_rng(32).standard_normal((2, 3, 7) if name == "logits" else (7, 4))
    )

    eager = torch.func.grad(loss)(x)
    compiled = torch.compile(torch.func.grad(loss), backend="aot_eager", fullgraph=True)(x)

    assert eager.abs().sum() > 0
    torch.testing.assert_close(compiled, eager, **FLOAT64_TOL)


def test_compiled_backward_scales_the_gradient_made_in_forward():
    # For "mean", the forward graph computes the logits gradient with the loss, and the backward
    # graph only multiplies it by the upstream gradient: no gradient operator runs there.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, Any] = {}

    def keep(name: str) -> Callable[..., Any]:
        def compiler(graph: Any, example_inputs: Any) -> Any:
            graphs[name] = graph
            return make_boxed_func(graph.forward)

        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    model = DraftHead(MaskedSoftCrossEntropy())
    train_once(torch.compile(model, backend=backend, fullgraph=True), training_inputs(20))

    def targets_of(graph: Any) -> list[str]:
        return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]

    assert "softce_multi.torch_row_routine.default" in targets_of(graphs["forward"])
    assert not any("softce_multi" in target for target in targets_of(graphs["backward"]))
