"""``bench --profile``: where the time of the torch CPU forward operator goes.

With a ``"mean"`` or ``"sum"`` loss, forward plus backward on the CPU is one pass of
``softce_multi::torch_row_routine`` (the backward hands over the gradient it made). This replays
that pass's block loop stage by stage on one thread, with a timer around each stage, for a
float32 ``[N, V]`` gradient three ways: fresh, its pages mapped a block at a time (what the
operator does); fresh, its pages faulted in by the first write; and written once before. Then it
times the operator itself on one thread and on ``torch.get_num_threads()`` workers, the per-row
work after the blocks alone, and the block loop's PyTorch calls on a vocabulary of 8 (their
overhead alone).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from softce_multi._cli.bench.measure import load_average

#: The stages of a block, in the order the operator runs them.
STAGES = (
    "mapping the block's pages",
    "row maximum",
    "z - row_max (first write)",
    "sum(p)",
    "sum(p * (z - row_max))",
    "softmax in place",
    "sum_exp from the softmax",
    "gradient from the softmax",
)

#: The three gradients the stages are timed into.
GRADIENTS = ("fresh, mapped per block", "fresh, faulted in", "written once")


def stage_times(torch: Any, n_rows: int, vocab: int, repeats: int, seed: int) -> dict[str, Any]:
    """Median ms per stage (summed over the blocks) for each of :data:`GRADIENTS`, and the
    other timings of the module docstring."""
    from softce_multi import _core
    from softce_multi.kernels import torch_cpu, torch_cpu_blocks

    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows, vocab, generator=generator)
    p = torch.rand(n_rows, vocab, generator=generator)
    p /= p.sum(dim=-1, keepdim=True)
    weights, row_scale = torch.ones(n_rows), torch.full((n_rows,), 1.0 / n_rows)
    rows = torch_cpu._block_rows(n_rows, vocab)
    blocks = list(_core.row_blocks(n_rows, rows))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        written = torch.zeros(n_rows, vocab)
        gradients: dict[str, tuple[Callable[[], Any], bool]] = {
            GRADIENTS[0]: (lambda: torch.empty(n_rows, vocab), True),
            GRADIENTS[1]: (lambda: torch.empty(n_rows, vocab), False),
            GRADIENTS[2]: (lambda: written, False),
        }
        columns = {}
        for name, (make, populate) in gradients.items():
            passes = [
                _one_pass(torch, z, p, row_scale, make(), blocks, rows, populate, torch_cpu_blocks)
                for _ in range(repeats)
            ]
            columns[name] = {stage: statistics.median(t[stage] for t in passes) for stage in STAGES}
        one_worker = _median_ms(
            lambda: torch_cpu.torch_row_routine(z, p, weights, row_scale, True), repeats
        )
    finally:
        torch.set_num_threads(threads)
    workers = _median_ms(
        lambda: torch_cpu.torch_row_routine(z, p, weights, row_scale, True), repeats
    )
    small_z, small_p = torch.randn(n_rows, 8), torch.rand(n_rows, 8)
    block_elements = torch_cpu.BLOCK_ELEMENTS
    torch_cpu.BLOCK_ELEMENTS = rows * 8  # the same blocks, 8 entries a row
    torch.set_num_threads(1)
    try:
        calls = _median_ms(
            lambda: torch_cpu.torch_row_routine(small_z, small_p, weights, row_scale, True), repeats
        )
    finally:
        torch_cpu.BLOCK_ELEMENTS = block_elements
        torch.set_num_threads(threads)
    return {
        "columns": columns,
        "blocks": len(blocks),
        "one_worker_ms": one_worker,
        "workers": threads,
        "workers_ms": workers,
        "block_calls_ms": calls,
    }


def _one_pass(
    torch: Any,
    z: Any,
    p: Any,
    row_scale: Any,
    grad: Any,
    blocks: list[slice],
    rows: int,
    populate: bool,
    torch_cpu_blocks: Any,
) -> dict[str, float]:
    """One pass of the operator's block loop into ``grad``, ms per stage."""
    n_rows = z.shape[0]
    row_max, sum_exp = torch.empty(n_rows), torch.empty(n_rows)
    target_sum, target_dot = torch.empty(n_rows), torch.empty(n_rows)
    products = torch.empty(rows, z.shape[1])
    totals = dict.fromkeys(STAGES, 0.0)
    stage: Iterator[str] = iter(())  # the stages of the block being timed

    @contextlib.contextmanager
    def timed() -> Iterator[None]:
        name = next(stage)
        start = time.perf_counter()
        yield
        totals[name] += time.perf_counter() - start

    for block in blocks:
        stage = iter(STAGES)
        g, z_block, p_block = grad[block], z[block], p[block]
        scale = row_scale[block]
        with timed():
            if populate:
                torch_cpu_blocks.populate(g)
        with timed():
            row_max[block].copy_(torch.amax(z_block, dim=-1))
        with timed():
            torch.sub(z_block, row_max[block, None], out=g)
        with timed():
            torch.sum(p_block, dim=-1, out=target_sum[block])
        with timed():
            product = torch.mul(p_block, g, out=products[: block.stop - block.start])
            torch.sum(product, dim=-1, out=target_dot[block])
        with timed():
            torch.softmax(g, dim=-1, out=g)
        with timed():
            torch.amax(g, dim=-1, out=sum_exp[block]).reciprocal_()
        with timed():
            g.mul_((scale * target_sum[block])[:, None]).addcmul_(p_block, scale[:, None], value=-1)
    return {stage: seconds * 1e3 for stage, seconds in totals.items()}


def _median_ms(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times) * 1e3


def main_profile(args: argparse.Namespace) -> int:
    """Run ``bench --profile`` for the first of ``args.lengths`` and ``args.vocab``; print the
    table."""
    import torch

    n_rows = args.lengths[0]
    result = stage_times(torch, n_rows, args.vocab, args.repeats, args.seed)
    print(
        f"torch CPU forward operator, float32 [{n_rows}, {args.vocab}], {result['blocks']} "
        f"blocks on one thread, median of {args.repeats} passes, ms per stage"
    )
    width = max(map(len, STAGES)) + 2
    print("stage".ljust(width) + "".join(name.rjust(26) for name in GRADIENTS))
    for stage in (*STAGES, "all"):
        values = [
            sum(column.values()) if stage == "all" else column[stage]
            for column in result["columns"].values()
        ]
        print(stage.ljust(width) + "".join(f"{value:26.1f}" for value in values))
    print(
        f"the operator, fresh gradient: {result['one_worker_ms']:.1f} ms on one thread, "
        f"{result['workers_ms']:.1f} ms on {result['workers']} workers"
    )
    print(
        f"the same block loop's PyTorch calls on a vocabulary of 8: "
        f"{result['block_calls_ms']:.1f} ms on one thread"
    )
    load = load_average()
    if load is not None:
        print(f"load: the 1-minute load average at the end, {load:.2f}")
    return 0
