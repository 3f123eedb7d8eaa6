"""The command line (``python -m softce_multi``), its ``check`` command, and the code examples
of the README and the getting-started page."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import softce_multi
from softce_multi import __main__ as cli
from softce_multi import testing
from softce_multi._cli import bench
from softce_multi._cli import check as _check
from softce_multi._cli._common import installed
from softce_multi._cli.bench import command as bench_command
from softce_multi._cli.bench import report as bench_report

ROOT = Path(__file__).resolve().parents[1]
SMALL_SHAPE = ["--shape", "2", "8", "33"]


def table_rows(output: str) -> list[list[str]]:
    """Return the cells of the table rows (those ending in PASS or FAIL) of ``check``'s output."""
    return [line.split() for line in output.splitlines() if line.endswith(("PASS", "FAIL"))]


def run_check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = _check.main(argv)
    return status, capsys.readouterr().out


def test_check_command_passes_on_every_installed_cpu_backend() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "softce_multi", "check", *SMALL_SHAPE],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    expected = {backend.library for backend in testing.backends() if backend.device == "cpu"}
    assert {"numpy"} <= expected <= {row[0] for row in rows}
    assert all(row[-1] == "PASS" for row in rows), result.stdout
    assert "check: PASS" in result.stdout


def test_check_runs_each_requested_dtype_a_backend_supports(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, output = run_check([*SMALL_SHAPE, "--backend", "numpy", "--dtype", "float64"], capsys)

    assert status == 0
    assert [row[:3] for row in table_rows(output)] == [["numpy", "cpu", "float64"]]


def test_check_skips_a_dtype_the_backend_lacks_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*SMALL_SHAPE, "--backend", "numpy", "--dtype", "bfloat16", "float32"]
    status, output = run_check(argv, capsys)

    assert status == 0
    assert [row[2] for row in table_rows(output)] == ["float32"]
    assert "numpy: bfloat16 skipped" in output


def test_check_fails_when_the_loss_is_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exact = softce_multi.masked_soft_cross_entropy_with_grad

    def off_by_1e_4(*args: object, **kwargs: object) -> tuple[object, object]:
        loss, grad = exact(*args, **kwargs)
        return loss * (1 + 1e-4), grad

    monkeypatch.setattr(softce_multi, "masked_soft_cross_entropy_with_grad", off_by_1e_4)
    status, output = run_check([*SMALL_SHAPE, "--backend", "numpy"], capsys)

    assert status == 1
    assert table_rows(output)[0][-1] == "FAIL"
    assert "check: FAIL" in output


def test_check_fails_when_the_gradient_is_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exact = softce_multi.masked_soft_cross_entropy_with_grad

    def gradient_off_by_1e_4(*args: object, **kwargs: object) -> tuple[object, object]:
        loss, grad = exact(*args, **kwargs)
        return loss, grad * (1 + 1e-4)

    monkeypatch.setattr(softce_multi, "masked_soft_cross_entropy_with_grad", gradient_off_by_1e_4)
    status, output = run_check([*SMALL_SHAPE, "--backend", "numpy"], capsys)

    assert status == 1
    assert table_rows(output)[0][-1] == "FAIL"


def test_check_fails_and_reports_the_error_when_a_backend_raises(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        msg = "broken on purpose"
        raise RuntimeError(msg)

    monkeypatch.setattr(softce_multi, "masked_soft_cross_entropy_with_grad", broken)
    status, output = run_check([*SMALL_SHAPE, "--backend", "numpy"], capsys)

    assert status == 1
    assert table_rows(output)[0][-1] == "FAIL"
    assert "RuntimeError: broken on purpose" in output


def test_check_fails_a_nan_loss(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exact = softce_multi.masked_soft_cross_entropy_with_grad

    def nan_loss(*args: object, **kwargs: object) -> tuple[object, object]:
        loss, grad = exact(*args, **kwargs)
        return loss * float("nan"), grad

    monkeypatch.setattr(softce_multi, "masked_soft_cross_entropy_with_grad", nan_loss)
    status, output = run_check([*SMALL_SHAPE, "--backend", "numpy"], capsys)

    assert status == 1
    assert table_rows(output)[0][-1] == "FAIL"


def test_check_names_each_backend_by_its_library_and_device(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("array_api_strict")
    status, output = run_check([*SMALL_SHAPE, "--backend", "array-api-strict"], capsys)

    assert status == 0, output
    assert [row[:2] + row[-1:] for row in table_rows(output)] == [
        ["array_api_strict", "cpu", "PASS"]
    ]


def test_check_selects_a_library_by_its_name(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    status, output = run_check([*SMALL_SHAPE, "--backend", "torch", "--dtype", "float32"], capsys)

    assert status == 0, output
    assert [row[:3] for row in table_rows(output)] == [
        ["torch", backend.device, "float32"]
        for backend in testing.backends()
        if backend.library == "torch"
    ]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_check_measures_a_16_bit_gradient_in_ulps_at_its_upstream(
    dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """On torch the gradient is that of ``upstream * loss``, and a 16-bit one is measured in
    ulps beside the plain formula's: within the margin, it passes."""
    pytest.importorskip("torch")
    argv = [*SMALL_SHAPE, "--backend", "torch-cpu", "--dtype", dtype, "--upstream", "0.131"]
    status, output = run_check(argv, capsys)

    assert status == 0, output
    [row] = table_rows(output)
    assert row[2:4] == [dtype, "0.131"]
    ours, formula = float(row[7]), float(row[8].strip("()"))
    assert ours <= formula + testing.ULP_MARGIN


def test_check_fails_a_16_bit_gradient_rounded_twice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bfloat16 gradient made for a unit upstream and then scaled in bfloat16 is within the
    gradient tolerance, but about half an ulp further than the formula's: check fails it."""
    torch = pytest.importorskip("torch")
    upstream = 0.131

    def rounded_twice(backend: object, scale: float) -> object:
        def step(logits: Any, target: Any, mask: Any) -> tuple[Any, Any]:
            leaf = logits.detach().float().requires_grad_(True)
            loss = softce_multi.reference.masked_soft_cross_entropy(leaf, target, mask)
            loss.backward()
            assert leaf.grad is not None
            unit = leaf.grad.to(torch.bfloat16)
            return loss.detach(), unit * torch.tensor(scale, dtype=torch.bfloat16)

        return step

    monkeypatch.setattr(_check, "_loss_and_grad", rounded_twice)
    argv = ["--shape", "4", "64", "500", "--backend", "torch-cpu", "--dtype", "bfloat16"]
    status, output = run_check([*argv, "--upstream", str(upstream)], capsys)

    assert status == 1
    [row] = table_rows(output)
    assert float(row[6]) <= _check.grad_tolerance("bfloat16")  # within the plain tolerance
    assert float(row[7]) > float(row[8].strip("()")) + testing.ULP_MARGIN
    assert row[-1] == "FAIL"


def test_check_rejects_a_non_positive_shape(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _check.main(["--shape", "2", "0", "33"])

    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_check_uses_the_numpy_oracle_when_torch_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_check, "installed", lambda module: module != "torch")

    oracle = _check.select_oracle("auto")

    assert oracle.compute is _check.numpy_reference
    assert "PyTorch is not installed" in oracle.description


def test_numpy_oracle_agrees_with_the_torch_reference_in_float64() -> None:
    pytest.importorskip("torch", reason="the PyTorch reference needs torch")
    inputs = _check.make_inputs((3, 5, 40), seed=1)
    logits = inputs.logits.astype(np.float64)
    target = inputs.target_probs.astype(np.float64)

    arguments = (logits, target, inputs.position_mask, 0.3)
    numpy_loss, numpy_grad = _check.numpy_reference(*arguments)
    torch_loss, torch_grad = _check.torch_reference(*arguments)

    assert numpy_loss == pytest.approx(torch_loss, rel=1e-12)
    assert _check.gradient_error(numpy_grad, torch_grad) < 1e-12


def test_cli_passes_the_remaining_arguments_to_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    received = []
    demo = types.ModuleType("softce_multi._cli.demo")
    demo.main = lambda argv: received.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "softce_multi._cli.demo", demo)

    status = cli.main(["demo", "--steps", "3", "--help", "extra"])

    assert status == 7
    assert received == [["--steps", "3", "--help", "extra"]]


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])

    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def code_examples(path: Path) -> list[object]:
    """Return the Python code blocks of a Markdown or reStructuredText file as pytest params."""
    text = path.read_text()
    if path.suffix == ".md":
        blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    else:
        blocks = [
            re.sub(r"^   ", "", block, flags=re.MULTILINE)
            for block in re.findall(
                r"^\.\. code-block:: python\n\n((?:   .*\n|\n)+)", text, flags=re.MULTILINE
            )
        ]
    return [
        pytest.param(block, id=f"{path.name}-{number}")
        for number, block in enumerate(blocks, start=1)
    ]


EXAMPLES = code_examples(ROOT / "README.md") + code_examples(ROOT / "docs" / "getting_started.rst")


def test_the_readme_and_getting_started_page_have_code_examples() -> None:
    names = {example.id.split("-")[0] for example in EXAMPLES}  # type: ignore[attr-defined]
    assert names == {"README.md", "getting_started.rst"}


@pytest.mark.parametrize("code", EXAMPLES)
def test_documentation_example_runs(code: str) -> None:
    for library in ("torch", "jax"):
        if re.search(rf"^(import|from) {library}\b", code, flags=re.MULTILINE):
            pytest.importorskip(library, reason=f"this example uses {library}")
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})


# --- bench ---------------------------------------------------------------------------------

TINY_BENCH = ["--lengths", "4", "8", "--vocab", "50", "--repeats", "3", "--no-memory"]


@pytest.fixture(scope="module")
def bench_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    pytest.importorskip("matplotlib", reason="the bench plot needs matplotlib (the bench extra)")
    folder = tmp_path_factory.mktemp("bench")
    outputs = ["--json", str(folder / "rows.json"), "--plot", str(folder / "plot.png")]
    status = bench.main([*TINY_BENCH, "--dtypes", "float32", "bfloat16", *outputs])
    assert status == 0
    return json.loads((folder / "rows.json").read_text()), folder / "plot.png"


def test_bench_measures_or_skips_every_case_at_every_length_and_dtype(
    bench_output: tuple[dict[str, Any], Path],
) -> None:
    report, _ = bench_output
    measured = {(r["implementation"], r["dtype"], r["length"]) for r in report["rows"]}
    skipped = {(s["implementation"], s["dtype"]) for s in report["skipped"]}
    for case in bench.CASES:
        for dtype in ("float32", "bfloat16"):
            at_lengths = {(case.name, dtype, length) for length in (4, 8)}
            assert at_lengths <= measured or (case.name, dtype) in skipped


@pytest.mark.skipif(
    not testing.is_installed("jax"), reason="optax's case is a jax one; jax not installed"
)
def test_bench_skips_a_case_whose_library_is_missing_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "installed", lambda module: module != "optax")
    assert bench.main([*TINY_BENCH, "--lengths", "4", "--dtypes", "float32"]) == 0
    output = capsys.readouterr().out
    assert "skipped optax[jax.jit] (float32): not installed: optax" in output
    assert "softce_multi[numpy]" in output


def test_bench_reports_times_against_nemos_formula(
    bench_output: tuple[dict[str, Any], Path],
) -> None:
    rows = bench_output[0]["rows"]
    nemo = [row for row in rows if row["implementation"] == bench.BASELINE]
    if not nemo:
        pytest.skip("NeMo's formula needs torch")
    assert all(row["time_vs_nemo"] == 1.0 for row in nemo)
    for row in rows:
        baseline = next(
            r for r in nemo if (r["dtype"], r["length"]) == (row["dtype"], row["length"])
        )
        assert row["time_vs_nemo"] == pytest.approx(row["median_s"] / baseline["median_s"])


def test_bench_draws_a_png_plot(bench_output: tuple[dict[str, Any], Path]) -> None:
    assert bench_output[1].read_bytes().startswith(b"\x89PNG")


def test_bench_plot_has_a_legend_in_each_panel_and_a_marker_per_implementation(
    bench_output: tuple[dict[str, Any], Path],
) -> None:
    import matplotlib.pyplot as plt

    rows = bench_output[0]["rows"]
    figure = bench_report.figure_of(rows, "title")
    try:
        markers: dict[str, str] = {}
        dtypes = ["float32", "float32", "bfloat16", "bfloat16"]
        for axis, dtype in zip(figure.axes, dtypes, strict=True):
            names = list(dict.fromkeys(r["implementation"] for r in rows if r["dtype"] == dtype))
            legend = axis.get_legend()
            assert legend is not None
            assert [text.get_text() for text in legend.get_texts()] == names
            for line in axis.get_lines():
                assert markers.setdefault(line.get_label(), line.get_marker()) == line.get_marker()
        assert len(set(markers.values())) == len(markers)
    finally:
        plt.close(figure)


def test_bench_lists_a_framework_it_skips_from_hidden_states(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(framework: str, device: str) -> str | None:
        return "jax not installed" if framework == "jax" else None

    monkeypatch.setattr(bench_command, "unavailable", unavailable)
    monkeypatch.setattr(bench, "run_from_hidden", lambda *args, **kwargs: [])

    argv = ["--linear", "--rows", "16", "--hidden", "4", "--vocab", "10", "--repeats", "3"]
    assert bench.main(argv) == 0

    assert "skipped jax (float32): jax not installed" in capsys.readouterr().out.splitlines()


def test_each_kernel_modes_byte_floor_counts_the_arrays_it_reads_and_writes() -> None:
    # [1, 3, 5] bfloat16 logits (2 bytes), float32 targets and targets gradient (4 bytes).
    floors = {
        mode: bench.mode_floor_bytes(mode, (1, 3, 5), "bfloat16") for mode in bench.KERNEL_MODES
    }

    assert floors == {
        "forward only": 15 * (2 + 4),
        "forward+gradient": 15 * (2 + 4 + 2),
        "backward logits": 15 * (2 + 4 + 2),
        "backward targets": 15 * (2 + 4),
        "backward both": 15 * (2 + 4 + 2 + 4),
    }


def test_kernel_mode_bandwidth_is_the_byte_floor_over_the_median_time() -> None:
    pytest.importorskip("torch")
    rows = bench.kernel_mode_rows((1, 6, 40), "float32", seed=0, repeats=3, device="cpu")

    assert [row["mode"] for row in rows] == list(bench.KERNEL_MODES)
    for row in rows:
        assert row["floor_bytes"] == bench.mode_floor_bytes(row["mode"], (1, 6, 40), "float32")
        assert row["gb_per_s"] == pytest.approx(row["floor_bytes"] / row["median_s"] / 1e9)
    assert "backward both" in bench.format_kernel_modes(rows)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_forward_gradient_mode_writes_the_logits_gradient_in_every_dtype(dtype: str) -> None:
    # Autograd's forward pass writes no gradient for 16-bit logits: the mode must not time it.
    pytest.importorskip("torch")
    from softce_multi._cli.bench.cases import make_inputs
    from softce_multi._cli.bench.modes import _mode_step

    logits, targets, mask = make_inputs("torch", (1, 6, 40), dtype, 0, "cpu")

    result = _mode_step(bench.KERNEL_MODES["forward+gradient"], logits, targets, mask)()

    loss, grad = result
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    assert loss.ndim == 0


@pytest.mark.parametrize("name", [case.name for case in bench.CASES])
def test_each_bench_case_computes_the_gradient_of_its_loss(name: str) -> None:
    case = next(case for case in bench.CASES if case.name == name)
    missing = [
        lib for lib in (case.framework, *case.requires) if lib != "numpy" and not installed(lib)
    ]
    if missing:
        pytest.skip(f"{name} needs {missing}")
    logits, target, mask = bench.make_inputs(case.framework, (2, 5, 40), "float32", seed=3)
    result = case.make("cpu")(logits, target, mask)
    gradient = result[1] if isinstance(result, tuple) else result  # JAX and NumPy: (loss, grad)
    weights = np.asarray(mask).reshape(2, 5)
    expected = _check.numpy_reference(
        np.asarray(logits, dtype=np.float64), np.asarray(target, dtype=np.float64), weights
    )[1]
    if name.startswith("SpecForge"):  # its mean runs over every position, padding included
        expected *= weights.sum() / weights.size
    np.testing.assert_allclose(np.asarray(gradient, dtype=np.float64), expected, atol=1e-6)


@pytest.mark.skipif(
    not (testing.is_installed("torch") or testing.is_installed("jax")),
    reason="bench --targets runs on torch or jax, and neither is installed",
)
def test_bench_compares_targets_from_hidden_with_the_materialised_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench --targets`` times both paths of each framework and measures their extra memory
    in ``[N, V_draft]`` float32 outputs (torch's measured in this process, to save a start)."""
    monkeypatch.setattr(bench, "_memory_from_hidden", bench.peak_extra_memory_from_hidden)
    sizes = ["--rows", "24", "--hidden", "4", "--vocab", "6", "--target-vocab", "20"]
    report = tmp_path / "targets.json"

    assert bench.main(["--targets", *sizes, "--repeats", "3", "--json", str(report)]) == 0

    rows = json.loads(report.read_text())
    frameworks = {name for name in ("torch", "jax") if installed(name)}
    assert {(row["framework"], row["implementation"]) for row in rows} == {
        (framework, path) for framework in frameworks for path in ("from_hidden", "materialised")
    }
    for row in rows:
        assert (row["rows"], row["hidden"], row["vocab"], row["target_vocab"]) == (24, 4, 6, 20)
        assert row["comparison"] == "targets" and row["dtype"] == "float32"
        assert row["median_s"] > 0 and row["extra_peak_mib"] >= 0
        assert row["extra_peak_in_logits"] == pytest.approx(
            row["extra_peak_mib"] * bench.MIB / (24 * 6 * 4)
        )


def test_check_runs_without_pytest():
    """``python -m softce_multi check`` (the first step of ``nox -s demo``) needs no test
    dependency: pytest is made unimportable in the child process."""
    code = (
        "import sys\n"
        "sys.modules['pytest'] = None\n"
        "from softce_multi._cli import main\n"
        "sys.exit(main(['check', '--shape', '2', '8', '50']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
