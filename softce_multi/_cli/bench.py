"""``python -m softce_multi bench``: time and extra peak memory of forward+backward against the
implementations users run today, on every installed backend, in the same run.

Every comparison is a :class:`Case` in :data:`CASES`: a name, its framework, the libraries it
needs, and a factory of one forward+backward step ``step(logits, target, mask) -> gradient``.
A new comparison is one more ``Case``. A case whose library is missing is reported as skipped.

Times are medians over rounds in which the cases of one framework run interleaved, since
absolute times on a shared machine drift; the frameworks run one after the other (XLA's worker
threads keep spinning after a call and would slow an interleaved PyTorch call). Each case is
reported against NeMo AutoModel's formula (ratio of medians of the same run) and against its own
framework's peer (median of the per-round ratios).

Extra peak memory, as a multiple of one gradient buffer (the logits' shape and dtype):

- on CPU, the rise of the peak resident set (Linux ``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` after the inputs are built and the step is warmed up) over the
  resident set before the call, in a fresh subprocess per case;
- on CUDA, ``torch.cuda.max_memory_allocated`` over the memory allocated before the call;
- for JAX, XLA's temporaries of the compiled step (``memory_analysis().temp_size_in_bytes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from softce_multi._cli._common import installed, positive_int

MIB = 1 << 20
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
BASELINE = "NeMo formula[torch]"

Step = Callable[[Any, Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class Case:
    """One implementation to time: ``make(device)`` returns its forward+backward step."""

    name: str
    framework: str  # "torch", "jax" or "numpy": how inputs are built and memory is measured
    make: Callable[[str], Step]
    requires: tuple[str, ...] = ()
    peer: str | None = None  # the case of the same framework it is compared with
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")


# --- the steps -----------------------------------------------------------------------------


def _torch_step(loss_fn: Callable[[Any, Any, Any], Any]) -> Step:
    def step(logits: Any, target: Any, mask: Any) -> Any:
        leaf = logits.detach().requires_grad_(True)
        loss_fn(leaf, target, mask).backward()
        return leaf.grad

    return step


def _jax_step(loss_fn: Callable[[Any, Any, Any], Any]) -> Step:
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


def _softce_torch(device: str) -> Step:
    import softce_multi

    return _torch_step(softce_multi.masked_soft_cross_entropy)


def _nemo_formula(device: str) -> Step:
    """NeMo AutoModel's soft cross entropy as its users write it in PyTorch."""
    import torch

    def loss(logits: Any, target: Any, mask: Any) -> Any:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        per_position = -(target * log_probs).sum(dim=-1)
        weights = mask.reshape(per_position.shape).float()
        return (per_position * weights).sum() / weights.sum().clamp(min=1)

    return _torch_step(loss)


def _torch_cross_entropy(device: str) -> Step:
    """``torch.nn.functional.cross_entropy`` with probability targets, then the masked mean."""
    import torch

    def loss(logits: Any, target: Any, mask: Any) -> Any:
        vocab = logits.shape[-1]
        per_position = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab).float(), target.reshape(-1, vocab), reduction="none"
        )
        weights = mask.reshape(per_position.shape).float()
        return (per_position * weights).sum() / weights.sum().clamp(min=1)

    return _torch_step(loss)


def _specforge_formula(device: str) -> Step:
    """SpecForge's EAGLE-3 loss: ``-sum(mask * p * log_softmax(z))`` over the vocabulary, mean
    over positions, in the logits' dtype."""
    import torch

    def loss(logits: Any, target: Any, mask: Any) -> Any:
        log_probs = torch.log_softmax(logits, dim=-1)
        return -torch.sum(mask * (target * log_probs), dim=-1).mean()

    return _torch_step(loss)


def _softce_jax(device: str) -> Step:
    from softce_multi.jax import masked_soft_cross_entropy

    return _jax_step(masked_soft_cross_entropy)


def _optax_loss(device: str) -> Step:
    """``optax.softmax_cross_entropy`` under ``jax.jit``, then the masked mean."""
    import jax.numpy as jnp
    import optax

    def loss(logits: Any, target: Any, mask: Any) -> Any:
        per_position = optax.softmax_cross_entropy(logits.astype(jnp.float32), target)
        weights = jnp.reshape(mask, per_position.shape).astype(jnp.float32)
        return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return _jax_step(loss)


def _softce_numpy(device: str) -> Step:
    import softce_multi

    def step(logits: Any, target: Any, mask: Any) -> Any:
        return softce_multi.masked_soft_cross_entropy_with_grad(logits, target, mask)[1]

    return step


def _plain_numpy(device: str) -> Step:
    """The loss and its gradient in NumPy as written by hand: the softmax materialised."""

    def step(logits: Any, target: Any, mask: Any) -> Any:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        weights = mask.reshape(logits.shape[:-1]).astype(logits.dtype)
        denominator = max(weights.sum(), 1.0)
        loss = -((target * log_probs).sum(axis=-1) * weights).sum() / denominator
        scale = (weights / denominator)[..., None]
        grad = scale * (target.sum(axis=-1, keepdims=True) * np.exp(log_probs) - target)
        return loss, grad

    return step


CASES: list[Case] = [
    Case("softce_multi[torch]", "torch", _softce_torch, ("torch",), peer=BASELINE),
    Case(BASELINE, "torch", _nemo_formula, ("torch",)),
    Case("F.cross_entropy[torch]", "torch", _torch_cross_entropy, ("torch",), peer=BASELINE),
    Case("SpecForge formula[torch]", "torch", _specforge_formula, ("torch",), peer=BASELINE),
    Case("softce_multi[jax.jit]", "jax", _softce_jax, ("jax",), peer="optax[jax.jit]"),
    Case("optax[jax.jit]", "jax", _optax_loss, ("jax", "optax")),
    Case(
        "softce_multi[numpy]",
        "numpy",
        _softce_numpy,
        peer="plain NumPy",
        dtypes=("float32", "float64"),
    ),
    Case("plain NumPy", "numpy", _plain_numpy, dtypes=("float32", "float64")),
]
"""Every comparison ``bench`` runs, in order; add a :class:`Case` to add one."""


def _case(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    msg = f"no bench case named {name!r}; the cases are {[case.name for case in CASES]}"
    raise ValueError(msg)


# --- inputs and memory ---------------------------------------------------------------------


def make_inputs(
    framework: str, shape: Sequence[int], dtype: str, seed: int, device: str = "cpu"
) -> tuple[Any, Any, Any]:
    """Logits of ``dtype``, float32 probability targets and a ``[..., 1]`` bool mask."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(tuple(shape), dtype=np.float32)
    target = rng.standard_normal(tuple(shape), dtype=np.float32)
    np.exp(target, out=target)
    target /= target.sum(axis=-1, keepdims=True)
    mask = rng.random((*shape[:-1], 1)) > 0.1
    if framework == "torch":
        import torch

        kind = getattr(torch, dtype)
        return (
            torch.from_numpy(logits).to(device=device, dtype=kind),
            torch.from_numpy(target).to(device),
            torch.from_numpy(mask).to(device),
        )
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(logits, getattr(jnp, dtype)), jnp.asarray(target), jnp.asarray(mask)
    return logits.astype(dtype), target, mask


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    msg = f"{field} not found in /proc/self/status"
    raise RuntimeError(msg)


def peak_extra_memory(
    name: str, shape: Sequence[int], dtype: str, seed: int, device: str = "cpu"
) -> int:
    """Bytes of extra peak memory of one forward+backward of case ``name`` (module doc)."""
    case = _case(name)
    step = case.make(device)
    inputs = make_inputs(case.framework, shape, dtype, seed, device)
    if case.framework == "jax":
        return int(step.temp_bytes(*inputs))  # type: ignore[attr-defined]
    step(*inputs)  # warm up; its result is freed before measuring
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = step(*inputs)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated()) - before
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _resident_kib("VmRSS")
    result = step(*inputs)
    peak = _resident_kib("VmHWM")
    del result
    return (peak - before) * 1024


def _memory_in_subprocess(
    name: str, shape: Sequence[int], dtype: str, seed: int, device: str
) -> int | None:
    code = (
        "import json; from softce_multi._cli.bench import peak_extra_memory; print(json.dumps("
        f"peak_extra_memory({name!r}, {tuple(shape)!r}, {dtype!r}, {seed}, {device!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


# --- the sweep -----------------------------------------------------------------------------


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _time_cases(
    cases: Sequence[Case], shape: Sequence[int], dtype: str, options: argparse.Namespace
) -> dict[str, list[float]]:
    """Times of each case, the cases of one framework interleaved round by round."""
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    for framework in dict.fromkeys(case.framework for case in cases):
        inputs = make_inputs(framework, shape, dtype, options.seed, options.device)
        steps = {
            case.name: case.make(options.device) for case in cases if case.framework == framework
        }
        for round_index in range(options.repeats + 1):
            for name, step in steps.items():
                start = time.perf_counter()
                result = step(*inputs)
                _synchronize(options.device)
                elapsed = time.perf_counter() - start
                del result
                if round_index > 0:  # the first round compiles and warms up
                    times[name].append(elapsed)
        del inputs, steps
    return times


def _skip_reason(case: Case, dtype: str, device: str) -> str | None:
    missing = [library for library in (case.framework, *case.requires) if library != "numpy"]
    missing = [library for library in missing if not installed(library)]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if dtype not in case.dtypes:
        return f"no {dtype}"
    if device == "cuda" and case.framework != "torch":
        return "bench runs only the torch cases on CUDA"
    return None


def run(options: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Sweep lengths and dtypes; return the measured rows and the skipped cases."""
    import tqdm

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    configurations = [(dtype, length) for dtype in options.dtypes for length in options.lengths]
    progress = tqdm.tqdm(total=len(configurations) * len(CASES), unit="case", file=sys.stderr)
    for dtype, length in configurations:
        shape = (1, length, options.vocab)
        cases = []
        for case in CASES:
            reason = _skip_reason(case, dtype, options.device)
            if reason is None:
                cases.append(case)
            else:
                skipped.append({"implementation": case.name, "dtype": dtype, "reason": reason})
                progress.update()
        progress.set_postfix_str(f"{dtype} N={length}: timing")
        times = _time_cases(cases, shape, dtype, options)
        grad_bytes = length * options.vocab * ITEMSIZE[dtype]
        baseline = statistics.median(times[BASELINE]) if BASELINE in times else None
        for case in cases:
            progress.set_postfix_str(f"{dtype} N={length}: memory of {case.name}")
            memory = (
                _memory_in_subprocess(case.name, shape, dtype, options.seed, options.device)
                if options.memory
                else None
            )
            median = statistics.median(times[case.name])
            peer_ratios = (
                [own / peer for own, peer in zip(times[case.name], times[case.peer], strict=True)]
                if case.peer in times
                else None
            )
            rows.append(
                {
                    "implementation": case.name,
                    "dtype": dtype,
                    "length": length,
                    "vocab": options.vocab,
                    "device": options.device,
                    "median_s": median,
                    "time_vs_nemo": None if baseline is None else median / baseline,
                    "peer": case.peer,
                    "time_vs_peer": None if peer_ratios is None else statistics.median(peer_ratios),
                    "extra_peak_mib": None if memory is None else memory / MIB,
                    "extra_peak_in_grads": None if memory is None else memory / grad_bytes,
                    "floor_gb_per_s": _floor_bytes(shape, dtype) / median / 1e9,
                }
            )
            progress.update()
    progress.close()
    return rows, skipped


def _floor_bytes(shape: Sequence[int], dtype: str) -> int:
    """The bytes any implementation must move: read z and p, write the gradient."""
    count = int(np.prod(shape))
    return count * (2 * ITEMSIZE[dtype] + ITEMSIZE["float32"])


def _cell(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def format_table(rows: Sequence[dict[str, Any]], bandwidth: bool = False) -> str:
    """The rows as a fixed-width table, one line per implementation, dtype and length."""
    header = (
        f"{'implementation':<26} {'dtype':<9} {'N':>6} {'median s':>9} {'x NeMo':>7} "
        f"{'x peer':>7} {'extra MiB':>10} {'x grad':>7}"
    ) + (f" {'GB/s':>7}" if bandwidth else "")
    lines = [header, "-" * len(header)]
    for row in rows:
        line = (
            f"{row['implementation']:<26} {row['dtype']:<9} {row['length']:>6} "
            f"{row['median_s']:>9.4f} {_cell(row['time_vs_nemo'], '{:.2f}x'):>7} "
            f"{_cell(row['time_vs_peer'], '{:.2f}x'):>7} "
            f"{_cell(row['extra_peak_mib'], '{:.0f}'):>10} "
            f"{_cell(row['extra_peak_in_grads'], '{:.2f}'):>7}"
        )
        if bandwidth:
            line += f" {row['floor_gb_per_s']:>7.1f}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Time and extra memory against sequence length, one line per implementation, one row of
    panels per dtype; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    figure, axes = plt.subplots(
        len(dtypes), 2, figsize=(11, 4 * len(dtypes)), squeeze=False, layout="constrained"
    )
    for (time_axis, memory_axis), dtype in zip(axes, dtypes, strict=True):
        for name in dict.fromkeys(row["implementation"] for row in rows):
            mine = [row for row in rows if row["implementation"] == name and row["dtype"] == dtype]
            if not mine:
                continue
            lengths = [row["length"] for row in mine]
            time_axis.plot(lengths, [row["median_s"] for row in mine], marker="o", label=name)
            memory = [row["extra_peak_in_grads"] for row in mine]
            memory_axis.plot(
                lengths, [np.nan if m is None else m for m in memory], marker="o", label=name
            )
        for axis in (time_axis, memory_axis):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("sequence length N")
        time_axis.set_yscale("log")
        time_axis.set_ylabel(f"{dtype}: median forward+backward time (s)")
        memory_axis.set_ylabel(f"{dtype}: extra peak memory (gradient buffers)")
        time_axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
        if not installed(framework):
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m softce_multi bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m softce_multi bench",
        description=(
            "Time forward+backward and extra peak memory of softce_multi on every installed "
            "backend against NeMo's formula, F.cross_entropy, SpecForge's formula, optax and "
            "plain NumPy, for each sequence length and dtype."
        ),
    )
    parser.add_argument(
        "--lengths",
        type=positive_int,
        nargs="+",
        default=[512, 1024, 2048, 4096, 8192],
        help="sequence lengths N of [1, N, V] logits (default: %(default)s)",
    )
    parser.add_argument("--vocab", type=positive_int, default=32000, help="V (%(default)s)")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=list(ITEMSIZE),
        help="logits dtypes (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure extra peak memory, in one fresh process per case (default: yes)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="draw time and memory")
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
    args = parser.parse_args(argv)
    if args.linear:
        dtype = args.dtypes[0]
        linear_rows = run_linear(args.rows, args.hidden, args.vocab, dtype, args.repeats, args.seed)
        if args.json:
            args.json.write_text(json.dumps(linear_rows, indent=2))
        print(
            f"hidden size {args.hidden}, vocabulary {args.vocab}, {dtype}, "
            f"forward+backward, median of {args.repeats} interleaved runs"
        )
        print(_format_linear(linear_rows))
        print("x time: this path's time over the materialised path's, per round, median.")
        print(
            "extra MiB: torch, the rise of peak resident memory; JAX, XLA's temporaries. "
            "x [N,V]: in float32 [N, V] buffers."
        )
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench --device cuda: PyTorch sees no CUDA device", file=sys.stderr)
            return 2
    rows, skipped = run(args)
    print(
        f"[1, N, {args.vocab}] logits on {args.device}, float32 targets, forward+backward, "
        f"median of {args.repeats} interleaved rounds"
    )
    print(format_table(rows, bandwidth=args.device == "cuda"))
    print(
        "x NeMo: median time over NeMo AutoModel's formula's in the same run. x peer: per-round "
        "ratio to the peer of the same framework, median. x grad: extra peak memory in "
        "gradient buffers (CPU: peak RSS of a fresh process; CUDA: max_memory_allocated; "
        "JAX: XLA temporaries)."
    )
    if args.device == "cuda":
        print("GB/s: bytes(z) + bytes(p) + bytes(grad) over the median time.")
    for entry in {(item["implementation"], item["reason"]): item for item in skipped}.values():
        print(f"skipped {entry['implementation']} ({entry['dtype']}): {entry['reason']}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=2))
    if args.plot:
        plot(rows, args.plot, f"[1, N, {args.vocab}] logits on {args.device}, forward+backward")
    return 0
