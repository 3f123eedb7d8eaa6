"""``python -m softce_multi bench``: time and extra peak memory of forward+backward against the
implementations users run today, on every installed backend, in the same run.

Its modules:

- :mod:`.cases`: the implementations timed on ``[1, N, V]`` logits (:data:`CASES`), and their
  inputs;
- :mod:`.measure`: interleaved timing, extra peak memory, a measurement in a fresh process;
- :mod:`.sweep`: every case at every length and dtype (:func:`run`);
- :mod:`.modes`: the kernel modes timed on their own on CUDA (:data:`KERNEL_MODES`);
- :mod:`.from_hidden`: ``--linear`` and ``--targets``, functions of hidden states against the
  materialised logits (:data:`FROM_HIDDEN`, :func:`run_from_hidden`);
- :mod:`.sparse`: ``--sparse K``, the losses of sparse (top-k) targets against those of the
  dense targets they stand for;
- :mod:`.report`: the tables, the JSON and the plot;
- :mod:`.command`: the options, those refused before measuring, and the top level.

:func:`main` runs with this package's ``CASES``, ``installed``, ``run``, ``run_from_hidden``
and ``_memory_from_hidden`` as they are when it is called, so that replacing one of them here
(fewer cases, the memory measured in the calling process) changes what it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from softce_multi._cli._common import installed
from softce_multi._cli.bench import command
from softce_multi._cli.bench.cases import BASELINE, CASES, Case, make_inputs
from softce_multi._cli.bench.from_hidden import (
    FROM_HIDDEN,
    FromHidden,
    Sizes,
    _framework_arrays,
    _from_hidden_jax_step,
    _from_hidden_torch_step,
    _memory_from_hidden,
    peak_extra_memory_from_hidden,
    run_from_hidden,
)
from softce_multi._cli.bench.measure import ITEMSIZE, MIB
from softce_multi._cli.bench.modes import KERNEL_MODES, kernel_mode_rows, mode_floor_bytes
from softce_multi._cli.bench.report import format_kernel_modes, format_table, plot
from softce_multi._cli.bench.sweep import peak_extra_memory, run

__all__ = [
    "BASELINE",
    "CASES",
    "FROM_HIDDEN",
    "ITEMSIZE",
    "KERNEL_MODES",
    "MIB",
    "Case",
    "FromHidden",
    "Sizes",
    "_framework_arrays",
    "_from_hidden_jax_step",
    "_from_hidden_torch_step",
    "_memory_from_hidden",
    "format_kernel_modes",
    "format_table",
    "installed",
    "kernel_mode_rows",
    "main",
    "make_inputs",
    "mode_floor_bytes",
    "peak_extra_memory",
    "peak_extra_memory_from_hidden",
    "plot",
    "run",
    "run_from_hidden",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m softce_multi bench``."""
    return command.main(
        argv,
        cases=CASES,
        is_installed=installed,
        run=run,
        run_from_hidden=run_from_hidden,
        memory_from_hidden=_memory_from_hidden,
    )
