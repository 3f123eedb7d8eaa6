"""bench's busy-core mode: a spinning process that keeps one core busy while cases are timed,
the rows timed with and without it, and the table that shows them side by side."""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import pytest

from softce_multi._cli.bench import measure, report, sweep
from softce_multi._cli.bench.cases import BASELINE, case_named

pytest.importorskip("torch")


def test_busy_core_spins_on_one_of_our_cpus_until_the_block_ends():
    before = os.times()

    with measure.busy_core() as cpu:
        time.sleep(0.5)

    after = os.times()
    spun = (after.children_user + after.children_system) - (
        before.children_user + before.children_system
    )
    if hasattr(os, "sched_getaffinity"):
        assert cpu in os.sched_getaffinity(0)
    # The spinner is killed and reaped on exit: its CPU time counts as a finished child's. On a
    # loaded machine it gets less than the half second it ran for.
    assert spun > 0.05


def test_busy_core_kills_the_spinner_when_the_block_raises(monkeypatch):
    started = []
    popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(measure.subprocess, "Popen", recording_popen)

    with pytest.raises(KeyError), measure.busy_core():
        assert started[0].poll() is None  # spinning
        raise KeyError("inside")

    assert started[0].poll() is not None


@pytest.mark.skipif(not hasattr(os, "getloadavg"), reason="no load average here")
def test_load_average_is_the_one_minute_load():
    load = measure.load_average()

    assert load is not None and load >= 0


def options(*, busy_core: bool) -> argparse.Namespace:
    return argparse.Namespace(
        dtypes=["float32"],
        lengths=[4],
        vocab=50,
        repeats=3,
        seed=0,
        device="cpu",
        memory=False,
        busy_core=busy_core,
    )


CASES = [case_named("softce_multi[torch]"), case_named(BASELINE)]


def test_the_sweep_times_each_case_idle_and_with_a_busy_core():
    rows, skipped = sweep.run(options(busy_core=True), CASES, lambda library: True)

    assert skipped == []
    assert [(row["implementation"], row["busy_core"]) for row in rows] == [
        ("softce_multi[torch]", False),
        (BASELINE, False),
        ("softce_multi[torch]", True),
        (BASELINE, True),
    ]
    for row in rows:
        assert row["median_s"] > 0
        assert "load_1min" in row


def test_without_the_option_the_sweep_times_each_case_once():
    rows, _ = sweep.run(options(busy_core=False), CASES, lambda library: True)

    assert [row["busy_core"] for row in rows] == [False, False]


def test_the_report_pairs_the_idle_and_busy_rows(capsys):
    rows = [
        {
            "implementation": name,
            "dtype": "float32",
            "length": 8,
            "median_s": seconds,
            "time_vs_nemo": ratio,
            "time_vs_peer": None,
            "extra_peak_mib": None,
            "extra_peak_in_grads": None,
            "busy_core": busy,
            "load_1min": load,
        }
        for name, seconds, ratio, busy, load in [
            ("softce_multi[torch]", 0.1, 0.3, False, 0.5),
            (BASELINE, 0.3, 1.0, False, 0.5),
            ("softce_multi[torch]", 0.2, 0.4, True, 1.5),
            (BASELINE, 0.5, 1.0, True, 1.5),
        ]
    ]

    pairs = report.side_by_side(rows)
    report.print_sweep(rows, vocab=50, device="cpu", repeats=3)

    assert [(pair["implementation"], pair["busy_median_s"]) for pair in pairs] == [
        ("softce_multi[torch]", 0.2),
        (BASELINE, 0.5),
    ]
    printed = capsys.readouterr().out
    side_by_side = printed[printed.index("idle s") :]
    assert "0.30x" in side_by_side and "0.40x" in side_by_side
    assert "0.50" in side_by_side and "1.50" in side_by_side


def test_the_busy_core_flag_times_each_case_twice_from_the_command_line(capsys):
    from softce_multi._cli import bench

    arguments = ["--lengths", "4", "--vocab", "8", "--repeats", "3", "--no-memory"]
    assert bench.main([*arguments, "--dtypes", "float32", "--busy-core"]) == 0

    output = capsys.readouterr().out
    assert "with one core kept busy" in output
    assert "busy s" in output


@pytest.mark.parametrize("mode", [["--sparse", "2"], ["--linear"], ["--targets"]])
def test_the_busy_core_flag_is_refused_with_the_other_modes(mode, capsys):
    from softce_multi._cli import bench

    with pytest.raises(SystemExit) as raised:
        bench.main(["--vocab", "8", "--busy-core", *mode])

    assert raised.value.code == 2
    assert "--busy-core does not go with" in capsys.readouterr().err
