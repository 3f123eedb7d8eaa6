"""``bench --sparse K`` and ``bench --linear --sparse K``: the losses of sparse (top-k) targets,
``K`` distinct random ids per position with Dirichlet probabilities, against the same
framework's loss of the dense targets those stand for (each probability scattered at its id,
:func:`softce_multi.testing.dense_targets`).

Without ``--linear`` the loss is that of ``[1, N, V]`` logits, forward+backward to the logits,
for each length and dtype; with it, the linear loss of ``[N, H]`` hidden states and a
``[V, H]`` weight (and a ``[V]`` bias), forward+backward to those, in the first dtype. NumPy
runs the ``*_with_grad`` function, torch autograd, JAX ``jax.jit(jax.value_and_grad(...))``.

Both paths of a framework run interleaved round by round (:func:`.measure.interleaved_times`);
each sparse row gives its time over the dense path's, per round, median. Extra peak memory is
counted beyond the inputs and the gradients the step returns, in float32 ``[N, V]`` buffers:
for NumPy and torch, the rise of the peak resident set of a fresh process
(:func:`.measure.resident_rise`) less the bytes of those gradients; for JAX, XLA's temporaries
of the compiled step, which count neither its arguments nor its outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from softce_multi._cli.bench.measure import (
    ITEMSIZE,
    MIB,
    interleaved_times,
    resident_rise,
    unavailable,
    xla_temp_bytes,
)
from softce_multi._cli.bench.report import print_skipped, write_json

FRAMEWORKS = ("numpy", "torch", "jax")
PATHS = ("sparse", "dense")
DEFAULT_LINEAR_ROWS = (2048, 8192)
DEFAULT_LINEAR_HIDDEN = 256
NUMPY_DTYPES = ("float32", "float64")


class SparseSizes(NamedTuple):
    """The sizes of one comparison: ``rows`` positions, ``vocab`` columns, ``top_k`` slots per
    position; ``hidden`` is None for the loss of ``[1, rows, vocab]`` logits, or the size of
    the hidden states of the linear loss, whose logits add a ``[vocab]`` bias with ``bias``."""

    rows: int
    vocab: int
    top_k: int
    hidden: int | None = None
    bias: bool = False

    @property
    def linear(self) -> bool:
        """Whether this is the linear loss of hidden states."""
        return self.hidden is not None


class Arrays(NamedTuple):
    """The arguments of a step: the arrays it differentiates (the logits; or the hidden
    states, the weight and the bias if any), the ``[..., K]`` probabilities, the position mask,
    and the ``[..., K]`` ids (sparse path) or the ``[..., V]`` dense targets (dense path); the
    one a path does not read may be None."""

    differentiated: tuple[Any, ...]
    probs: Any
    mask: Any
    ids: Any
    dense: Any


def random_sparse_targets(
    rng: np.random.Generator, positions: int, vocab: int, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[positions, top_k]`` int32 ids, distinct within each position and in random order,
    and float32 probabilities drawn from a flat Dirichlet distribution (each row sums to 1)."""
    draws = np.sort(rng.integers(0, vocab - top_k + 1, (positions, top_k)), axis=-1)
    ids = rng.permuted(draws + np.arange(top_k), axis=-1).astype(np.int32)
    probs = rng.dirichlet(np.ones(top_k), size=positions).astype(np.float32)
    return ids, probs


def sparse_inputs(sizes: SparseSizes, seed: int, path: str | None = None) -> Arrays:
    """The float32 NumPy arrays of both paths, or only those ``path`` reads; the same for both
    paths at the same seed. Logits and hidden states are standard normal; the weight keeps the
    logits near unit scale; a tenth of the positions are masked out."""
    rng = np.random.default_rng(seed)
    if sizes.hidden is None:
        shape: tuple[int, ...] = (1, sizes.rows)
        differentiated: tuple[np.ndarray, ...] = (
            rng.standard_normal((*shape, sizes.vocab), dtype=np.float32),
        )
    else:
        shape = (sizes.rows,)
        weight = rng.standard_normal((sizes.vocab, sizes.hidden), dtype=np.float32)
        weight *= np.float32(sizes.hidden**-0.5)
        differentiated = (
            rng.standard_normal((sizes.rows, sizes.hidden), dtype=np.float32),
            weight,
        )
        if sizes.bias:
            differentiated += (np.float32(0.1) * rng.standard_normal(sizes.vocab, np.float32),)
    ids, probs = random_sparse_targets(rng, sizes.rows, sizes.vocab, sizes.top_k)
    mask = rng.random(shape) > 0.1
    dense = None
    if path != "sparse":
        from softce_multi.testing import dense_targets

        dense = dense_targets(ids, probs, sizes.vocab).astype(np.float32).reshape(*shape, -1)
    return Arrays(
        differentiated,
        probs.reshape(*shape, -1),
        mask,
        None if path == "dense" else ids.reshape(*shape, -1),
        dense,
    )


def framework_arrays(framework: str, arrays: Arrays, dtype: str) -> Arrays:
    """``arrays`` in ``framework``, the differentiated ones in ``dtype``."""
    if framework == "numpy":
        return arrays._replace(
            differentiated=tuple(array.astype(dtype) for array in arrays.differentiated)
        )
    if framework == "torch":
        import torch

        convert: Callable[..., Any] = torch.as_tensor
        kind = getattr(torch, dtype)
    else:
        import jax.numpy as jnp

        convert = jnp.asarray
        kind = getattr(jnp, dtype)
    return Arrays(
        tuple(convert(array, dtype=kind) for array in arrays.differentiated),
        *(None if array is None else convert(array) for array in arrays[1:]),
    )


def gradient_bytes(sizes: SparseSizes, dtype: str) -> int:
    """Bytes of the gradients a step returns: one per differentiated array, in its shape and
    ``dtype``."""
    count = sizes.rows * sizes.vocab
    if sizes.hidden is not None:
        count = sizes.rows * sizes.hidden + sizes.vocab * sizes.hidden + sizes.bias * sizes.vocab
    return count * ITEMSIZE[dtype]


def _loss(path: str, sizes: SparseSizes, framework: str) -> Callable[..., Any]:
    """The scalar loss of ``path`` as a function of ``(differentiated, arrays)``, for autograd
    or ``jax.grad`` to the tuple ``differentiated``."""
    import softce_multi

    sparse = path == "sparse"

    def loss(differentiated: tuple[Any, ...], arrays: Arrays) -> Any:
        targets = arrays.probs if sparse else arrays.dense
        ids = arrays.ids if sparse else None
        if sizes.linear:
            hidden, weight, *bias = differentiated
            return softce_multi.linear_masked_soft_cross_entropy(
                hidden, weight, targets, arrays.mask, bias=bias[0] if bias else None, target_ids=ids
            )
        (logits,) = differentiated
        if framework == "jax":
            from softce_multi.jax import masked_soft_cross_entropy

            return masked_soft_cross_entropy(logits, targets, arrays.mask, target_ids=ids)
        return softce_multi.masked_soft_cross_entropy(logits, targets, arrays.mask, target_ids=ids)

    return loss


def _numpy_step(path: str, sizes: SparseSizes) -> Callable[[Arrays], Any]:
    import softce_multi

    sparse = path == "sparse"

    def step(arrays: Arrays) -> Any:
        targets = arrays.probs if sparse else arrays.dense
        ids = arrays.ids if sparse else None
        if sizes.linear:
            hidden, weight, *bias = arrays.differentiated
            return softce_multi.linear_masked_soft_cross_entropy_with_grad(
                hidden, weight, targets, arrays.mask, bias=bias[0] if bias else None, target_ids=ids
            )
        (logits,) = arrays.differentiated
        return softce_multi.masked_soft_cross_entropy_with_grad(
            logits, targets, arrays.mask, target_ids=ids
        )

    return step


def _torch_step(path: str, sizes: SparseSizes) -> Callable[[Arrays], Any]:
    loss = _loss(path, sizes, "torch")

    def step(arrays: Arrays) -> Any:
        leaves = tuple(array.detach().requires_grad_(True) for array in arrays.differentiated)
        loss(leaves, arrays).backward()
        return tuple(leaf.grad for leaf in leaves)

    return step


def _jax_step(path: str, sizes: SparseSizes) -> tuple[Callable[[Arrays], Any], Any]:
    """The step and the jitted function it runs."""
    import jax

    jitted = jax.jit(jax.value_and_grad(_loss(path, sizes, "jax")))

    def step(arrays: Arrays) -> Any:
        return jax.block_until_ready(jitted(arrays.differentiated, arrays))

    return step, jitted


def _step(framework: str, path: str, sizes: SparseSizes) -> Callable[[Arrays], Any]:
    if framework == "numpy":
        return _numpy_step(path, sizes)
    if framework == "torch":
        return _torch_step(path, sizes)
    return _jax_step(path, sizes)[0]


def peak_extra_memory_sparse(
    framework: str, path: str, sizes: tuple[Any, ...], dtype: str, seed: int
) -> int:
    """Bytes by which one NumPy or torch step of ``path`` at ``sizes`` (the fields of a
    :class:`SparseSizes`) raises the peak resident set, its returned gradients included.

    The step first runs on tiny sizes, so that the libraries are loaded and no freed buffer of
    this size is reused; only the arrays ``path`` reads are built."""
    full = SparseSizes(*sizes)
    tiny = full._replace(rows=4, vocab=max(full.top_k, 8), hidden=full.hidden and 4)
    _step(framework, path, tiny)(framework_arrays(framework, sparse_inputs(tiny, seed), dtype))
    step = _step(framework, path, full)
    arrays = framework_arrays(framework, sparse_inputs(full, seed, path), dtype)
    return resident_rise(lambda: step(arrays))


MemoryOf = Callable[[str, str, SparseSizes, str, int], int | None]
"""``memory_of(framework, path, sizes, dtype, seed)``: what :func:`peak_extra_memory_sparse`
returns, or None if it could not be measured."""


def peak_extra_memory_in_fresh_process(
    framework: str, path: str, sizes: SparseSizes, dtype: str, seed: int
) -> int | None:
    """:func:`peak_extra_memory_sparse` in a fresh Python process, so that the peak is its own;
    None if the process fails."""
    arguments = ", ".join(map(repr, (framework, path, tuple(sizes), dtype, seed)))
    code = (
        "import json; from softce_multi._cli.bench.sparse import peak_extra_memory_sparse; "
        f"print(json.dumps(peak_extra_memory_sparse({arguments})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


memory_of: MemoryOf = peak_extra_memory_in_fresh_process
"""How :func:`main` measures NumPy's and torch's memory; replace it to measure elsewhere."""


def _median_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    return statistics.median(a / b for a, b in zip(times, baseline, strict=True))


def _skip_reason(framework: str, dtype: str) -> str | None:
    if framework == "numpy":
        return None if dtype in NUMPY_DTYPES else f"no {dtype}"
    return unavailable(framework, "cpu")


def run_sparse(
    sizes: Sequence[SparseSizes],
    dtypes: Sequence[str],
    repeats: int,
    seed: int,
    *,
    memory: MemoryOf | None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Both paths of every framework that can run, at each of ``sizes`` and ``dtypes``: rows
    of their times (every round and the median), the sparse path's time over the dense one's
    (per round, median) and their extra memory (NumPy's and torch's by ``memory``, none
    without it); and the frameworks skipped."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for dtype in dtypes:
        for framework in FRAMEWORKS:
            reason = _skip_reason(framework, dtype)
            if reason is not None:
                skipped.append({"implementation": framework, "dtype": dtype, "reason": reason})
                continue
            for size in sizes:
                rows += _compare(framework, size, dtype, repeats, seed, memory)
    return rows, skipped


def _compare(
    framework: str,
    sizes: SparseSizes,
    dtype: str,
    repeats: int,
    seed: int,
    memory: MemoryOf | None,
) -> list[dict[str, Any]]:
    """The rows of both paths of ``framework`` at ``sizes`` and ``dtype``."""
    host = sparse_inputs(sizes, seed)
    shared_bytes = gradient_bytes(sizes, dtype) + host.probs.nbytes + host.mask.nbytes
    inputs_bytes = {
        "sparse": shared_bytes + host.ids.nbytes,
        "dense": shared_bytes + host.dense.nbytes,
    }
    arrays = framework_arrays(framework, host, dtype)
    del host
    steps = {}
    extras: dict[str, int | None] = dict.fromkeys(PATHS)
    for path in PATHS:
        if framework == "jax":
            steps[path], jitted = _jax_step(path, sizes)
            extras[path] = xla_temp_bytes(jitted, arrays.differentiated, arrays)
        else:
            steps[path] = _step(framework, path, sizes)
    times = interleaved_times(steps, (arrays,), repeats)
    del arrays, steps
    logits_bytes = sizes.rows * sizes.vocab * ITEMSIZE["float32"]
    rows = []
    for path in PATHS:
        rise = None
        if framework != "jax" and memory is not None:
            rise = memory(framework, path, sizes, dtype, seed)
            extras[path] = None if rise is None else rise - gradient_bytes(sizes, dtype)
        extra = extras[path]
        rows.append(
            {
                "comparison": "linear" if sizes.linear else "logits",
                "framework": framework,
                **sizes._asdict(),
                "dtype": dtype,
                "implementation": path,
                "median_s": statistics.median(times[path]),
                "times_s": times[path],
                "time_vs_dense": _median_ratio(times[path], times["dense"]),
                "inputs_mib": inputs_bytes[path] / MIB,
                "peak_rise_mib": None if rise is None else rise / MIB,
                "extra_peak_mib": None if extra is None else extra / MIB,
                "extra_peak_in_logits": None if extra is None else extra / logits_bytes,
            }
        )
    return rows


def format_sparse(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`run_sparse` as a fixed-width table."""

    def cell(value: Any, pattern: str) -> str:
        return "n/a" if value is None else pattern.format(value)

    header = (
        f"{'framework':<10} {'dtype':<9} {'N':>6} {'path':<7} {'median s':>9} {'x dense':>8} "
        f"{'inputs MiB':>11} {'extra MiB':>10} {'x [N,V]':>8}"
    )
    lines = [header, "-" * len(header)]
    lines += [
        f"{row['framework']:<10} {row['dtype']:<9} {row['rows']:>6} {row['implementation']:<7} "
        f"{row['median_s']:>9.4f} {cell(row['time_vs_dense'], '{:.2f}x'):>8} "
        f"{row['inputs_mib']:>11.0f} {cell(row['extra_peak_mib'], '{:.0f}'):>10} "
        f"{cell(row['extra_peak_in_logits'], '{:.3f}'):>8}"
        for row in rows
    ]
    return "\n".join(lines)


def _title(sizes: SparseSizes) -> str:
    if sizes.hidden is None:
        what = f"masked_soft_cross_entropy of [1, N, {sizes.vocab}] logits"
        backward = "forward+backward to the logits"
    else:
        bias = "a [V] bias" if sizes.bias else "no bias"
        what = f"linear_masked_soft_cross_entropy, H = {sizes.hidden}, V = {sizes.vocab}, {bias}"
        backward = "forward+backward to the hidden states, weight and bias"
    return (
        f"{what}: sparse targets (target_ids, K = {sizes.top_k}) against the dense targets "
        f"they stand for, {backward}"
    )


def main(args: argparse.Namespace) -> int:
    """Run ``bench --sparse K`` (with ``--linear``, the linear loss) with the checked options
    ``args``: print the table, the skipped frameworks and what the columns mean; write the
    JSON."""
    if args.linear:
        sizes = [
            SparseSizes(
                rows,
                args.vocab,
                args.sparse,
                args.hidden or DEFAULT_LINEAR_HIDDEN,
                args.bias is not False,
            )
            for rows in args.rows or DEFAULT_LINEAR_ROWS
        ]
        dtypes = args.dtypes[:1]
    else:
        sizes = [SparseSizes(length, args.vocab, args.sparse) for length in args.lengths]
        dtypes = args.dtypes
    rows, skipped = run_sparse(
        sizes, dtypes, args.repeats, args.seed, memory=memory_of if args.memory else None
    )
    write_json(args.json, {"rows": rows, "skipped": skipped})
    print(_title(sizes[0]))
    print(f"median of {args.repeats} interleaved rounds")
    print(format_sparse(rows))
    print("x dense: this path's time over the dense path's of the same framework, per round.")
    print("inputs MiB: the arrays the path reads, the dense path's [N, V] targets included.")
    print(
        "extra MiB: peak memory beyond the inputs and the gradients the step returns (NumPy "
        "and torch: the rise of the peak resident set in a fresh process, less the gradients; "
        "JAX: XLA's temporaries). x [N,V]: in float32 [N, V] buffers."
    )
    print_skipped(skipped)
    return 0
