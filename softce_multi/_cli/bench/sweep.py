"""``bench`` without ``--linear`` or ``--targets``: every case of :mod:`.cases` on ``[1, N, V]``
logits, at every length and dtype.

The cases of one framework run interleaved round by round; the frameworks run one after the
other (XLA's worker threads keep spinning after a call and would slow an interleaved PyTorch
call). Each case is reported against NeMo AutoModel's formula (ratio of medians of the same
run) and against its own framework's peer (median of the per-round ratios); its extra peak
memory, measured as :mod:`.measure` says, as a multiple of one gradient buffer (the logits'
shape and dtype).

With ``options.busy_core`` (``--busy-core``), every length and dtype is timed twice: once as
the machine is, once with one core kept busy by a spinning process (:func:`.measure.busy_core`);
each row says which (``busy_core``) and gives the 1-minute load average at the end of its timing
(``load_1min``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from softce_multi._cli._common import installed, progress_bar
from softce_multi._cli.bench.cases import BASELINE, CASES, Case, case_named, make_inputs
from softce_multi._cli.bench.measure import (
    ITEMSIZE,
    MIB,
    busy_core,
    in_fresh_process,
    interleaved_times,
    load_average,
    resident_rise,
    synchronize,
    unavailable,
)


def peak_extra_memory(
    name: str, shape: Sequence[int], dtype: str, seed: int, device: str = "cpu"
) -> int:
    """Bytes of extra peak memory of one forward+backward of case ``name`` (:mod:`.measure`)."""
    case = case_named(name)
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
    return resident_rise(lambda: step(*inputs))


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
        wait = functools.partial(synchronize, options.device)
        times.update(interleaved_times(steps, inputs, options.repeats, wait))
        del inputs, steps
    return times


def _skip_reason(
    case: Case, dtype: str, device: str, is_installed: Callable[[str], bool]
) -> str | None:
    if device == "cuda" and case.framework != "torch":
        return "bench runs only the torch cases on CUDA"
    reason = unavailable(case.framework, device)
    if reason is not None:
        return reason
    missing = [library for library in case.requires if not is_installed(library)]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if dtype not in case.dtypes:
        return f"no {dtype}"
    return None


def conditions(options: argparse.Namespace) -> tuple[bool, ...]:
    """Whether each timing of a length and dtype runs with a busy core: only as the machine is,
    or, with ``options.busy_core``, as it is and then with a busy core."""
    return (False, True) if getattr(options, "busy_core", False) else (False,)


def run(
    options: argparse.Namespace,
    cases: Sequence[Case] = CASES,
    is_installed: Callable[[str], bool] = installed,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Sweep ``cases`` over the lengths and dtypes of ``options``; return the measured rows and
    the skipped cases (``is_installed`` tells whether a case's libraries are there)."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    configurations = [(dtype, length) for dtype in options.dtypes for length in options.lengths]
    timings = conditions(options)
    progress = progress_bar(len(configurations) * len(cases) * len(timings), "case", sys.stderr)
    for dtype, length in configurations:
        shape = (1, length, options.vocab)
        runnable = []
        for case in cases:
            reason = _skip_reason(case, dtype, options.device, is_installed)
            if reason is None:
                runnable.append(case)
            else:
                skipped.append({"implementation": case.name, "dtype": dtype, "reason": reason})
                for _ in timings:
                    progress.update()
        memory: dict[str, int | None] = {}
        for busy in timings:
            machine = " with a busy core" if busy else ""
            progress.set_postfix_str(f"{dtype} N={length}: timing{machine}")
            with busy_core() if busy else contextlib.nullcontext():
                times = _time_cases(runnable, shape, dtype, options)
                load = load_average()
            for case in runnable:
                if case.name not in memory:
                    progress.set_postfix_str(f"{dtype} N={length}: memory of {case.name}")
                    memory[case.name] = (
                        in_fresh_process(
                            "peak_extra_memory",
                            case.name,
                            shape,
                            dtype,
                            options.seed,
                            options.device,
                        )
                        if options.memory
                        else None
                    )
                row = _row(case, times, memory[case.name], shape, dtype, options.device)
                rows.append({**row, "busy_core": busy, "load_1min": load})
                progress.update()
    progress.close()
    return rows, skipped


def _row(
    case: Case,
    times: dict[str, list[float]],
    memory: int | None,
    shape: tuple[int, int, int],
    dtype: str,
    device: str,
) -> dict[str, Any]:
    """The row of ``case``: its median time, against NeMo's and its peer's, and its memory."""
    median = statistics.median(times[case.name])
    baseline = statistics.median(times[BASELINE]) if BASELINE in times else None
    peer_ratios = (
        [own / peer for own, peer in zip(times[case.name], times[case.peer], strict=True)]
        if case.peer in times
        else None
    )
    grad_bytes = int(np.prod(shape)) * ITEMSIZE[dtype]
    return {
        "implementation": case.name,
        "dtype": dtype,
        "length": shape[1],
        "vocab": shape[2],
        "device": device,
        "median_s": median,
        "time_vs_nemo": None if baseline is None else median / baseline,
        "peer": case.peer,
        "time_vs_peer": None if peer_ratios is None else statistics.median(peer_ratios),
        "extra_peak_mib": None if memory is None else memory / MIB,
        "extra_peak_in_grads": None if memory is None else memory / grad_bytes,
        "floor_gb_per_s": _floor_bytes(shape, dtype) / median / 1e9,
    }


def _floor_bytes(shape: Sequence[int], dtype: str) -> int:
    """The bytes any implementation must move: read z and p, write the gradient."""
    count = int(np.prod(shape))
    return count * (2 * ITEMSIZE[dtype] + ITEMSIZE["float32"])
