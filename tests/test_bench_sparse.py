"""``python -m softce_multi bench --sparse K`` and ``--linear --sparse K``: the losses of sparse
targets timed against the dense loss of the scattered targets, tiny."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from softce_multi._cli import bench
from softce_multi._cli._common import installed
from softce_multi._cli.bench import sparse as bench_sparse
from softce_multi.testing import dense_targets

FRAMEWORKS = [name for name in ("numpy", "torch", "jax") if name == "numpy" or installed(name)]


@pytest.fixture
def memory_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy's and torch's memory measured in this process, to save the starts."""
    monkeypatch.setattr(bench_sparse, "memory_of", bench_sparse.peak_extra_memory_sparse)


def run_bench(argv: list[str], tmp_path: Path) -> dict[str, Any]:
    report = tmp_path / "sparse.json"
    assert bench.main([*argv, "--repeats", "3", "--json", str(report)]) == 0
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def check_rows(rows: list[dict[str, Any]], sizes: dict[str, Any], dtypes: list[str]) -> None:
    """Both paths of each framework at each dtype it runs, with their times and extra memory
    in float32 ``[N, V]`` buffers beyond the gradients, and the sparse time over the dense."""
    runs = {(framework, dtype) for framework in FRAMEWORKS for dtype in dtypes}
    runs -= {("numpy", dtype) for dtype in dtypes if dtype not in ("float32", "float64")}
    assert {(row["framework"], row["dtype"], row["implementation"]) for row in rows} == {
        (framework, dtype, path) for framework, dtype in runs for path in ("sparse", "dense")
    }
    logits_bytes = sizes["rows"] * sizes["vocab"] * 4
    gradient_bytes = bench_sparse.gradient_bytes
    inputs = {
        (row["framework"], row["dtype"], row["implementation"]): row["inputs_mib"] for row in rows
    }
    for framework, dtype in runs:
        # int32 ids against float32 dense targets; the other inputs are the same.
        difference = inputs[framework, dtype, "dense"] - inputs[framework, dtype, "sparse"]
        assert difference * bench.MIB == sizes["rows"] * (sizes["vocab"] - sizes["top_k"]) * 4
    for row in rows:
        assert {key: row[key] for key in sizes} == sizes
        assert row["median_s"] > 0 and row["time_vs_dense"] > 0
        if row["implementation"] == "dense":
            assert row["time_vs_dense"] == 1
        extra = row["extra_peak_mib"] * bench.MIB
        assert row["extra_peak_in_logits"] == pytest.approx(extra / logits_bytes)
        if row["framework"] == "jax":
            assert row["peak_rise_mib"] is None and extra >= 0
        else:
            shape = bench_sparse.SparseSizes(**{field: row[field] for field in sizes})
            gradients = row["peak_rise_mib"] * bench.MIB - extra
            assert gradients == pytest.approx(gradient_bytes(shape, row["dtype"]))


@pytest.mark.skipif(
    not (installed("torch") and installed("jax")), reason="its report lists the torch and jax rows"
)
def test_bench_sparse_times_the_sparse_loss_of_logits_against_the_dense_loss(
    tmp_path: Path, memory_in_this_process: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--sparse", "3", "--lengths", "5", "7", "--vocab", "12", "--dtypes", "float32"]
    report = run_bench([*argv, "bfloat16"], tmp_path)

    for length in (5, 7):
        rows = [row for row in report["rows"] if row["rows"] == length]
        sizes = {"rows": length, "vocab": 12, "top_k": 3, "hidden": None, "bias": False}
        check_rows(rows, sizes, ["float32", "bfloat16"])
    assert report["skipped"] == [
        {"implementation": "numpy", "dtype": "bfloat16", "reason": "no bfloat16"}
    ]
    output = capsys.readouterr().out
    assert "masked_soft_cross_entropy of [1, N, 12] logits" in output
    assert "K = 3" in output and "x dense" in output
    assert "skipped numpy (bfloat16): no bfloat16" in output


@pytest.mark.skipif(
    not (installed("torch") and installed("jax")), reason="its report lists the torch and jax rows"
)
def test_bench_linear_sparse_times_the_sparse_linear_loss_against_the_dense_one(
    tmp_path: Path, memory_in_this_process: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--linear", "--sparse", "4", "--rows", "9", "--hidden", "5", "--vocab", "11"]
    report = run_bench([*argv, "--no-bias", "--dtypes", "float32", "bfloat16"], tmp_path)

    sizes = {"rows": 9, "vocab": 11, "top_k": 4, "hidden": 5, "bias": False}
    check_rows(report["rows"], sizes, ["float32"])
    assert report["skipped"] == []
    output = capsys.readouterr().out
    assert "linear_masked_soft_cross_entropy, H = 5, V = 11, no bias" in output


def test_bench_linear_sparse_has_a_bias_by_default_and_measures_no_memory_without_memory(
    tmp_path: Path,
) -> None:
    argv = ["--linear", "--sparse", "2", "--rows", "6", "--hidden", "3", "--vocab", "7"]
    report = run_bench([*argv, "--no-memory"], tmp_path)

    assert {row["dtype"] for row in report["rows"]} == {"float32"}
    for row in report["rows"]:
        assert row["bias"] is True
        assert row["extra_peak_mib"] is None or row["framework"] == "jax"
        assert row["peak_rise_mib"] is None


def test_bench_measures_numpy_memory_in_a_fresh_process() -> None:
    sizes = bench_sparse.SparseSizes(rows=64, vocab=4096, top_k=8)
    rise = bench_sparse.peak_extra_memory_in_fresh_process("numpy", "dense", sizes, "float32", 0)
    assert rise is not None
    assert rise >= bench_sparse.gradient_bytes(sizes, "float32")


@pytest.mark.parametrize("linear", [False, True])
def test_bench_sparse_inputs_stand_for_their_dense_targets(linear: bool) -> None:
    """Distinct ids in the vocabulary, probabilities summing to 1, and dense targets that are
    those scattered; each path's arrays equal those of both paths."""
    sizes = bench_sparse.SparseSizes(rows=50, vocab=20, top_k=20, hidden=3 if linear else None)
    both = bench_sparse.sparse_inputs(sizes, seed=1)
    ids = both.ids.reshape(50, 20)
    assert ids.dtype == np.int32
    assert (np.sort(ids, axis=-1) == np.arange(20)).all()
    assert np.allclose(both.probs.sum(-1), 1)
    assert both.dense.shape == (*both.mask.shape, 20)
    assert np.array_equal(both.dense, dense_targets(both.ids, both.probs, 20).astype(np.float32))
    for path, kept, absent in [("sparse", "ids", "dense"), ("dense", "dense", "ids")]:
        alone = bench_sparse.sparse_inputs(sizes, seed=1, path=path)
        assert getattr(alone, absent) is None
        assert np.array_equal(getattr(alone, kept), getattr(both, kept))
        for mine, theirs in zip(alone.differentiated, both.differentiated, strict=True):
            assert np.array_equal(mine, theirs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sparse", "0"], "--sparse"),
        (["--sparse", "7", "--vocab", "6"], "--sparse 7 is more than --vocab 6"),
        (["--targets", "--sparse", "3"], "--targets does not go with --sparse"),
        (["--sparse", "3", "--rows", "8"], "--rows does not go with --sparse"),
        (["--sparse", "3", "--hidden", "8"], "--hidden does not go with --sparse"),
        (["--sparse", "3", "--no-bias"], "--no-bias does not go with --sparse"),
        (["--sparse", "3", "--top-k", "2"], "--top-k does not go with --sparse"),
        (["--sparse", "3", "--device", "cuda"], "--device cuda does not go with --sparse"),
        (["--linear", "--sparse", "3", "--lengths", "8"], "--lengths does not go with --linear"),
        (
            ["--linear", "--sparse", "3", "--frameworks", "torch"],
            "--frameworks does not go with --linear --sparse",
        ),
        (
            ["--linear", "--sparse", "3", "--autocast", "bfloat16"],
            "--autocast does not go with --linear --sparse",
        ),
        (
            ["--linear", "--sparse", "3", "--reduction", "sum"],
            "--reduction does not go with --linear --sparse",
        ),
        (
            ["--linear", "--sparse", "3", "--target-vocab", "9"],
            "--target-vocab does not go with --linear --sparse",
        ),
    ],
)
def test_bench_refuses_a_sparse_run_it_cannot_do(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
