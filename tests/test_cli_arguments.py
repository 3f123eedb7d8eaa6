"""The command line without its optional extras (tqdm, matplotlib), and its refusal of mistaken
arguments: one line from argparse and exit status 2, before anything is measured, never a
traceback."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from softce_multi import testing
from softce_multi._cli import _common, bench, demo
from softce_multi._cli import check as _check
from softce_multi._cli.device_check import command as device_check

ROOT = Path(__file__).resolve().parents[1]
TINY_BENCH = ["--lengths", "4", "--vocab", "8", "--repeats", "3", "--no-memory"]


def run_cli(
    arguments: Sequence[str], *, unimportable: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m softce_multi ARGUMENTS`` in a fresh process in which the modules
    ``unimportable`` cannot be imported, as if they were not installed."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({list(unimportable)!r}))\n"
        "from softce_multi._cli import main\n"
        f"sys.exit(main({list(arguments)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )


def assert_refused(result: subprocess.CompletedProcess[str], command: str, message: str) -> None:
    """``command`` exited with argparse's status 2 and ``message`` as its one line of error,
    without a traceback and before printing any result."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == f"python -m softce_multi {command}: error: {message}"
    assert result.stdout == ""


def refusal(
    argv: list[str], main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]
) -> str:
    """The last line of error with which the command's ``main(argv)`` exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.fixture
def nothing_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make bench fail the test if it starts measuring."""

    def measure(*args: object, **kwargs: object) -> None:
        msg = "bench started measuring before refusing its arguments"
        raise AssertionError(msg)

    monkeypatch.setattr(bench, "run", measure)
    monkeypatch.setattr(bench, "run_from_hidden", measure)


# --- without tqdm ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "bench", "check"])
def test_help_needs_no_tqdm(command: str) -> None:
    result = run_cli([command, "--help"], unimportable=["tqdm"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m softce_multi {command}")
    assert result.stderr == ""


def test_demo_runs_without_tqdm() -> None:
    pytest.importorskip("torch", reason="the torch demo needs torch")
    code = (
        "import sys\n"
        "sys.modules['tqdm'] = None\n"
        "from softce_multi._cli.demo import DemoConfig, run\n"
        "run(DemoConfig(steps=2, log_every=1, train_sequences=64, eval_sequences=8))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert "step 2/2  loss" in result.stdout
    assert "Traceback" not in result.stderr


def test_bench_runs_without_tqdm_printing_plain_progress_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    numpy_cases = [case for case in bench.CASES if case.framework == "numpy"]
    monkeypatch.setattr(bench, "CASES", numpy_cases)

    assert bench.main([*TINY_BENCH, "--dtypes", "float32"]) == 0

    output = capsys.readouterr()
    assert "softce_multi[numpy]" in output.out
    assert output.err.splitlines()[0] == "[0/2 cases] float32 N=4: timing"
    assert "\r" not in output.err


def test_progress_bar_is_plain_lines_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)

    assert isinstance(_common.progress_bar(3, "case", io.StringIO()), _common.ProgressLines)


def test_progress_lines_print_each_status_after_the_count_done() -> None:
    out = io.StringIO()
    progress = _common.ProgressLines(2, "step", out, min_interval=0)

    progress.set_postfix_str("starting")
    progress.update()
    progress.set_postfix_str("halfway")
    progress.write("a logged line", file=out)
    progress.close()

    assert out.getvalue().splitlines() == [
        "[0/2 steps] starting",
        "[1/2 steps] halfway",
        "a logged line",
    ]


def test_progress_lines_print_at_most_one_status_per_interval() -> None:
    out = io.StringIO()
    progress = _common.ProgressLines(3, "case", out, min_interval=3600)

    for status in ("first", "second", "third"):
        progress.set_postfix_str(status)
        progress.update()

    assert out.getvalue() == "[0/3 cases] first\n"


def test_disabled_progress_lines_print_only_the_written_lines() -> None:
    out = io.StringIO()
    progress = _common.ProgressLines(1, "step", out, disable=True, min_interval=0)

    progress.set_postfix_str("a status")
    progress.write("a logged line", file=out)

    assert out.getvalue() == "a logged line\n"


# --- bench: outputs checked before the run -------------------------------------------------


@pytest.mark.parametrize("options", [["--json"], ["--plot"], ["--linear", "--json"]])
def test_bench_refuses_an_output_in_a_missing_folder_before_measuring(
    options: list[str],
    tmp_path: Path,
    nothing_measured: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "missing" / "out"

    error = refusal([*options, str(path)], bench.main, capsys)

    flag = options[-1]
    assert error.endswith(f"error: argument {flag}: no folder {path.parent} to write out in")


def test_bench_refuses_a_folder_as_its_json_file(
    tmp_path: Path, nothing_measured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refusal(["--json", str(tmp_path)], bench.main, capsys)

    message = f"argument --json: {tmp_path} is a folder; give the path of a file in it"
    assert error.endswith(f"error: {message}")


def test_bench_refuses_an_output_in_a_folder_it_cannot_write(
    tmp_path: Path,
    nothing_measured: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refused(**options: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_common.tempfile, "NamedTemporaryFile", refused)

    error = refusal(["--json", str(tmp_path / "rows.json")], bench.main, capsys)

    assert error.endswith(
        f"error: argument --json: cannot write a file in folder {tmp_path}: Permission denied"
    )


def test_bench_refuses_a_plot_without_matplotlib_before_measuring(tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    arguments = ["bench", *TINY_BENCH, "--dtypes", "float64", "--plot", str(plot)]

    result = run_cli(arguments, unimportable=["matplotlib"])

    assert_refused(result, "bench", "--plot needs matplotlib: pip install 'softce_multi[bench]'")
    assert not plot.exists()


# --- bench: options of the other kind of run ----------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rows", "8"], "--rows goes with --linear or --targets"),
        (["--hidden", "4"], "--hidden goes with --linear or --targets"),
        (["--target-vocab", "100"], "--target-vocab goes with --linear or --targets"),
        (["--frameworks", "torch"], "--frameworks goes with --linear or --targets"),
        (["--bias"], "--bias goes with --linear"),
        (["--no-bias"], "--no-bias goes with --linear"),
        (["--targets", "--bias"], "--bias does not go with --targets"),
        (["--targets", "--no-bias"], "--no-bias does not go with --targets"),
        (["--autocast", "bfloat16"], "--autocast goes with --linear"),
        (["--reduction", "none"], "--reduction goes with --linear"),
        (["--targets", "--reduction", "sum"], "--reduction does not go with --targets"),
        (["--targets", "--autocast", "bfloat16"], "--autocast does not go with --targets"),
        (
            ["--linear", "--autocast", "float16", "--frameworks", "jax"],
            "--autocast is torch.autocast: it does not go with --frameworks jax",
        ),
        (["--linear", "--target-vocab", "100"], "--target-vocab does not go with --linear"),
        (["--linear", "--lengths", "4"], "--lengths does not go with --linear"),
        (["--targets", "--device", "cuda"], "--device cuda does not go with --targets"),
        (["--targets", "--plot", "plot.png"], "--plot does not go with --targets"),
        (
            ["--targets", "--target-vocab", "5", "--vocab", "10"],
            "--vocab 10 is more than --target-vocab 5: the draft vocabulary is a subset of the "
            "target's",
        ),
    ],
)
def test_bench_refuses_an_option_it_would_ignore_or_fail_on(
    argv: list[str], message: str, nothing_measured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert refusal(argv, bench.main, capsys) == f"python -m softce_multi bench: error: {message}"


def test_bench_help_says_every_case_is_warmed_up_before_the_timed_rounds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])

    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "timed rounds, after one untimed warm-up round in which every case runs once" in help_text
    )
    assert "fewer than 3 gives a warning" in help_text


@pytest.mark.parametrize("repeats", ["1", "2"])
def test_bench_warns_of_fewer_than_three_timed_rounds(
    repeats: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    numpy_cases = [case for case in bench.CASES if case.framework == "numpy"]
    monkeypatch.setattr(bench, "CASES", numpy_cases)
    argv = ["--lengths", "4", "--vocab", "8", "--no-memory", "--dtypes", "float32"]

    assert bench.main([*argv, "--repeats", repeats]) == 0

    warning = f"warning: --repeats {repeats}: under 3 timed rounds, one slow round makes the median"
    assert warning in capsys.readouterr().err.splitlines()


def test_bench_that_measures_nothing_exits_with_status_2_saying_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NumPy has no bfloat16: with NumPy's cases alone, a bfloat16 sweep skips them all."""
    numpy_cases = [case for case in bench.CASES if case.framework == "numpy"]
    monkeypatch.setattr(bench, "CASES", numpy_cases)
    saved = tmp_path / "rows.json"

    status = bench.main([*TINY_BENCH, "--dtypes", "bfloat16", "--json", str(saved)])

    output = capsys.readouterr()
    assert status == 2
    assert "skipped plain NumPy (bfloat16): no bfloat16" in output.out
    assert output.err.splitlines()[-1] == (
        "python -m softce_multi bench: error: nothing was measured: every implementation was "
        "skipped in --dtypes bfloat16 (the reasons are above)"
    )
    assert json.loads(saved.read_text())["rows"] == []


def test_bench_refuses_a_framework_that_is_not_installed() -> None:
    result = run_cli(["bench", "--linear", "--frameworks", "jax"], unimportable=["jax"])

    assert_refused(result, "bench", "--linear runs on jax: jax not installed")


def test_bench_refuses_to_compare_from_hidden_states_without_torch_and_jax() -> None:
    result = run_cli(["bench", "--targets"], unimportable=["torch", "jax"])

    assert_refused(
        result, "bench", "--targets runs on torch or jax: torch not installed; jax not installed"
    )


def test_bench_profile_without_torch_names_the_cpu_build_from_pytorchs_index() -> None:
    result = run_cli(["bench", "--profile", *TINY_BENCH], unimportable=["torch"])

    assert_refused(
        result,
        "bench",
        "--profile times the torch CPU loss: "
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
    )


def test_bench_refuses_cuda_without_torch() -> None:
    result = run_cli(["bench", "--device", "cuda", *TINY_BENCH], unimportable=["torch"])

    assert_refused(result, "bench", "--device cuda: torch not installed")


# --- check ---------------------------------------------------------------------------------


def test_check_refuses_a_backend_that_is_not_available(
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = [entry for entry in testing.availability() if entry.reason is not None]
    if not missing:
        pytest.skip("every backend is available here")
    name, reason = missing[0].backend.name, missing[0].reason

    error = refusal(["--backend", "numpy", name], _check.main, capsys)

    assert error == f"python -m softce_multi check: error: --backend {name}: {reason}"


def test_check_refuses_the_torch_oracle_without_torch() -> None:
    result = run_cli(["check", "--oracle", "torch"], unimportable=["torch"])

    assert_refused(
        result,
        "check",
        "--oracle torch needs PyTorch, which is not installed; use --oracle numpy",
    )


def test_bench_from_json_needs_a_plot(
    tmp_path: Path, nothing_measured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "rows.json"
    saved.write_text('{"rows": []}')

    error = refusal(["--from-json", str(saved)], bench.main, capsys)

    assert error.endswith("error: --from-json draws a saved run: give --plot PATH")


def test_bench_from_json_refuses_a_measuring_option(
    tmp_path: Path, nothing_measured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "rows.json"
    saved.write_text('{"rows": []}')
    plot = ["--plot", str(tmp_path / "plot.png")]

    error = refusal(["--from-json", str(saved), *plot, "--linear"], bench.main, capsys)

    assert error.endswith("error: --linear does not go with --from-json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a JSON file"),
        ('{"rows": []}', "holds no rows of measurements"),
        ('{"rows": [{"a": 1}]}', "has rows without dtype, extra_peak_in_grads"),
        ('{"other": 1}', "holds no rows to draw"),
    ],
)
def test_bench_from_json_refuses_a_file_that_is_not_a_saved_run(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    saved = tmp_path / "rows.json"
    saved.write_text(content)
    plot = ["--plot", str(tmp_path / "plot.png")]

    error = refusal(["--from-json", str(saved), *plot], bench.main, capsys)

    assert f"error: --from-json {saved}: {message}" in error
    assert not (tmp_path / "plot.png").exists()


@pytest.mark.parametrize(
    ("mode", "saved_json", "message"),
    [
        ("--linear", '[{"implementation": "ours", "median_s": 1.0}]', "holds no rows to draw"),
        (
            "--sparse",
            '{"rows": [{"implementation": "ours", "median_s": 1.0}], "skipped": []}',
            "has rows without dtype, extra_peak_in_grads, length",
        ),
    ],
)
def test_bench_from_json_says_the_json_of_linear_or_sparse_runs_is_not_drawn(
    mode: str, saved_json: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The JSON of ``bench --linear`` (a list of rows) and of ``bench --sparse`` (rows of other
    columns) is refused, and the error says which files are drawn."""
    saved = tmp_path / "rows.json"
    saved.write_text(saved_json)
    plot = ["--plot", str(tmp_path / "plot.png")]

    error = refusal(["--from-json", str(saved), *plot], bench.main, capsys)

    assert f"error: --from-json {saved}: {message}: " in error
    assert "the --json of the plain bench (not of --linear, --targets or --sparse)" in error
    assert "device-check's device_check.json" in error


def test_bench_help_says_which_json_files_from_json_draws(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "a --json file of the plain bench (not of --linear, --targets or --sparse, whose rows "
        "it does not draw), or the device_check.json of python -m softce_multi device-check"
    ) in help_text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not a JSON file"),
        ('{"date": "today"}', "is not a device check's report (missing: command, speed"),
    ],
)
def test_device_check_tables_refuses_a_file_that_is_not_a_report(
    tmp_path: Path, content: str, message: str
) -> None:
    saved = tmp_path / "device_check.json"
    saved.write_text(content)

    result = run_cli(["device-check", "--tables", str(saved)])

    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2
    assert f"error: --tables: {saved} {message}" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "fast"])
def test_demo_refuses_a_learning_rate_that_is_not_a_finite_positive_number(value: str) -> None:
    result = run_cli(["demo", "--lr", value])

    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2
    assert "error: argument --lr: must be a" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("value", ["1e300", "3.5e37"])
def test_demo_refuses_a_learning_rate_adams_first_step_overflows_in_float32(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch's Adam takes 10 x lr as a float32 on its first step."""
    error = refusal(["--lr", value], demo.main, capsys)

    assert error == (
        "python -m softce_multi demo: error: argument --lr: must be at most 3.4e+37 (Adam's "
        f"first step, 10 x lr, must fit in float32), got {value}"
    )


@pytest.mark.parametrize("value", ["-1", str(2**64), "x"])
@pytest.mark.parametrize(
    ("command", "main", "argv"),
    [
        ("check", _check.main, ["--shape", "2", "3", "8", "--backend", "numpy"]),
        ("bench", bench.main, TINY_BENCH),
        ("demo", demo.main, ["--steps", "2"]),
    ],
)
def test_a_seed_outside_what_the_generators_take_is_refused(
    value: str,
    command: str,
    main: Callable[[list[str]], int],
    argv: list[str],
    nothing_measured: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """NumPy's generators take no negative seed, PyTorch's none of 2**64 or more."""
    error = refusal([*argv, "--seed", value], main, capsys)

    prefix = f"python -m softce_multi {command}: error: argument --seed:"
    if value == "x":
        assert error == f"{prefix} invalid random_seed value: 'x'"
    else:
        assert error == f"{prefix} must be an integer from 0 to 2**64 - 1, got {value}"


def test_the_largest_seed_is_taken(capsys: pytest.CaptureFixture[str]) -> None:
    largest = str(2**64 - 1)

    assert _check.main(["--shape", "2", "8", "--backend", "numpy", "--seed", largest]) == 0
    assert f"seed {largest}" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "x", "1e39", "-1e308"])
def test_check_refuses_an_upstream_gradient_that_is_not_a_finite_number(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refusal(["--shape", "2", "8", f"--upstream={value}"], _check.main, capsys)

    assert error.startswith("python -m softce_multi check: error: argument --upstream: must be")


def test_check_help_says_the_backends_without_autodiff_take_an_upstream_gradient_of_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        _check.main(["--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "the other backends, which have no autodiff, take 1" in help_text


@pytest.mark.parametrize("shape", [["100000"] * 3, [str(10**10)] * 3])
def test_check_refuses_a_shape_whose_inputs_do_not_fit_in_memory(
    shape: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    error = refusal(["--shape", *shape, "--backend", "numpy"], _check.main, capsys)

    assert error.startswith(
        f"python -m softce_multi check: error: --shape {' '.join(shape)}: the inputs do not fit "
        "in memory"
    )


def test_device_check_refuses_an_out_folder_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")

    error = refusal(["--dry-run", "--out", str(a_file)], device_check.main, capsys)

    assert error == (
        "python -m softce_multi device-check: error: argument --out: "
        f"{a_file} is a file; give a folder"
    )


def test_device_check_refuses_an_out_folder_under_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = a_file / "sub" / "out"

    error = refusal(["--dry-run", "--out", str(out)], device_check.main, capsys)

    assert error == (
        "python -m softce_multi device-check: error: argument --out: "
        f"{a_file} is a file: no folder {out} can be made in it"
    )


def test_device_check_refuses_an_out_folder_that_cannot_be_made(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``/proc`` is a folder that even root cannot make a file or a folder in."""
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    error = refusal(["--dry-run", "--out", "/proc/softce_multi/out"], device_check.main, capsys)

    assert error.startswith(
        "python -m softce_multi device-check: error: argument --out: cannot write a file in "
        "folder /proc: "
    )


def test_device_check_takes_an_out_folder_to_make_or_one_that_exists(tmp_path: Path) -> None:
    for out in (tmp_path, tmp_path / "new" / "out"):
        assert device_check._parser().parse_args(["--out", str(out)]).out == out
    assert not (tmp_path / "new").exists()


def test_an_output_file_is_refused_where_no_file_can_be_made(
    nothing_measured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """``/proc`` is a folder that even root cannot make a file in."""
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    error = refusal([*TINY_BENCH, "--json", "/proc/bench.json"], bench.main, capsys)

    assert error.startswith("python -m softce_multi bench: error: argument --json: cannot write")


# --- device-check: what it needs, refused before it starts ---------------------------------


@pytest.mark.parametrize("dry_run", [["--dry-run"], []], ids=["dry run", "on the GPU"])
def test_device_check_from_an_installed_package_refuses_to_run_the_repository_tests(
    dry_run: list[str], tmp_path: Path
) -> None:
    """Installed without the repository beside it (as from a wheel), the package has no
    ``tests/`` for the CUDA tests and the suite: the check refuses before it starts."""
    site = tmp_path / "site-packages"
    shutil.copytree(
        ROOT / "softce_multi", site / "softce_multi", ignore=shutil.ignore_patterns("__pycache__")
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(site)}

    result = subprocess.run(
        [sys.executable, "-m", "softce_multi", "device-check", *dry_run, "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=elsewhere,
        env=env,
    )

    assert_refused(
        result,
        "device-check",
        "the device check runs the repository's tests (tests/test_cuda.py and the suite), and "
        f"softce_multi is imported from {site / 'softce_multi'}, not from a checkout of the "
        "repository: run it at the root of a checkout",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        (
            ["torch"],
            "torch is not installed: "
            "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
        ),
        (["triton"], "triton is not installed: pip install triton==3.9.0"),
        (
            ["torch", "triton"],
            "torch and triton are not installed: "
            "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; "
            "pip install triton==3.9.0",
        ),
    ],
)
def test_device_check_dry_run_without_torch_or_triton_says_what_to_install(
    missing: list[str], message: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli(["device-check", "--dry-run", "--out", str(out)], unimportable=missing)

    assert_refused(
        result,
        "device-check",
        "the dry run of the device check needs torch and triton (it runs the Triton kernels in "
        f"Triton's interpreter), and {message}",
    )
    assert not out.exists()


def test_the_triton_the_dry_run_asks_for_is_the_one_the_test_session_installs() -> None:
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    assert f'TRITON = "{device_check.TRITON}"' in noxfile
