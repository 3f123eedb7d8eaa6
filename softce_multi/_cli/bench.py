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
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from softce_multi import testing
from softce_multi._cli._common import installed, output_file, positive_int, progress_bar
from softce_multi._types import Reduction

MIB = 1 << 20
_DEVICE_KIND = {"cpu": "cpu", "cuda": "gpu"}  # bench's --device, as softce_multi.testing names it
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
BASELINE = "NeMo formula[torch]"
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)
DEFAULT_TARGET_VOCAB = 128000
FRAMEWORKS = ("torch", "jax")  # those of --linear and --targets

Step = Callable[[Any, Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class Case:
    """One implementation to time: ``make(device)`` returns its forward+backward step."""

    name: str
    framework: str  # "torch", "jax" or "numpy": how inputs are built and memory is measured
    make: Callable[[str], Step]
    requires: tuple[str, ...] = ()  # libraries it needs beyond its framework
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

    step.temp_bytes = functools.partial(_xla_temp_bytes, grad_fn)  # type: ignore[attr-defined]
    return step


def _xla_temp_bytes(jitted: Any, *inputs: Any) -> int:
    """Bytes of XLA's temporaries of the jitted function ``jitted`` compiled for ``inputs``."""
    analysis = jitted.lower(*inputs).compile().memory_analysis()
    if analysis is None:
        msg = "this JAX backend reports no memory analysis"
        raise RuntimeError(msg)
    return int(analysis.temp_size_in_bytes)


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
    Case("softce_multi[torch]", "torch", _softce_torch, peer=BASELINE),
    Case(BASELINE, "torch", _nemo_formula),
    Case("F.cross_entropy[torch]", "torch", _torch_cross_entropy, peer=BASELINE),
    Case("SpecForge formula[torch]", "torch", _specforge_formula, peer=BASELINE),
    Case("softce_multi[jax.jit]", "jax", _softce_jax, peer="optax[jax.jit]"),
    Case("optax[jax.jit]", "jax", _optax_loss, ("optax",)),
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
        step(*inputs)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated()) - before
    return _resident_rise(lambda: step(*inputs))


def _resident_rise(run: Callable[[], Any]) -> int:
    """Bytes by which ``run()`` raises the peak resident set above the resident set before it.

    The peak (``VmHWM``) is first reset to the current resident set (``VmRSS``), so that what
    was allocated and freed before the call does not count.
    """
    Path("/proc/self/clear_refs").write_text("5")
    before = _resident_kib("VmRSS")
    result = run()
    peak = _resident_kib("VmHWM")
    del result
    return (peak - before) * 1024


def _memory_in_subprocess(
    name: str, shape: Sequence[int], dtype: str, seed: int, device: str
) -> int | None:
    return _in_fresh_process("peak_extra_memory", name, tuple(shape), dtype, seed, device)


def _in_fresh_process(function: str, *arguments: Any) -> int | None:
    """``function(*arguments)`` of this module, run in a fresh Python process so that its peak
    memory is its own; None if the process fails."""
    call = f"{function}({', '.join(repr(argument) for argument in arguments)})"
    code = f"import json; from softce_multi._cli.bench import {function}; print(json.dumps({call}))"
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
        synchronize = functools.partial(_synchronize, options.device)
        times.update(_interleaved_times(steps, inputs, options.repeats, synchronize))
        del inputs, steps
    return times


def _interleaved_times(
    steps: dict[str, Callable[..., Any]],
    inputs: Sequence[Any],
    repeats: int,
    synchronize: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Wall times of ``repeats`` rounds, each running every step on ``inputs`` once, in order.

    A first round, not counted, compiles and warms up.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            result = step(*inputs)
            synchronize()
            elapsed = time.perf_counter() - start
            del result
            if round_index > 0:
                times[name].append(elapsed)
    return times


def _unavailable(framework: str, device: str) -> str | None:
    """Why ``framework`` cannot run on ``device`` here, from the backends of
    :mod:`softce_multi.testing`; None if it can."""
    (backend,) = (
        backend
        for backend in testing.known_backends()
        if (backend.library, backend.device) == (framework, _DEVICE_KIND[device])
    )
    return backend.unavailable_reason()


def _skip_reason(case: Case, dtype: str, device: str) -> str | None:
    if device == "cuda" and case.framework != "torch":
        return "bench runs only the torch cases on CUDA"
    reason = _unavailable(case.framework, device)
    if reason is not None:
        return reason
    missing = [library for library in case.requires if not installed(library)]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if dtype not in case.dtypes:
        return f"no {dtype}"
    return None


def run(options: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Sweep lengths and dtypes; return the measured rows and the skipped cases."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    configurations = [(dtype, length) for dtype in options.dtypes for length in options.lengths]
    progress = progress_bar(len(configurations) * len(CASES), "case", sys.stderr)
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


#: The modes of softce_multi's kernels that bench times on CUDA, each with the ``[N, V]`` arrays
#: it must read (``z``, ``p``) or write (``grad_z``, ``grad_p``): its byte floor.
KERNEL_MODES = {
    "forward only": ("z", "p"),
    "forward+gradient": ("z", "p", "grad_z"),
    "backward logits": ("z", "p", "grad_z"),
    "backward targets": ("z", "grad_p"),
    "backward both": ("z", "p", "grad_z", "grad_p"),
}


def mode_floor_bytes(mode: str, shape: Sequence[int], dtype: str) -> int:
    """Bytes kernel mode ``mode`` must move for ``shape`` logits of ``dtype`` (float32 targets)."""
    itemsize = {"z": ITEMSIZE[dtype], "grad_z": ITEMSIZE[dtype], "p": 4, "grad_p": 4}
    return int(np.prod(shape)) * sum(itemsize[array] for array in KERNEL_MODES[mode])


def kernel_mode_rows(
    shape: Sequence[int], dtype: str, seed: int, repeats: int, device: str
) -> list[dict[str, Any]]:
    """Median time and achieved bandwidth against its byte floor of each :data:`KERNEL_MODES`.

    The forward modes are the loss without and with a logits leaf (whose gradient the forward
    pass makes); the backward modes differentiate the per-position loss of ``reduction="none"``,
    whose forward pass makes no gradient, with respect to the logits, the targets or both.
    """
    import torch

    import softce_multi

    logits, target, mask = make_inputs("torch", shape, dtype, seed, device)

    def forward(z: Any, p: Any, reduction: Reduction = "mean") -> Any:
        return softce_multi.masked_soft_cross_entropy(z, p, mask, reduction=reduction)

    def backward(logits_grad: bool, targets_grad: bool) -> Callable[[], Any]:
        z = logits.detach().requires_grad_(logits_grad)
        p = target.detach().requires_grad_(targets_grad)
        loss = forward(z, p, "none")
        leaves = [leaf for leaf in (z, p) if leaf.requires_grad]
        upstream = torch.ones_like(loss)
        return lambda: torch.autograd.grad(loss, leaves, upstream, retain_graph=True)

    def forward_only() -> Any:
        with torch.no_grad():
            return forward(logits, target)

    steps: dict[str, Callable[[], Any]] = {
        "forward only": forward_only,
        "forward+gradient": lambda: forward(logits.detach().requires_grad_(True), target),
        "backward logits": backward(True, False),
        "backward targets": backward(False, True),
        "backward both": backward(True, True),
    }
    times = _interleaved_times(steps, (), repeats, functools.partial(_synchronize, device))
    rows = []
    for mode, mode_times in times.items():
        median = statistics.median(mode_times)
        floor = mode_floor_bytes(mode, shape, dtype)
        rows.append(
            {
                "mode": mode,
                "dtype": dtype,
                "length": shape[-2],
                "median_s": median,
                "floor_bytes": floor,
                "gb_per_s": floor / median / 1e9,
            }
        )
    return rows


def format_kernel_modes(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`kernel_mode_rows` as a fixed-width table."""
    return _fixed_width_table(
        rows,
        [
            ("kernel mode", "<18", _value("mode")),
            ("dtype", "<9", _value("dtype")),
            ("N", ">6", _value("length")),
            ("median s", ">9", _value("median_s", "{:.5f}")),
            ("floor MB", ">9", lambda row: f"{row['floor_bytes'] / 1e6:.1f}"),
            ("GB/s", ">7", _value("gb_per_s", "{:.1f}")),
        ],
    )


def _cell(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def format_table(rows: Sequence[dict[str, Any]], bandwidth: bool = False) -> str:
    """The rows as a fixed-width table, one line per implementation, dtype and length."""
    columns = [
        ("implementation", "<26", _value("implementation")),
        ("dtype", "<9", _value("dtype")),
        ("N", ">6", _value("length")),
        ("median s", ">9", _value("median_s", "{:.4f}")),
        ("x NeMo", ">7", _value("time_vs_nemo", "{:.2f}x")),
        ("x peer", ">7", _value("time_vs_peer", "{:.2f}x")),
        ("extra MiB", ">10", _value("extra_peak_mib", "{:.0f}")),
        ("x grad", ">7", _value("extra_peak_in_grads", "{:.2f}")),
    ]
    if bandwidth:
        columns.append(("GB/s", ">7", _value("floor_gb_per_s", "{:.1f}")))
    return _fixed_width_table(rows, columns)


Column = tuple[str, str, Callable[[dict[str, Any]], str]]
"""A table column: its title, its format spec (alignment and width), and its cell of a row."""


def _value(key: str, pattern: str = "{}") -> Callable[[dict[str, Any]], str]:
    """The cell of ``row[key]`` formatted by ``pattern``, or ``n/a`` for None."""
    return lambda row: _cell(row[key], pattern)


def _fixed_width_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """``rows`` as a table: a title line, a rule, then one line per row."""
    header = " ".join(f"{title:{spec}}" for title, spec, _ in columns)
    lines = [header, "-" * len(header)]
    lines += [" ".join(f"{cell(row):{spec}}" for _, spec, cell in columns) for row in rows]
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


# --- functions of hidden states that never hold [N, V] logits, against the materialised path --


class Sizes(NamedTuple):
    """Sizes of a comparison from hidden states, and whether its logits have a bias.

    ``rows`` hidden states of size ``hidden``; ``vocab`` columns of the ``[rows, vocab]`` float32
    array that measures memory (the linear loss's logits, the targets' output, over the draft
    vocabulary); ``target_vocab`` rows of the target head's weight (targets only); ``bias``:
    the logits add a ``[vocab]`` bias, as ``torch.nn.Linear`` does by default (linear only);
    ``autocast``: the name of the dtype of a ``torch.autocast`` around both paths' forward pass
    (linear, torch only), or None; ``reduction``: that of both linear paths (``"none"``'s
    per-position losses are summed, so each gets its own upstream gradient of 1).
    """

    rows: int
    hidden: int
    vocab: int
    target_vocab: int
    bias: bool
    autocast: str | None = None
    reduction: Reduction = "mean"

    @property
    def arrays_in_dtype(self) -> int:
        """How many of the input arrays, leading, take the dtype under test: the hidden
        states, the weight and the bias if any. A forward+backward step differentiates them."""
        return 3 if self.bias else 2


@dataclasses.dataclass(frozen=True)
class FromHidden:
    """A function of hidden states that holds only chunks of the logits, and the materialised
    path it equals (``hidden @ weight.T``, then the function of the logits).

    ``function(path, sizes)`` is the computation of ``path`` (:attr:`own` or
    ``"materialised"``) as a function of the arrays ``inputs(sizes, seed)``; the first
    :attr:`Sizes.arrays_in_dtype` of them (the hidden states, the weight, the bias if any) take
    the dtype under test. With :attr:`differentiate`, a step is forward+backward to those;
    otherwise forward only.
    """

    own: str
    function: Callable[[str, Sizes], Callable[..., Any]]
    inputs: Callable[[Sizes, int], tuple[np.ndarray, ...]]
    differentiate: bool
    title: Callable[[Sizes], str]
    """What is compared, at the given sizes."""
    default_rows: tuple[int, ...]
    default_hidden: int


def _random_rows(rng: np.random.Generator, sizes: Sizes, vocab: int) -> tuple[Any, Any]:
    """Standard normal ``[rows, hidden]`` states and a ``[vocab, hidden]`` weight that keeps the
    logits near unit scale, in float32."""
    states = rng.standard_normal((sizes.rows, sizes.hidden), dtype=np.float32)
    weight = rng.standard_normal((vocab, sizes.hidden), dtype=np.float32)
    weight *= np.float32(sizes.hidden**-0.5)
    return states, weight


def _linear_inputs(sizes: Sizes, seed: int) -> tuple[np.ndarray, ...]:
    """Hidden states, the draft head's weight, with ``sizes.bias`` its bias (small, float32),
    probability targets and a bool mask; the same states, weight, targets and mask without the
    bias as with it."""
    rng = np.random.default_rng(seed)
    states, weight = _random_rows(rng, sizes, sizes.vocab)
    target = rng.standard_normal((sizes.rows, sizes.vocab), dtype=np.float32)
    np.exp(target, out=target)
    target /= target.sum(axis=-1, keepdims=True)
    mask = rng.random(sizes.rows) > 0.1
    if not sizes.bias:
        return states, weight, target, mask
    bias = rng.standard_normal(sizes.vocab, dtype=np.float32)
    bias *= np.float32(0.1)
    return states, weight, bias, target, mask


def _linear_function(path: str, sizes: Sizes) -> Callable[..., Any]:
    """The loss of ``path`` as a function of the arrays of :func:`_linear_inputs`."""
    import softce_multi

    def linear(states: Any, weight: Any, bias: Any, target: Any, mask: Any) -> Any:
        return softce_multi.linear_masked_soft_cross_entropy(
            states, weight, target, mask, bias=bias, reduction=sizes.reduction
        ).sum()

    def materialised(states: Any, weight: Any, bias: Any, target: Any, mask: Any) -> Any:
        if array_api_compat.is_torch_array(states):
            import torch

            # nn.Linear's logits: one rounding with a bias, and autocast's dtype under it.
            logits = torch.nn.functional.linear(states, weight, bias)
        else:
            logits = states @ weight.T
            if bias is not None:
                logits = logits + bias
        return softce_multi.masked_soft_cross_entropy(
            logits, target, mask, reduction=sizes.reduction
        ).sum()

    loss = linear if path == "linear" else materialised
    if sizes.bias:
        return loss
    return lambda states, weight, target, mask: loss(states, weight, None, target, mask)


def _linear_title(sizes: Sizes) -> str:
    logits, bias = (
        ("hidden @ weight.T + bias", "a [V] bias as nn.Linear has")
        if sizes.bias
        else ("hidden @ weight.T", "no bias")
    )
    autocast = f", under torch.autocast({sizes.autocast})" if sizes.autocast else ""
    return (
        f"linear_masked_soft_cross_entropy against {logits} then masked_soft_cross_entropy, "
        f"forward+backward; H = {sizes.hidden}, V = {sizes.vocab}, {bias}, "
        f"reduction {sizes.reduction!r}{autocast}"
    )


def _targets_inputs(sizes: Sizes, seed: int) -> tuple[np.ndarray, ...]:
    """The target model's hidden states and head, a bool loss mask and ``t2d``."""
    rng = np.random.default_rng(seed)
    states, weight = _random_rows(rng, sizes, sizes.target_vocab)
    t2d = np.zeros(sizes.target_vocab, dtype=bool)
    t2d[rng.choice(sizes.target_vocab, sizes.vocab, replace=False)] = True
    return states, weight, rng.random(sizes.rows) > 0.1, t2d


def _targets_function(path: str, sizes: Sizes) -> Callable[..., Any]:
    from softce_multi.eagle3 import prepare_targets, prepare_targets_from_hidden

    if path == "from_hidden":
        return functools.partial(prepare_targets_from_hidden, draft_vocab_size=sizes.vocab)

    def materialised(states: Any, weight: Any, loss_mask: Any, t2d: Any) -> Any:
        return prepare_targets(states @ weight.T, loss_mask, t2d, draft_vocab_size=sizes.vocab)

    return materialised


def _targets_title(sizes: Sizes) -> str:
    return (
        "prepare_targets_from_hidden against prepare_targets(hidden @ weight.T), forward; "
        f"H = {sizes.hidden}, V_target = {sizes.target_vocab}, V_draft = {sizes.vocab}"
    )


FROM_HIDDEN: dict[str, FromHidden] = {
    "linear": FromHidden(
        "linear",
        _linear_function,
        _linear_inputs,
        differentiate=True,
        title=_linear_title,
        default_rows=(2048, 8192),
        default_hidden=256,
    ),
    "targets": FromHidden(
        "from_hidden",
        _targets_function,
        _targets_inputs,
        differentiate=False,
        title=_targets_title,
        default_rows=(4096,),
        default_hidden=128,
    ),
}
"""The comparisons from hidden states, by their option (``bench --linear``, ``--targets``)."""


def _framework_arrays(
    framework: str, arrays: Sequence[np.ndarray], dtype: str, in_dtype: int
) -> tuple[Any, ...]:
    """``arrays`` in ``framework``; the first ``in_dtype`` of them in ``dtype``."""
    if framework == "jax":
        import jax.numpy as jnp

        return tuple(
            jnp.asarray(array, getattr(jnp, dtype)) if index < in_dtype else jnp.asarray(array)
            for index, array in enumerate(arrays)
        )
    import torch

    return tuple(
        torch.from_numpy(array).to(getattr(torch, dtype))
        if index < in_dtype
        else torch.from_numpy(array)
        for index, array in enumerate(arrays)
    )


def _from_hidden_torch_step(comparison: FromHidden, path: str, sizes: Sizes) -> Step:
    function = comparison.function(path, sizes)
    if not comparison.differentiate:
        return function

    import torch

    def step(*arrays: Any) -> Any:
        leaves = [array.detach().requires_grad_(True) for array in arrays[: sizes.arrays_in_dtype]]
        # A training step's forward pass under autocast, its backward pass after it.
        autocast = torch.autocast(
            leaves[0].device.type,
            dtype=getattr(torch, sizes.autocast or "float32"),
            enabled=sizes.autocast is not None,
        )
        with autocast:
            loss = function(*leaves, *arrays[sizes.arrays_in_dtype :])
        loss.backward()
        return tuple(leaf.grad for leaf in leaves)

    return step


def _from_hidden_jax_step(
    comparison: FromHidden, path: str, sizes: Sizes, inputs: Sequence[Any]
) -> tuple[Step, int]:
    """The jitted step and XLA's count of its temporaries, in bytes."""
    import jax

    function = comparison.function(path, sizes)
    if comparison.differentiate:
        function = jax.value_and_grad(function, argnums=tuple(range(sizes.arrays_in_dtype)))
    jitted = jax.jit(function)

    def step(*arrays: Any) -> Any:
        return jax.block_until_ready(jitted(*arrays))

    return step, _xla_temp_bytes(jitted, *inputs)


def peak_extra_memory_from_hidden(
    name: str, path: str, sizes: tuple[Any, ...], dtype: str, seed: int
) -> int:
    """Bytes of extra peak resident memory of one torch step of ``path`` of comparison ``name``
    at ``sizes``, the fields of a :class:`Sizes`.

    The libraries are warmed up on a tiny case first, so that no freed buffer of this size is
    reused; ``VmHWM`` is reset once the inputs exist.
    """
    comparison = FROM_HIDDEN[name]
    full = Sizes(*sizes)
    tiny = full._replace(rows=8, hidden=8, vocab=16, target_vocab=32)
    warm_up = _from_hidden_torch_step(comparison, path, tiny)
    warm_up(*_framework_arrays("torch", comparison.inputs(tiny, seed), dtype, tiny.arrays_in_dtype))
    step = _from_hidden_torch_step(comparison, path, full)
    inputs = _framework_arrays("torch", comparison.inputs(full, seed), dtype, full.arrays_in_dtype)
    return _resident_rise(lambda: step(*inputs))


def _memory_from_hidden(name: str, path: str, sizes: Sizes, dtype: str, seed: int) -> int | None:
    return _in_fresh_process("peak_extra_memory_from_hidden", name, path, tuple(sizes), dtype, seed)


def run_from_hidden(
    name: str,
    sizes: Sequence[Sizes],
    dtype: str,
    repeats: int,
    seed: int,
    frameworks: Sequence[str] = FRAMEWORKS,
    *,
    memory: bool = True,
) -> list[dict[str, Any]]:
    """Comparison ``name`` at each of ``sizes``: interleaved times of both paths and, with
    ``memory``, the torch paths' extra peak memory (a fresh process's resident set); the JAX
    paths' is XLA's count of temporaries."""
    comparison = FROM_HIDDEN[name]
    paths = (comparison.own, "materialised")
    rows = []
    for framework in frameworks:
        if _unavailable(framework, "cpu") is not None:
            continue
        for size in sizes:
            inputs = _framework_arrays(
                framework, comparison.inputs(size, seed), dtype, size.arrays_in_dtype
            )
            steps: dict[str, Step] = {}
            extras: dict[str, int | None] = dict.fromkeys(paths)
            for path in paths:
                if framework == "jax":
                    steps[path], extras[path] = _from_hidden_jax_step(
                        comparison, path, size, inputs
                    )
                else:
                    steps[path] = _from_hidden_torch_step(comparison, path, size)
            times = _interleaved_times(steps, inputs, repeats)
            del inputs, steps
            for path in paths:
                if framework == "torch" and memory:
                    extras[path] = _memory_from_hidden(name, path, size, dtype, seed)
                extra = extras[path]
                ratios = [a / b for a, b in zip(times[path], times["materialised"], strict=True)]
                rows.append(
                    {
                        "comparison": name,
                        "framework": framework,
                        **size._asdict(),
                        "dtype": dtype,
                        "implementation": path,
                        "median_s": statistics.median(times[path]),
                        "time_vs_materialised": statistics.median(ratios),
                        "extra_peak_mib": None if extra is None else extra / MIB,
                        "extra_peak_in_logits": None
                        if extra is None
                        else extra / (size.rows * size.vocab * ITEMSIZE["float32"]),
                    }
                )
    return rows


def _format_from_hidden(rows: list[dict[str, Any]]) -> str:
    return _fixed_width_table(
        rows,
        [
            ("framework", "<10", _value("framework")),
            ("rows", ">7", _value("rows")),
            ("implementation", "<14", _value("implementation")),
            ("median s", ">9", _value("median_s", "{:.3f}")),
            ("x time", ">7", _value("time_vs_materialised", "{:.2f}x")),
            ("extra MiB", ">10", _value("extra_peak_mib", "{:.0f}")),
            ("x [N,V]", ">8", _value("extra_peak_in_logits", "{:.3f}")),
        ],
    )


def _main_from_hidden(name: str, args: argparse.Namespace) -> int:
    comparison = FROM_HIDDEN[name]
    hidden = args.hidden or comparison.default_hidden
    target_vocab = args.target_vocab or DEFAULT_TARGET_VOCAB
    bias = name == "linear" and args.bias is not False  # nn.Linear's default: with a bias
    sizes = [
        Sizes(rows, hidden, args.vocab, target_vocab, bias, args.autocast, args.reduction or "mean")
        for rows in args.rows or comparison.default_rows
    ]
    dtype = args.dtypes[0]
    # JAX has no autocast.
    frameworks = args.frameworks or (("torch",) if args.autocast else FRAMEWORKS)
    rows = run_from_hidden(
        name, sizes, dtype, args.repeats, args.seed, frameworks, memory=args.memory
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(comparison.title(sizes[0]))
    print(f"{dtype}, median of {args.repeats} interleaved rounds")
    print(_format_from_hidden(rows))
    print("x time: this path's time over the materialised path's, per round, median.")
    print(
        "extra MiB: torch, the rise of peak resident memory in a fresh process; JAX, XLA's "
        "temporaries. x [N,V]: in float32 [N, V] buffers (V: the draft vocabulary)."
    )
    return 0


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through ``parser.error`` and before anything is measured, the options that the
    run would ignore or fail on, and the outputs it could not write when done."""
    comparison = "--linear" if args.linear else "--targets" if args.targets else None
    bias_flag = "--bias" if args.bias else "--no-bias"
    if comparison is None:
        for flag, value in [
            ("--rows", args.rows),
            ("--hidden", args.hidden),
            ("--target-vocab", args.target_vocab),
            ("--frameworks", args.frameworks),
        ]:
            if value is not None:
                parser.error(f"{flag} goes with --linear or --targets")
        if args.bias is not None:
            parser.error(f"{bias_flag} goes with --linear")
        if args.autocast is not None:
            parser.error("--autocast goes with --linear")
        if args.reduction is not None:
            parser.error("--reduction goes with --linear")
    else:
        for flag, given in [
            ("--lengths", args.lengths is not None),
            ("--device cuda", args.device == "cuda"),
            ("--plot", args.plot is not None),
            ("--target-vocab", args.linear and args.target_vocab is not None),
            (bias_flag, args.targets and args.bias is not None),
            ("--autocast", args.targets and args.autocast is not None),
            ("--reduction", args.targets and args.reduction is not None),
        ]:
            if given:
                parser.error(f"{flag} does not go with {comparison}")
        target_vocab = args.target_vocab or DEFAULT_TARGET_VOCAB
        if args.targets and args.vocab > target_vocab:
            parser.error(
                f"--vocab {args.vocab} is more than --target-vocab {target_vocab}: the draft "
                "vocabulary is a subset of the target's"
            )
        if args.autocast is not None and "jax" in (args.frameworks or ()):
            parser.error("--autocast is torch.autocast: it does not go with --frameworks jax")
        frameworks = args.frameworks or (("torch",) if args.autocast else FRAMEWORKS)
        reasons = [_unavailable(framework, "cpu") for framework in frameworks]
        missing = [reason for reason in reasons if reason is not None]
        if missing and (args.frameworks is not None or len(missing) == len(frameworks)):
            parser.error(f"{comparison} runs on {' or '.join(frameworks)}: {'; '.join(missing)}")
    if args.device == "cuda":
        reason = _unavailable("torch", "cuda")
        if reason is not None:
            parser.error(f"--device cuda: {reason}")
    if args.plot is not None and not installed("matplotlib"):
        parser.error("--plot needs matplotlib: pip install 'softce_multi[bench]'")


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
        help=(
            "sequence lengths N of [1, N, V] logits "
            f"(default: {' '.join(map(str, DEFAULT_LENGTHS))})"
        ),
    )
    parser.add_argument(
        "--vocab", type=positive_int, default=32000, help="V; with --targets V_draft (%(default)s)"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=list(ITEMSIZE),
        help="logits dtypes (default: %(default)s); --linear and --targets run the first",
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
    parser.add_argument("--json", type=output_file, metavar="PATH", help="write the rows as JSON")
    parser.add_argument(
        "--plot", type=output_file, metavar="PATH", help="draw time and memory (needs matplotlib)"
    )
    comparisons = parser.add_mutually_exclusive_group()
    comparisons.add_argument(
        "--linear",
        action="store_true",
        help=(
            "compare linear_masked_soft_cross_entropy of [N, H] hidden states and a [V, H] weight "
            "with the materialised path (hidden @ weight.T, then the loss), for each --rows"
        ),
    )
    comparisons.add_argument(
        "--targets",
        action="store_true",
        help=(
            "compare prepare_targets_from_hidden of [N, H] hidden states and a [V_target, H] "
            "head with prepare_targets(hidden @ weight.T), V_draft = --vocab, for each --rows"
        ),
    )
    parser.add_argument(
        "--rows",
        type=positive_int,
        nargs="+",
        help="with --linear or --targets: N (default: 2048 8192; --targets: 4096)",
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        help="with --linear or --targets: H (default: 256; --targets: 128)",
    )
    parser.add_argument(
        "--target-vocab",
        type=positive_int,
        help=f"with --targets: V_target ({DEFAULT_TARGET_VOCAB})",
    )
    parser.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        help="with --linear: a [V] bias as nn.Linear has, differentiated too (default: yes)",
    )
    parser.add_argument(
        "--reduction",
        choices=("mean", "sum", "none"),
        help="with --linear: the reduction of both paths; none sums the losses (default: mean)",
    )
    parser.add_argument(
        "--autocast",
        choices=("bfloat16", "float16"),
        help=(
            "with --linear: both paths' forward pass under torch.autocast of this dtype, with "
            "the --dtypes float32 inputs as master weights (torch only)"
        ),
    )
    parser.add_argument(
        "--frameworks",
        nargs="+",
        choices=FRAMEWORKS,
        help="with --linear or --targets: the frameworks to run (default: those installed)",
    )
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    if args.linear or args.targets:
        return _main_from_hidden("linear" if args.linear else "targets", args)
    args.lengths = args.lengths or list(DEFAULT_LENGTHS)
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
    modes = []
    if args.device == "cuda":
        print("GB/s: bytes(z) + bytes(p) + bytes(grad) over the median time.")
        modes = [
            row
            for dtype in args.dtypes
            for length in args.lengths
            for row in kernel_mode_rows(
                (1, length, args.vocab), dtype, args.seed, args.repeats, args.device
            )
        ]
        print(format_kernel_modes(modes))
        print("GB/s: the bytes each mode must read and write (floor MB) over its median time.")
    for entry in {(item["implementation"], item["reason"]): item for item in skipped}.values():
        print(f"skipped {entry['implementation']} ({entry['dtype']}): {entry['reason']}")
    if args.json:
        report = {"rows": rows, "skipped": skipped, "kernel_modes": modes}
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(rows, args.plot, f"[1, N, {args.vocab}] logits on {args.device}, forward+backward")
    return 0
