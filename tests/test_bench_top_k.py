"""``python -m softce_multi bench --targets --top-k K``: the top-k targets from hidden states,
timed against the dense targets from hidden states and the materialised path, tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softce_multi._cli import bench
from softce_multi._cli._common import installed

SIZES = ["--rows", "24", "--hidden", "4", "--vocab", "6", "--target-vocab", "20"]


@pytest.mark.skipif(
    not (installed("torch") or installed("jax")),
    reason="bench --targets runs on torch or jax, and neither is installed",
)
def test_bench_top_k_adds_a_path_timed_against_the_dense_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each framework gets a ``top_k`` row beside the two of ``--targets``, with its time over
    ``from_hidden``'s and its extra memory in ``[N, V_draft]`` float32 buffers (torch's
    measured in this process, to save a start)."""
    monkeypatch.setattr(bench, "_memory_from_hidden", bench.peak_extra_memory_from_hidden)
    report = tmp_path / "top_k.json"

    argv = ["--targets", "--top-k", "3", *SIZES, "--repeats", "3", "--json", str(report)]
    assert bench.main(argv) == 0

    rows = json.loads(report.read_text())
    frameworks = [name for name in ("torch", "jax") if installed(name)]
    paths = ("from_hidden", "top_k", "materialised")
    assert {(row["framework"], row["implementation"]) for row in rows} == {
        (framework, path) for framework in frameworks for path in paths
    }
    for row in rows:
        assert (row["rows"], row["vocab"], row["target_vocab"], row["top_k"]) == (24, 6, 20, 3)
        assert row["median_s"] > 0 and row["extra_peak_mib"] >= 0
        assert row["extra_peak_in_logits"] == pytest.approx(
            row["extra_peak_mib"] * bench.MIB / (24 * 6 * 4)
        )
        assert ("time_vs_own" in row) == (row["implementation"] == "top_k")
    output = capsys.readouterr().out
    assert "prepare_top_k_targets_from_hidden (top_k, k = 3)" in output
    for framework in frameworks:
        assert f"top_k, {framework}, N = 24: " in output
        assert "x the time of from_hidden" in output


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--top-k", "3"], "--top-k goes with --targets"),
        (["--linear", "--top-k", "3"], "--top-k does not go with --linear"),
        (["--targets", "--top-k", "7", "--vocab", "6"], "--top-k 7 is more than --vocab 6"),
        (["--targets", "--top-k", "0"], "--top-k"),
    ],
)
def test_bench_refuses_a_top_k_it_cannot_run(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
