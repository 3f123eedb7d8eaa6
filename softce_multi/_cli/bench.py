"""``python -m softce_multi bench``: time and peak memory of forward+backward against peers.

Each implementation is timed in the same process, interleaved with its peer of the same
framework, and the medians of several runs are reported together with their ratio, since
absolute times on a shared machine drift. The frameworks run one after the other: XLA's worker
threads keep spinning for a while after a call and would slow an interleaved PyTorch call.

Extra peak memory is, for PyTorch, the rise of the process's peak resident set (Linux
``VmHWM``) over its resident set before the call, measured in a fresh subprocess; for JAX,
whose allocator keeps freed memory, it is XLA's own count of the compiled step's temporaries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20


def _torch_inputs(shape: tuple[int, ...], dtype_name: str, seed: int) -> tuple[Any, Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    logits = torch.randn(shape, generator=generator).to(dtype)
    target = torch.softmax(torch.randn(shape, generator=generator), dim=-1)
    mask = torch.rand((*shape[:-1], 1), generator=generator) > 0.1
    return logits, target, mask


def _jax_inputs(shape: tuple[int, ...], dtype_name: str, seed: int) -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 3)
    logits = jax.random.normal(keys[0], shape).astype(getattr(jnp, dtype_name))
    target = jax.nn.softmax(jax.random.normal(keys[1], shape), axis=-1)
    mask = jax.random.uniform(keys[2], (*shape[:-1], 1)) > 0.1
    return logits, target, mask


def _torch_step(loss_fn: Callable[..., Any]) -> Callable[[Any, Any, Any], Any]:
    def step(logits: Any, target: Any, mask: Any) -> Any:
        leaf = logits.detach().requires_grad_(True)
        loss_fn(leaf, target, mask).backward()
        return leaf.grad

    return step


def _jax_step(loss_fn: Callable[..., Any]) -> Callable[[Any, Any, Any], Any]:
    import jax

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    def step(logits: Any, target: Any, mask: Any) -> Any:
        return jax.block_until_ready(grad_fn(logits, target, mask))

    def temp_bytes(logits: Any, target: Any, mask: Any) -> int:
        analysis = grad_fn.lower(logits, target, mask).compile().memory_analysis()
        if analysis is None:
            msg = "this JAX backend reports no memory analysis"
            raise RuntimeError(msg)
        return int(analysis.temp_size_in_bytes)

    step.temp_bytes = temp_bytes  # type: ignore[attr-defined]
    return step


def _plain_jax_loss(logits: Any, target: Any, mask: Any) -> Any:
    """The plain formula in JAX, differentiated by autodiff (the usual JAX training loss)."""
    import jax
    import jax.numpy as jnp

    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_position = -jnp.sum(target * log_probs, axis=-1)
    weights = jnp.reshape(mask, per_position.shape).astype(jnp.float32)
    return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _implementations() -> dict[str, tuple[str, Callable[[], Callable[..., Any]]]]:
    """Name -> (framework, factory of a forward+backward step)."""

    def ours_torch() -> Callable[..., Any]:
        import softce_multi

        return _torch_step(softce_multi.masked_soft_cross_entropy)

    def reference_torch() -> Callable[..., Any]:
        from softce_multi import reference

        return _torch_step(reference.masked_soft_cross_entropy)

    def ours_jax() -> Callable[..., Any]:
        from softce_multi.jax import masked_soft_cross_entropy

        return _jax_step(masked_soft_cross_entropy)

    def plain_jax() -> Callable[..., Any]:
        return _jax_step(_plain_jax_loss)

    return {
        "softce_multi[torch]": ("torch", ours_torch),
        "plain formula[torch]": ("torch", reference_torch),
        "softce_multi[jax.jit]": ("jax", ours_jax),
        "plain formula[jax.jit]": ("jax", plain_jax),
    }


def _inputs(framework: str, shape: tuple[int, ...], dtype: str, seed: int) -> tuple[Any, ...]:
    return (_torch_inputs if framework == "torch" else _jax_inputs)(shape, dtype, seed)


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    msg = f"{field} not found in /proc/self/status"
    raise RuntimeError(msg)


def peak_extra_memory(name: str, shape: tuple[int, ...], dtype: str, seed: int) -> int:
    """Bytes of extra peak memory of one forward+backward of ``name`` (see the module doc)."""
    framework, factory = _implementations()[name]
    step = factory()
    inputs = _inputs(framework, shape, dtype, seed)
    if framework == "jax":
        return int(step.temp_bytes(*inputs))  # type: ignore[attr-defined]
    step(*inputs)  # compile and warm up; its result is dropped before measuring
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _resident_kib("VmRSS")
    result = step(*inputs)
    peak = _resident_kib("VmHWM")
    del result
    return (peak - before) * 1024


def _measure_memory_in_subprocess(
    name: str, shape: tuple[int, ...], dtype: str, seed: int
) -> int | None:
    code = (
        "import json, sys; from softce_multi._cli.bench import peak_extra_memory; "
        f"print(json.dumps(peak_extra_memory({name!r}, {shape!r}, {dtype!r}, {seed})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def _available(framework: str) -> bool:
    try:
        __import__(framework)
    except ImportError:
        return False
    return True


def run(shape: tuple[int, ...], dtype: str, repeats: int, seed: int) -> list[dict[str, Any]]:
    """Time every available implementation, interleaved in rounds; return one row each."""
    chosen = {
        name: (framework, factory())
        for name, (framework, factory) in _implementations().items()
        if _available(framework)
    }
    times: dict[str, list[float]] = {name: [] for name in chosen}
    for framework in dict.fromkeys(fw for fw, _ in chosen.values()):
        inputs = _inputs(framework, shape, dtype, seed)
        steps = {name: step for name, (fw, step) in chosen.items() if fw == framework}
        for _round in range(repeats + 1):
            for name, step in steps.items():
                start = time.perf_counter()
                result = step(*inputs)
                elapsed = time.perf_counter() - start
                del result
                if _round > 0:  # the first round compiles and warms up
                    times[name].append(elapsed)
        del inputs
    grad_bytes = _grad_bytes(shape, dtype)
    rows = []
    for name in chosen:
        peer = name.replace("softce_multi", "plain formula")
        ratios = [p / o for p, o in zip(times[peer], times[name], strict=True)]
        memory = _measure_memory_in_subprocess(name, shape, dtype, seed)
        rows.append(
            {
                "implementation": name,
                "median_s": statistics.median(times[name]),
                "speedup_vs_plain": statistics.median(ratios),
                "extra_peak_mib": None if memory is None else memory / MIB,
                "extra_peak_in_grads": None if memory is None else memory / grad_bytes,
            }
        )
    return rows


def _grad_bytes(shape: tuple[int, ...], dtype: str) -> int:
    itemsize = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    count = 1
    for size in shape:
        count *= size
    return count * itemsize


def _format(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'implementation':<24} {'median s':>9} {'speedup':>8} {'extra MiB':>10} {'x grad':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        memory = "n/a" if row["extra_peak_mib"] is None else f"{row['extra_peak_mib']:.0f}"
        grads = "n/a" if row["extra_peak_in_grads"] is None else f"{row['extra_peak_in_grads']:.2f}"
        lines.append(
            f"{row['implementation']:<24} {row['median_s']:>9.3f} "
            f"{row['speedup_vs_plain']:>7.2f}x {memory:>10} {grads:>7}"
        )
    return "\n".join(lines)


# --- the loss straight from hidden states against the materialised logits ------------------


def _linear_inputs(
    framework: str, n_rows: int, hidden: int, vocab: int, dtype: str, seed: int
) -> tuple[Any, ...]:
    """Hidden states and weight of ``dtype``, float32 targets and a bool mask, of ``framework``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    states = rng.standard_normal((n_rows, hidden), dtype=np.float32)
    weight = rng.standard_normal((vocab, hidden), dtype=np.float32) * np.float32(hidden**-0.5)
    target = rng.standard_normal((n_rows, vocab), dtype=np.float32)
    np.exp(target, out=target)
    target /= target.sum(axis=-1, keepdims=True)
    mask = rng.random(n_rows) > 0.1
    if framework == "jax":
        import jax.numpy as jnp

        kind = getattr(jnp, dtype)
        return jnp.asarray(states, kind), jnp.asarray(weight, kind), jnp.asarray(target), mask
    import torch

    kind = getattr(torch, dtype)
    as_tensor = torch.from_numpy
    return (
        as_tensor(states).to(kind),
        as_tensor(weight).to(kind),
        as_tensor(target),
        as_tensor(mask),
    )


def _linear_torch_step(kind: str) -> Callable[..., Any]:
    """Forward+backward of the linear loss, or of ``hidden @ weight.T`` and the loss."""
    import softce_multi

    def step(states: Any, weight: Any, target: Any, mask: Any) -> Any:
        states, weight = states.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        if kind == "linear":
            loss = softce_multi.linear_masked_soft_cross_entropy(states, weight, target, mask)
        else:
            loss = softce_multi.masked_soft_cross_entropy(states @ weight.T, target, mask)
        loss.backward()
        return states.grad, weight.grad

    return step


def _linear_jax_step(kind: str, inputs: tuple[Any, ...]) -> tuple[Any, int]:
    """The jitted forward+backward and XLA's count of its temporaries, in bytes."""
    import jax

    import softce_multi

    def loss(states: Any, weight: Any, target: Any, mask: Any) -> Any:
        if kind == "linear":
            return softce_multi.linear_masked_soft_cross_entropy(states, weight, target, mask)
        return softce_multi.masked_soft_cross_entropy(states @ weight.T, target, mask)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    analysis = step.lower(*inputs).compile().memory_analysis()
    if analysis is None:
        msg = "this JAX backend reports no memory analysis"
        raise RuntimeError(msg)
    return step, int(analysis.temp_size_in_bytes)


def linear_peak_extra_memory(
    kind: str, n_rows: int, hidden: int, vocab: int, dtype: str, seed: int
) -> int:
    """Bytes of extra peak resident memory of one torch forward+backward (``kind``: ``"linear"``
    or ``"materialised"``): ``VmHWM`` is reset after the inputs exist, and the libraries are
    warmed up on a tiny case first, so that no freed buffer of this size is reused."""
    step = _linear_torch_step(kind)
    step(*_linear_inputs("torch", 8, 8, 16, dtype, seed))
    inputs = _linear_inputs("torch", n_rows, hidden, vocab, dtype, seed)
    before = _resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    result = step(*inputs)
    peak = _resident_kib("VmHWM")
    del result
    return (peak - before) * 1024


def run_linear(
    lengths: list[int], hidden: int, vocab: int, dtype: str, repeats: int, seed: int
) -> list[dict[str, Any]]:
    """Linear loss against the materialised path, per number of rows; torch, then JAX."""
    rows = []
    for framework in ("torch", "jax"):
        if not _available(framework):
            continue
        for n_rows in lengths:
            times, memory = _time_linear(framework, n_rows, hidden, vocab, dtype, repeats, seed)
            for kind in ("linear", "materialised"):
                if framework == "torch":
                    memory[kind] = _measure_linear_memory(kind, n_rows, hidden, vocab, dtype, seed)
                extra = memory[kind]
                rows.append(
                    {
                        "framework": framework,
                        "rows": n_rows,
                        "implementation": kind,
                        "median_s": statistics.median(times[kind]),
                        "time_vs_materialised": statistics.median(
                            [a / b for a, b in zip(times[kind], times["materialised"], strict=True)]
                        ),
                        "extra_peak_mib": None if extra is None else extra / MIB,
                        "extra_peak_in_logits": None
                        if extra is None
                        else extra / (n_rows * vocab * 4),
                    }
                )
    return rows


def _time_linear(
    framework: str, n_rows: int, hidden: int, vocab: int, dtype: str, repeats: int, seed: int
) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Interleaved times of both paths; for JAX, also XLA's temporaries."""
    times: dict[str, list[float]] = {"linear": [], "materialised": []}
    memory: dict[str, int | None] = dict.fromkeys(times)
    inputs = _linear_inputs(framework, n_rows, hidden, vocab, dtype, seed)
    steps: dict[str, Callable[..., Any]] = {}
    for kind in times:
        if framework == "jax":
            steps[kind], memory[kind] = _linear_jax_step(kind, inputs)
        else:
            steps[kind] = _linear_torch_step(kind)
    for _round in range(repeats + 1):
        for kind, step in steps.items():
            start = time.perf_counter()
            result = step(*inputs)
            if framework == "jax":
                result[0].block_until_ready()
            elapsed = time.perf_counter() - start
            del result
            if _round > 0:  # the first round compiles and warms up
                times[kind].append(elapsed)
    return times, memory


def _measure_linear_memory(
    kind: str, n_rows: int, hidden: int, vocab: int, dtype: str, seed: int
) -> int | None:
    code = (
        "import json; from softce_multi._cli.bench import linear_peak_extra_memory; "
        "print(json.dumps("
        f"linear_peak_extra_memory({kind!r}, {n_rows}, {hidden}, {vocab}, {dtype!r}, {seed})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def _format_linear(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'framework':<10} {'rows':>7} {'implementation':<14} {'median s':>9} "
        f"{'x time':>7} {'extra MiB':>10} {'x [N,V]':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        mib = row["extra_peak_mib"]
        memory = "n/a" if mib is None else f"{mib:.0f}"
        buffers = "n/a" if mib is None else f"{row['extra_peak_in_logits']:.3f}"
        lines.append(
            f"{row['framework']:<10} {row['rows']:>7} {row['implementation']:<14} "
            f"{row['median_s']:>9.3f} {row['time_vs_materialised']:>6.2f}x {memory:>10} "
            f"{buffers:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m softce_multi bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m softce_multi bench",
        description="Time forward+backward and peak memory against the plain formula.",
    )
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 2048, 32000])
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--linear",
        action="store_true",
        help=(
            "compare linear_masked_soft_cross_entropy of [N, H] hidden states and a [V, H] weight "
            "with the materialised path (hidden @ weight.T, then the loss), for each --rows"
        ),
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 8192], help="with --linear")
    parser.add_argument("--hidden", type=int, default=256, help="with --linear")
    parser.add_argument("--vocab", type=int, default=32000, help="with --linear")
    args = parser.parse_args(argv)
    if args.linear:
        rows = run_linear(args.rows, args.hidden, args.vocab, args.dtype, args.repeats, args.seed)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(
                f"hidden size {args.hidden}, vocabulary {args.vocab}, {args.dtype}, "
                f"forward+backward, median of {args.repeats} interleaved runs"
            )
            print(_format_linear(rows))
            print("x time: this path's time over the materialised path's, per round, median.")
            print(
                "extra MiB: torch, the rise of peak resident memory; JAX, XLA's temporaries. "
                "x [N,V]: in float32 [N, V] buffers."
            )
        return 0
    rows = run(tuple(args.shape), args.dtype, args.repeats, args.seed)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            f"shape {tuple(args.shape)}, logits {args.dtype}, forward+backward, "
            f"median of {args.repeats} interleaved runs"
        )
        print(_format(rows))
        print("speedup: the plain formula's time over this one's, per round, median.")
        print("x grad: extra peak resident memory in units of one gradient buffer.")
    return 0
