"""Speed and memory against the peers, on the same inputs, in one run.

torch, on ``[1, S, V]`` bf16 logits with bf16 targets (as NeMo's benchmark makes them) and with
float32 targets: softce_multi, NeMo AutoModel's Triton kernel, NeMo's PyTorch formula plain and
under ``torch.compile``, and ``F.cross_entropy`` with probabilities. JAX: softce_multi through
the Pallas kernels and through XLA alone, against optax under ``jax.jit``.

Each row is a forward plus backward: its median time (device events on CUDA), its extra peak
memory in logits gradients, the bytes any implementation must move (read the logits and the
targets, write the logits gradient) over its time, and that bandwidth as a fraction of a
device-to-device copy's measured in the same run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from softce_multi._cli.bench.cases import (
    _nemo_formula,
    _softce_torch,
    _torch_cross_entropy,
    _torch_step,
    nemo_formula,
)
from softce_multi._cli.bench.measure import ITEMSIZE, MIB
from softce_multi._cli.bench.modes import KERNEL_MODES, _mode_step, mode_floor_bytes
from softce_multi._cli.device_check.plan import (
    Plan,
    Record,
    extra_peak_bytes,
    failure_recorded,
    free_device_memory,
    kernels_as_on_a_gpu,
    median_seconds,
    wall_median,
    xla_only,
)

NEMO_KERNEL = "NeMo Triton kernel"
PALLAS, XLA = "softce_multi[jax, Pallas]", "softce_multi[jax, XLA]"
TARGET_DTYPES = ("bfloat16", "float32")


def copy_bandwidth(plan: Plan, device: str) -> dict[str, Any]:
    """The device-to-device copy of ``plan.copy_bytes`` random bytes: bytes read plus written
    over its median time."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    source = torch.randint(
        0, 256, (plan.copy_bytes,), dtype=torch.uint8, device=device, generator=generator
    )
    destination = torch.empty_like(source)
    seconds = median_seconds(lambda: destination.copy_(source), device=device)
    return {
        "bytes": 2 * plan.copy_bytes,
        "median_s": seconds,
        "gb_per_s": 2 * plan.copy_bytes / seconds / 1e9,
    }


def _nemo_kernel(device: str) -> Callable[[Any, Any, Any], Any]:
    """NeMo AutoModel's fused Triton kernel; it writes the gradient over the logits."""
    from nemo_automodel.components.loss.triton.soft_cross_entropy import fused_soft_cross_entropy

    return _torch_step(fused_soft_cross_entropy)


def _compiled_formula(device: str) -> Callable[[Any, Any, Any], Any]:
    """NeMo's PyTorch formula under ``torch.compile`` (one compilation per shape and dtypes)."""
    import torch

    return _torch_step(torch.compile(nemo_formula, dynamic=False))


#: An EAGLE-3 step weight (0.8 / 2.44) as the upstream gradient of the loss.
STEP_WEIGHT = 0.8 / 2.44


def _softce_torch_weighted(device: str) -> Callable[[Any, Any, Any], Any]:
    """softce_multi's loss times :data:`STEP_WEIGHT`: with bf16 logits its backward pass
    computes the gradient again with the upstream inside, where an upstream of 1 hands over the
    forward kernel's (``rewrite_for_upstream_``)."""
    import softce_multi

    def weighted(logits: Any, target: Any, mask: Any) -> Any:
        return softce_multi.masked_soft_cross_entropy(logits, target, mask) * STEP_WEIGHT

    return _torch_step(weighted)


TORCH_IMPLEMENTATIONS: dict[str, tuple[Callable[[str], Any], str | None]] = {
    "softce_multi[torch]": (_softce_torch, None),
    "softce_multi[torch], upstream 0.33": (_softce_torch_weighted, None),
    NEMO_KERNEL: (_nemo_kernel, "nemo_automodel"),
    "NeMo formula[torch]": (_nemo_formula, None),
    "F.cross_entropy[torch]": (_torch_cross_entropy, None),
    "NeMo formula[torch.compile]": (_compiled_formula, None),
}
"""Each torch implementation: its step's factory and the library it needs beyond torch, in the
order they run: the goals' pair first, the compilations (the slowest to start) last. NeMo's
kernel gets a copy of the logits, since it writes its gradient over them."""
WRITES_OVER_LOGITS = frozenset({NEMO_KERNEL})


def _torch_inputs(
    shape: tuple[int, ...], targets_dtype: str, device: str, seed: int
) -> tuple[Any, ...]:
    """bf16 logits, softmax targets of ``targets_dtype`` and a ``[..., 1]`` mask (80% valid),
    drawn on the device."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    targets = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    targets = torch.softmax(targets, dim=-1, dtype=getattr(torch, targets_dtype))
    mask = torch.rand((*shape[:-1], 1), generator=generator, device=device) < 0.8
    return logits, targets, mask


def _row(
    implementation: str,
    shape: tuple[int, ...],
    targets_dtype: str,
    seconds: float,
    extra: int | None,
    valid_rows: int,
) -> dict[str, Any]:
    """The record of one measurement. Its byte floor reads the logits and targets of the
    ``valid_rows`` rows the mask keeps (a padding row's gradient is 0 whatever it holds) and
    writes the bf16 gradient of every row."""
    count = shape[-2] * shape[-1]
    read = valid_rows * shape[-1] * (ITEMSIZE["bfloat16"] + ITEMSIZE[targets_dtype])
    floor = read + count * ITEMSIZE["bfloat16"]
    gb_per_s = floor / seconds / 1e9
    return {
        "implementation": implementation,
        "dtype": "bfloat16",
        "targets_dtype": targets_dtype,
        "length": shape[-2],
        "vocab": shape[-1],
        "panel": f"bf16 logits, {targets_dtype} targets, V={shape[-1]}",
        "median_s": seconds,
        "extra_peak_mib": None if extra is None else extra / MIB,
        "extra_peak_in_grads": None if extra is None else extra / (count * ITEMSIZE["bfloat16"]),
        "floor_bytes": floor,
        "floor_gb_per_s": gb_per_s,
    }


def torch_speed(
    plan: Plan,
    device: str,
    dry_run: bool,
    installed: Callable[[str], bool],
    record: Record,
) -> None:
    """Record the row of each torch implementation (``"speed"``) as it is measured, and those
    skipped (``"skipped"``), with why."""
    with kernels_as_on_a_gpu(dry_run):
        for index, (shape, targets_dtype) in enumerate(
            (shape, targets_dtype) for shape in plan.speed_shapes for targets_dtype in TARGET_DTYPES
        ):
            inputs = _torch_inputs(shape, targets_dtype, device, seed=700 + index)
            valid_rows = int(inputs[2].sum())
            for name, (make, library) in TORCH_IMPLEMENTATIONS.items():
                if library is not None and not installed(library):
                    reason = f"{library} is not installed"
                    record("skipped", [{"implementation": name, "reason": reason}])
                    continue
                where = {"shape": list(shape), "targets_dtype": targets_dtype}
                with failure_recorded(record, name, **where):
                    step = make(device)
                    arguments = inputs
                    if name in WRITES_OVER_LOGITS:
                        arguments = (inputs[0].clone(), *inputs[1:])
                    start = time.perf_counter()
                    step(*arguments)
                    first_call = time.perf_counter() - start
                    call = functools.partial(step, *arguments)
                    seconds = median_seconds(call, device=device)
                    extra = extra_peak_bytes(call, device=device)
                    row = _row(name, shape, targets_dtype, seconds, extra, valid_rows)
                    record("speed", [{**row, "first_call_s": first_call}])
                free_device_memory(device)
            del inputs
            free_device_memory(device)


#: The chunk sizes (vocabulary entries per step of a row's sweep) at which the fused forward
#: is also timed: the default and two longer ones, each with its own warps (``launch_config``).
#: Fewer programs fit an SM with longer chunks, so fewer rows are in flight and more of the
#: second sweep's reads may come from L2.
BLOCK_SIZES = (4096, 8192, 16384)


def kernel_modes(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
    """Record each of ``bench``'s kernel modes (forward only, with the gradient, each backward)
    at the headline shape, bf16 logits and float32 targets, every position valid (so that each
    mode moves exactly its floor), and the fused forward of the Triton kernels at each of
    :data:`BLOCK_SIZES` (``"kernel_modes"``): its median time and the bytes it must move (its
    floor) over that time."""
    import array_api_compat.torch as torch_namespace
    import torch

    from softce_multi import _core, kernels

    shape = headline_shape(plan)
    logits, targets, mask = _torch_inputs(shape, "float32", device, seed=750)
    mask = torch.ones_like(mask)
    with kernels_as_on_a_gpu(dry_run):
        for name, mode in KERNEL_MODES.items():
            seconds = median_seconds(_mode_step(mode, logits, targets, mask), device=device)
            _record_mode(record, name, shape, seconds, mode_floor_bytes(name, shape, "bfloat16"))
            free_device_memory(device)
        from softce_multi.kernels import triton as triton_kernels

        rows = _core.as_rows(
            logits, targets, mask, reduction="mean", num_valid=None, xp=torch_namespace
        )
        floor = mode_floor_bytes("forward+gradient", shape, "bfloat16")
        for block in BLOCK_SIZES:
            warps = kernels.launch_config(shape[-1], block)[1]
            name = f"forward+gradient, {block} per step, {warps} warps"
            with failure_recorded(record, name, shape=list(shape)):
                step = functools.partial(
                    triton_kernels.row_routine, rows, with_logits_grad=True, block_size=block
                )
                _record_mode(record, name, shape, median_seconds(step, device=device), floor)
            free_device_memory(device)


def _record_mode(
    record: Record, name: str, shape: tuple[int, ...], seconds: float, floor: int
) -> None:
    row = {"mode": name, "shape": list(shape), "median_s": seconds, "floor_bytes": floor}
    record("kernel_modes", [{**row, "floor_gb_per_s": floor / seconds / 1e9}])


def headline_shape(plan: Plan) -> tuple[int, ...]:
    """The speed shape the goals are judged at: the longest sequence at the smallest
    vocabulary (``[1, 32768, 32000]`` on the GPU)."""
    return max(plan.speed_shapes, key=lambda shape: (shape[-2], -shape[-1]))


def add_ratios(rows: list[dict[str, Any]], copy_gb_per_s: float | None) -> None:
    """Set each row's time over NeMo's kernel's on the same inputs (``time_vs_nemo``) and its
    bandwidth over the copy's (``copy_fraction``); None where either was not measured."""
    nemo = {
        (row["length"], row["vocab"], row["targets_dtype"]): row["median_s"]
        for row in rows
        if row["implementation"] == NEMO_KERNEL
    }
    for row in rows:
        baseline = nemo.get((row["length"], row["vocab"], row["targets_dtype"]))
        row["time_vs_nemo"] = None if baseline is None else row["median_s"] / baseline
        row["copy_fraction"] = (
            None if copy_gb_per_s is None else row["floor_gb_per_s"] / copy_gb_per_s
        )


def add_copy_fractions(rows: list[dict[str, Any]], copy_gb_per_s: float | None) -> None:
    """Set each kernel mode's bandwidth over the copy's (``copy_fraction``)."""
    for row in rows:
        row["copy_fraction"] = (
            None if copy_gb_per_s is None else row["floor_gb_per_s"] / copy_gb_per_s
        )


def jax_speed(
    plan: Plan,
    device: str,
    dry_run: bool,
    installed: Callable[[str], bool],
    record: Record,
) -> None:
    """Record the rows (``"speed"``) of softce_multi through Pallas and through XLA, and of
    optax under ``jax.jit``; memory is XLA's temporaries of the compiled step."""
    import jax
    import jax.numpy as jnp

    from softce_multi._cli.bench.cases import _optax_loss, _softce_jax

    engines: dict[str, tuple[Callable[[str], Any], Any]] = {
        PALLAS: (_softce_jax, lambda: kernels_as_on_a_gpu(dry_run)),
        XLA: (_softce_jax, xla_only),
    }
    if installed("optax"):
        engines["optax[jax.jit]"] = (_optax_loss, xla_only)
    else:
        record(
            "skipped", [{"implementation": "optax[jax.jit]", "reason": "optax is not installed"}]
        )
    for index, (shape, targets_dtype) in enumerate(
        (shape, targets_dtype) for shape in plan.speed_shapes for targets_dtype in TARGET_DTYPES
    ):
        keys = jax.random.split(jax.random.key(index), 3)
        logits = jax.random.normal(keys[0], shape, jnp.bfloat16)
        targets = jax.nn.softmax(jax.random.normal(keys[1], shape, jnp.float32), axis=-1)
        targets = targets.astype(getattr(jnp, targets_dtype))
        mask = jax.random.uniform(keys[2], (*shape[:-1], 1)) < 0.8
        inputs = (logits, targets, mask)
        valid_rows = int(mask.sum())
        for name, (make, context) in engines.items():
            where = {"shape": list(shape), "targets_dtype": targets_dtype}
            with failure_recorded(record, name, **where), context():
                step = make("gpu")
                seconds = wall_median(functools.partial(step, *inputs), repeats=10)
                extra = step.temp_bytes(*inputs)
                record("speed", [_row(name, shape, targets_dtype, seconds, extra, valid_rows)])
        del logits, targets, mask, inputs
