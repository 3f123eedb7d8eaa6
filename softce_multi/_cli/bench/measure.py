"""How ``bench`` measures: wall times of steps run in interleaved rounds, the extra peak memory
of a call, a measurement in a fresh process, and the load on the machine (the load average, and
a busy core made on purpose).

Times are medians over rounds in which several steps run interleaved, since absolute times on a
shared machine drift. Extra peak memory is:

- on CPU, the rise of the peak resident set (Linux ``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` after the inputs are built and the step is warmed up) over the
  resident set before the call, in a fresh process per measurement (:func:`in_fresh_process`);
- on CUDA, ``torch.cuda.max_memory_allocated`` over the memory allocated before the call;
- for JAX, XLA's temporaries of the compiled step (``memory_analysis().temp_size_in_bytes``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from softce_multi import testing

MIB = 1 << 20
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_DEVICE_KIND = {"cpu": "cpu", "cuda": "gpu"}  # bench's --device, as softce_multi.testing names it


def synchronize(device: str) -> None:
    """Wait until the work queued on ``device`` is done (CUDA; nothing to wait for on CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved_times(
    steps: dict[str, Callable[..., Any]],
    inputs: Sequence[Any],
    repeats: int,
    wait: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Wall times of ``repeats`` rounds, each running every step on ``inputs`` once, in order,
    each timed until ``wait()`` returns after it.

    Before them, one warm-up round that is not timed runs every step once: it compiles and
    warms up each step.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            result = step(*inputs)
            wait()
            elapsed = time.perf_counter() - start
            del result
            if round_index > 0:
                times[name].append(elapsed)
    return times


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    msg = f"{field} not found in /proc/self/status"
    raise RuntimeError(msg)


def resident_rise(run: Callable[[], Any]) -> int:
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


def xla_temp_bytes(jitted: Any, *inputs: Any) -> int:
    """Bytes of XLA's temporaries of the jitted function ``jitted`` compiled for ``inputs``."""
    analysis = jitted.lower(*inputs).compile().memory_analysis()
    if analysis is None:
        msg = "this JAX backend reports no memory analysis"
        raise RuntimeError(msg)
    return int(analysis.temp_size_in_bytes)


def in_fresh_process(function: str, *arguments: Any) -> int | None:
    """``function(*arguments)`` of :mod:`softce_multi._cli.bench`, run in a fresh Python process
    so that its peak memory is its own; None if the process fails."""
    call = f"{function}({', '.join(repr(argument) for argument in arguments)})"
    code = f"import json; from softce_multi._cli.bench import {function}; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def unavailable(framework: str, device: str) -> str | None:
    """Why ``framework`` cannot run on ``device`` (bench's ``--device``) here, from the backends
    of :mod:`softce_multi.testing`; None if it can."""
    (backend,) = (
        backend
        for backend in testing.known_backends()
        if (backend.library, backend.device) == (framework, _DEVICE_KIND[device])
    )
    return backend.unavailable_reason()


SPINNER = """\
import os, sys
cpu = int(sys.argv[1])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
print(cpu, flush=True)
while True:
    pass
"""
"""The code of the process that :func:`busy_core` runs: pinned to the CPU it is given (none for
-1), it says so on its standard output, then spins until it is killed."""


def load_average() -> float | None:
    """The machine's 1-minute load average, or None where the system does not report it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def busy_core() -> Iterator[int | None]:
    """Keep one core busy while the ``with`` block runs, as another program on the machine would.

    A Python process that spins, pinned to the last CPU this process may run on (where the
    system lets a process choose its CPUs), is started and running before the block, and
    killed after it. Yields that CPU, or None where it could not be pinned.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpu = cpus[-1] if cpus else -1
    spinner = subprocess.Popen(
        [sys.executable, "-c", SPINNER, str(cpu)], stdout=subprocess.PIPE, text=True
    )
    try:
        if spinner.stdout is None or not spinner.stdout.readline():
            msg = "the process that keeps a core busy did not start"
            raise RuntimeError(msg)
        yield None if cpu < 0 else cpu
    finally:
        spinner.kill()
        spinner.wait()
