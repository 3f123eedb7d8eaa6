"""What ``bench`` prints and writes: fixed-width tables with the notes that explain them, the
rows as JSON, and the plot."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Column = tuple[str, str, Callable[[dict[str, Any]], str]]
"""A table column: its title, its format spec (alignment and width), and its cell of a row."""


def _value(key: str, pattern: str = "{}") -> Callable[[dict[str, Any]], str]:
    """The cell of ``row[key]`` formatted by ``pattern``, or ``n/a`` for None."""
    return lambda row: "n/a" if row[key] is None else pattern.format(row[key])


def _fixed_width_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """``rows`` as a table: a title line, a rule, then one line per row."""
    header = " ".join(f"{title:{spec}}" for title, spec, _ in columns)
    lines = [header, "-" * len(header)]
    lines += [" ".join(f"{cell(row):{spec}}" for _, spec, cell in columns) for row in rows]
    return "\n".join(lines)


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
    if any("load_1min" in row for row in rows):
        columns.append(("load", ">6", _load))
    return _fixed_width_table(rows, columns)


def _load(row: dict[str, Any]) -> str:
    """The cell of a row's 1-minute load average; ``n/a`` where it was not measured."""
    load = row.get("load_1min")
    return "n/a" if load is None else f"{load:.2f}"


def side_by_side(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a ``--busy-core`` sweep paired: one per implementation, dtype and length,
    with the idle row's values and the busy-core row's under ``busy_`` keys."""
    busy = {
        (row["implementation"], row["dtype"], row["length"]): row
        for row in rows
        if row.get("busy_core")
    }
    pairs = []
    for row in rows:
        other = busy.get((row["implementation"], row["dtype"], row["length"]))
        if not row.get("busy_core") and other is not None:
            pairs.append({**row, **{f"busy_{key}": value for key, value in other.items()}})
    return pairs


def format_side_by_side(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of a ``--busy-core`` sweep as a fixed-width table: for each implementation,
    dtype and length, its time and its ratio to NeMo's formula as the machine was and with a
    busy core, each with the 1-minute load average at the end of its timing."""
    return _fixed_width_table(
        side_by_side(rows),
        [
            ("implementation", "<26", _value("implementation")),
            ("dtype", "<9", _value("dtype")),
            ("N", ">6", _value("length")),
            ("idle s", ">8", _value("median_s", "{:.4f}")),
            ("x NeMo", ">7", _value("time_vs_nemo", "{:.2f}x")),
            ("load", ">6", _load),
            ("busy s", ">8", _value("busy_median_s", "{:.4f}")),
            ("x NeMo", ">7", _value("busy_time_vs_nemo", "{:.2f}x")),
            ("load", ">6", lambda row: _load({"load_1min": row.get("busy_load_1min")})),
            ("x grad", ">7", _value("extra_peak_in_grads", "{:.2f}")),
        ],
    )


def format_kernel_modes(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`~softce_multi._cli.bench.modes.kernel_mode_rows` as a fixed-width
    table."""
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


def format_from_hidden(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`~softce_multi._cli.bench.from_hidden.run_from_hidden` as a
    fixed-width table."""
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


def print_sweep(rows: Sequence[dict[str, Any]], vocab: int, device: str, repeats: int) -> None:
    """Print the title, the table of the ``[1, N, V]`` cases and what its columns mean."""
    print(
        f"[1, N, {vocab}] logits on {device}, float32 targets, forward+backward, "
        f"median of {repeats} interleaved rounds"
    )
    print(format_table(rows, bandwidth=device == "cuda"))
    print(
        "x NeMo: median time over NeMo AutoModel's formula's in the same run. x peer: per-round "
        "ratio to the peer of the same framework, median. x grad: extra peak memory in "
        "gradient buffers (CPU: peak RSS of a fresh process; CUDA: max_memory_allocated; "
        "JAX: XLA temporaries). load: the machine's 1-minute load average when the timing "
        "ended."
    )
    if any(row.get("busy_core") for row in rows):
        print("\nas the machine was (idle: no busy core made) and with one core kept busy")
        print(format_side_by_side(rows))
        print(
            "busy: a spinning process pinned to one core while the cases were timed; load: "
            "the 1-minute load average when each timing ended (the spinner raises it)."
        )
    if device == "cuda":
        print("GB/s: bytes(z) + bytes(p) + bytes(grad) over the median time.")


def print_kernel_modes(rows: Sequence[dict[str, Any]]) -> None:
    """Print the table of the kernel modes and what its bandwidth means."""
    print(format_kernel_modes(rows))
    print("GB/s: the bytes each mode must read and write (floor MB) over its median time.")


def print_skipped(skipped: Sequence[dict[str, str]]) -> None:
    """Print each skipped implementation once per reason, with the first dtype it was for."""
    for entry in {(item["implementation"], item["reason"]): item for item in skipped}.values():
        print(f"skipped {entry['implementation']} ({entry['dtype']}): {entry['reason']}")


def print_from_hidden(rows: Sequence[dict[str, Any]], title: str, dtype: str, repeats: int) -> None:
    """Print ``title``, the table of a comparison from hidden states and what it means."""
    print(title)
    print(f"{dtype}, median of {repeats} interleaved rounds")
    print(format_from_hidden(rows))
    print("x time: this path's time over the materialised path's, per round, median.")
    print(
        "extra MiB: torch, the rise of peak resident memory in a fresh process; JAX, XLA's "
        "temporaries. x [N,V]: in float32 [N, V] buffers (V: the draft vocabulary)."
    )


def write_json(path: Path | None, report: object) -> None:
    """Write ``report`` to ``path`` as indented JSON; nothing without a path."""
    if path:
        path.write_text(json.dumps(report, indent=2))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
"""The markers of the plot's lines, one per implementation in the order the rows give them."""
LINE_STYLES = ("-", "--", "-.", ":")


def figure_of(rows: Sequence[dict[str, Any]], title: str, panel: str = "dtype") -> Any:
    """A :class:`matplotlib.figure.Figure` of time and extra memory against sequence length, of
    the rows timed without a busy core: one row of panels per value of ``row[panel]`` (the
    dtype by default), one line per implementation, drawn with the same hollow marker and line
    style in every panel (different for different implementations, so that lines at the same
    values stay told apart), and a legend in each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if not row.get("busy_core")]
    panels = list(dict.fromkeys(row[panel] for row in rows))
    names = list(dict.fromkeys(row["implementation"] for row in rows))
    styles = {
        name: {
            "marker": MARKERS[index % len(MARKERS)],
            "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
            "fillstyle": "none",
            "markersize": 8,
            "label": name,
        }
        for index, name in enumerate(names)
    }
    figure, axes = plt.subplots(
        len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False, layout="constrained"
    )
    for (time_axis, memory_axis), label in zip(axes, panels, strict=True):
        for name in names:
            mine = [row for row in rows if row["implementation"] == name and row[panel] == label]
            if not mine:
                continue
            lengths = [row["length"] for row in mine]
            time_axis.plot(lengths, [row["median_s"] for row in mine], **styles[name])
            memory = [row["extra_peak_in_grads"] for row in mine]
            memory_axis.plot(lengths, [np.nan if m is None else m for m in memory], **styles[name])
        for axis in (time_axis, memory_axis):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("sequence length N")
            axis.legend(fontsize="small")
        time_axis.set_yscale("log")
        time_axis.set_ylabel("median forward+backward time (s)")
        memory_axis.set_ylabel("extra peak memory (gradient buffers)")
        for axis in (time_axis, memory_axis):
            axis.set_title(label, fontsize="medium")
    figure.suptitle(title)
    return figure


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str, panel: str = "dtype") -> None:
    """Save :func:`figure_of` ``rows`` to ``path`` (needs matplotlib); ``panel`` as there."""
    figure = figure_of(rows, title, panel)
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    plt.close(figure)
