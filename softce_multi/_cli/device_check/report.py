"""What the device check writes and prints: the merged report, its goals, the plot and the
short table printed last."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softce_multi._cli.bench.report import _fixed_width_table, _value, plot
from softce_multi._cli.device_check.hidden import LIGER, LINEAR
from softce_multi._cli.device_check.speed import PALLAS, XLA

OURS = "softce_multi[torch]"


def _goal(goal: str, value: str, met: bool | None) -> dict[str, Any]:
    return {"goal": goal, "value": value, "met": met}


def _parity_goal(report: dict[str, Any]) -> dict[str, Any]:
    rows = report["parity"]
    ok = sum(bool(row["ok"]) for row in rows)
    stages_ran = all(
        stage["status"] == "ok" for stage in report["stages"] if stage["stage"].endswith("parity")
    )
    return _goal(
        "parity: every GPU path within the tolerances of the float64 reference",
        f"{ok} of {len(rows)} rows within tolerance",
        bool(rows) and ok == len(rows) and stages_ran,
    )


def _sync_goal(report: dict[str, Any]) -> dict[str, Any]:
    cuda = [test for test in report["tests"] if test["name"] == "cuda tests"]
    if not cuda or report["dry_run"]:
        return _goal("no host sync, CUDA graph capture", "not run on a GPU", None)
    test = cuda[0]
    return _goal("no host sync, CUDA graph capture", test["summary"], test["returncode"] == 0)


def _headline_goals(report: dict[str, Any], shape: Sequence[int]) -> list[dict[str, Any]]:
    goals = []
    where = f"[1, {shape[-2]}, {shape[-1]}] bf16"
    for targets in ("float32", "bfloat16"):
        mine = _find(report["speed"], OURS, shape, targets)
        label = f"{where}, {targets} targets"
        if mine is None:
            goals.append(_goal(f"{label}: softce_multi timed", "no row", False))
            continue
        ratio = mine.get("time_vs_nemo")
        goals.append(
            _goal(
                f"{label}: at most 0.6x NeMo's Triton kernel",
                "NeMo's kernel not timed" if ratio is None else f"{ratio:.2f}x",
                None if ratio is None else ratio <= 0.6,
            )
        )
        fraction = mine["copy_fraction"]
        goals.append(
            _goal(
                f"{label}: at least 70% of the copy bandwidth at its byte floor",
                f"{100 * fraction:.0f}%",
                fraction >= 0.7,
            )
        )
        grads = mine["extra_peak_in_grads"]
        goals.append(
            _goal(
                f"{label}: peak memory above the inputs at most 1.01 logits gradients",
                "not measured" if grads is None else f"{grads:.3f}",
                None if grads is None else grads <= 1.01,
            )
        )
    return goals


def _linear_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {row["implementation"]: row for row in report["linear"]}
    if LINEAR not in rows or LIGER not in rows:
        return [_goal("linear loss at most 1.0x Liger's time and memory", "not measured", None)]
    ours, liger = rows[LINEAR], rows[LIGER]
    time_ratio = ours["median_s"] / liger["median_s"]
    goals = [
        _goal("linear loss: at most 1.0x Liger's time", f"{time_ratio:.2f}x", time_ratio <= 1.0)
    ]
    if ours["extra_peak_mib"] is None or liger["extra_peak_mib"] is None:
        goals.append(_goal("linear loss: at most 1.0x Liger's memory", "not measured", None))
    else:
        memory_ratio = ours["extra_peak_mib"] / max(liger["extra_peak_mib"], 1e-9)
        goals.append(
            _goal(
                "linear loss: at most 1.0x Liger's memory",
                f"{memory_ratio:.2f}x",
                memory_ratio <= 1.0,
            )
        )
    return goals


def _resources_goal(report: dict[str, Any]) -> dict[str, Any]:
    rows = report["resources"]
    if not rows:
        return _goal("Triton kernels for sm_90a: no spills, no stack frame", "not compiled", None)
    local = [row for row in rows if row["spill_stores"] or row["spill_loads"] or row["stack_frame"]]
    most = max(row["registers"] for row in rows)
    return _goal(
        "Triton kernels for sm_90a: no spills, no stack frame",
        f"{len(rows) - len(local)} of {len(rows)} variants without; at most {most} registers",
        not local,
    )


def _pallas_goal(report: dict[str, Any]) -> dict[str, Any]:
    pairs = []
    for row in report["speed"]:
        if row["implementation"] == PALLAS:
            xla = _find(report["speed"], XLA, (row["length"], row["vocab"]), row["targets_dtype"])
            if xla is not None:
                pairs.append(row["median_s"] / xla["median_s"])
    if not pairs:
        return _goal("Pallas at least as fast as XLA on the GPU", "not measured", None)
    return _goal(
        "Pallas at least as fast as XLA on the GPU",
        "Pallas/XLA time " + ", ".join(f"{ratio:.2f}" for ratio in pairs),
        max(pairs) <= 1.0,
    )


def _find(
    rows: Sequence[dict[str, Any]], name: str, shape: Sequence[int], targets: str
) -> dict[str, Any] | None:
    for row in rows:
        if (row["implementation"], row["length"], row["vocab"], row["targets_dtype"]) == (
            name,
            shape[-2],
            shape[-1],
            targets,
        ):
            return row
    return None


def goals(report: dict[str, Any], headline_shape: Sequence[int]) -> list[dict[str, Any]]:
    """Each goal of the issue, its measured value, and whether it is met (None: not measured).

    In a dry run only parity is judged: times and memory on the CPU say nothing of the GPU's.
    """
    measured = [
        *_headline_goals(report, headline_shape),
        *_linear_goals(report),
        _pallas_goal(report),
    ]
    if report["dry_run"]:
        measured = [{**goal, "met": None} for goal in measured]
    return [_parity_goal(report), _sync_goal(report), _resources_goal(report), *measured]


def draw(report: dict[str, Any], path: Path) -> None:
    """The speed rows, time and extra memory against S, one row of panels per targets dtype and
    vocabulary, by ``bench``'s plot."""
    gpu = report["environment"].get("gpu", {}).get("name", "the CPU")
    plot(report["speed"], path, f"forward+backward on {gpu}, {report['date']}", panel="panel")


def _stage_table(report: dict[str, Any]) -> str:
    columns = [
        ("stage", "<14", _value("stage")),
        ("status", "<8", _value("status")),
        ("seconds", ">8", _value("seconds", "{:.1f}")),
    ]
    return _fixed_width_table(report["stages"] + report["tests"], columns)


def _speed_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = [
        ("implementation", "<28", _value("implementation")),
        ("S", ">6", _value("length")),
        ("V", ">7", _value("vocab")),
        ("targets", "<9", _value("targets_dtype")),
        ("ms", ">8", lambda row: f"{1e3 * row['median_s']:.3f}"),
        ("x NeMo", ">7", _value("time_vs_nemo", "{:.2f}x")),
        (
            "copy bw",
            ">8",
            lambda row: (
                "n/a" if row.get("copy_fraction") is None else f"{100 * row['copy_fraction']:.0f}%"
            ),
        ),
        ("x grad", ">7", _value("extra_peak_in_grads", "{:.3f}")),
    ]
    return _fixed_width_table(rows, columns)


def summary(report: dict[str, Any]) -> str:
    """The short table printed last: stages, failing parity rows, speed, goals."""
    lines = [_stage_table(report), ""]
    failing = [row for row in report["parity"] if not row["ok"]]
    lines.append(
        f"parity: {len(report['parity']) - len(failing)} of {len(report['parity'])} rows ok"
    )
    for row in failing[:10]:
        keys = ("path", "shape", "dtype", "case", "reduction", "loss_error", "grad_error", "error")
        shown = [f"{key}={row[key]}" for key in keys if key in row]
        lines.append("  FAIL " + ", ".join(shown))
    for failure in report["failed"]:
        lines.append(f"  FAILED {failure}")
    if report["speed"]:
        lines += ["", _speed_table(report["speed"])]
    copy = report.get("copy")
    if copy:
        lines.append(f"copy: {copy['gb_per_s']:.0f} GB/s (bytes read + written)")
    for row in report["kernel_modes"]:
        fraction = row.get("copy_fraction")
        lines.append(
            f"mode {row['mode']:<42} {1e3 * row['median_s']:9.3f} ms "
            f"{row['floor_gb_per_s']:8.0f} GB/s at its floor"
            + ("" if fraction is None else f" ({100 * fraction:.0f}% of the copy)")
        )
    for name in ("linear", "targets"):
        for row in report[name]:
            memory = row["extra_peak_mib"]
            lines.append(
                f"{name}: {row['implementation']:<30} {1e3 * row['median_s']:9.2f} ms "
                f"{'n/a' if memory is None else f'{memory:9.0f} MiB'}"
            )
    difference = report.get("liger_gradient_difference")
    if difference:
        relative = ", ".join(f"{name} {value:.2e}" for name, value in difference.items())
        lines.append(f"linear: Liger's gradients from ours, relative norm: {relative}")
    lines.append("")
    for goal in report["goals"]:
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[goal["met"]]
        lines.append(f"{mark:<8} {goal['goal']}: {goal['value']}")
    return "\n".join(lines)


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _rst(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [headers, *rows]:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}"


def _or_na(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def tables(report: dict[str, Any]) -> str:
    """The record of a run for the README (Markdown) and ``docs/performance.rst`` (RST): what
    ran where, and the speed, kernel-mode, hidden-state and goal tables."""
    environment = report.get("environment", {})  # absent where the environment step failed
    versions = environment.get("versions", {})
    gpu = environment.get("gpu", {})
    software = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    where = (
        f"{report['date']}, commit {report.get('commit', 'unknown')}, "
        f"{gpu.get('name', 'no GPU (dry run)')}"
        f" ({environment.get('nvidia_smi', 'no nvidia-smi')}); {software}; "
        f"`{report['command']}`"
    )
    speed = [
        [
            row["implementation"],
            f"[1, {row['length']}, {row['vocab']}]",
            row["targets_dtype"],
            _ms(row["median_s"]),
            _or_na(row.get("time_vs_nemo"), "{:.2f}x"),
            _or_na(row.get("copy_fraction"), "{:.0%}"),
            _or_na(row.get("extra_peak_in_grads"), "{:.3f}"),
        ]
        for row in report["speed"]
    ]
    speed_headers = [
        "implementation",
        "logits",
        "targets",
        "ms",
        "x NeMo kernel",
        "copy bw",
        "x grad",
    ]
    modes = [
        [
            row["mode"],
            _ms(row["median_s"]),
            f"{row['floor_gb_per_s']:.0f}",
            _or_na(row.get("copy_fraction"), "{:.0%}"),
        ]
        for row in report["kernel_modes"]
    ]
    mode_headers = ["kernel mode", "ms", "GB/s at its floor", "of the copy"]
    hidden = [
        [
            row["implementation"],
            row["case"],
            _ms(row["median_s"]),
            _or_na(row["extra_peak_mib"], "{:.0f}"),
        ]
        for row in report["linear"] + report["targets"]
    ]
    hidden_headers = ["implementation", "case", "ms", "extra MiB"]
    goal_rows = [
        [goal["goal"], goal["value"], {True: "met", False: "not met", None: "n/a"}[goal["met"]]]
        for goal in report["goals"]
    ]
    goal_headers = ["goal", "measured", ""]
    parts = [f"Run: {where}", ""]
    for render in (_markdown, _rst):
        for headers, rows in (
            (speed_headers, speed),
            (mode_headers, modes),
            (hidden_headers, hidden),
            (goal_headers, goal_rows),
        ):
            if rows:
                parts += [render(headers, rows), ""]
    return "\n".join(parts)
