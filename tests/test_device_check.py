"""The device check (``python -m softce_multi device-check``, ``bash device/check``).

Its dry run, the same stages on the CPU at tiny sizes with the kernels interpreted, runs here as
a test: the prepared check spends no device minute on a mistake this machine can show. The
rest holds its parts to what they promise: the parity measure, the inputs of each case, the
reference, the goals, a stage that fails or runs out of time, the wheel list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the device check needs torch")
pytest.importorskip("triton", reason="the device check's dry run interprets the Triton kernels")

from softce_multi._cli.device_check import command, parity, plan, report, stage  # noqa: E402
from softce_multi._cli.device_check import inputs as case_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """``bash device/check --dry-run``, as the GPU machine runs ``bash device/check``."""
    out = tmp_path_factory.mktemp("device-check")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    done = subprocess.run(
        ["bash", str(ROOT / "device" / "check"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return done, out


def test_the_dry_run_passes_and_prints_the_goals_last(dry_run):
    done, _ = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last_lines = done.stdout.strip().splitlines()[-12:]
    assert any(line.startswith("MET") and "parity" in line for line in last_lines), last_lines


def test_the_dry_run_runs_every_stage_and_every_parity_row_passes(dry_run):
    _, out = dry_run
    written = json.loads((out / "device_check.json").read_text())
    assert [entry["stage"] for entry in written["stages"]] == list(stage.STAGES)
    assert all(entry["status"] == "ok" and not entry["errors"] for entry in written["stages"])
    paths = {row["path"] for row in written["parity"]}
    assert {"torch backward", "torch with_grad", "torch in-place operators"} <= paths
    assert "torch backward, upstream 1" in paths  # the 16-bit forward gradient handed over
    assert {"torch linear loss", "jax XLA grad", "jax Pallas grad"} <= paths
    assert any(path.startswith("torch vocab-parallel") for path in paths)
    assert any(path.startswith("torch.compile(fullgraph=True") for path in paths)
    assert any(path.startswith("jax vocab-parallel") for path in paths)
    assert all(row["ok"] for row in written["parity"])


def test_the_dry_run_times_each_kernel_mode_and_each_chunk_size_of_the_fused_forward(dry_run):
    from softce_multi._cli.bench.modes import KERNEL_MODES
    from softce_multi._cli.device_check.speed import BLOCK_SIZES

    _, out = dry_run
    written = json.loads((out / "device_check.json").read_text())
    modes = [row["mode"] for row in written["kernel_modes"]]

    assert modes[: len(KERNEL_MODES)] == list(KERNEL_MODES)
    blocks = modes[len(KERNEL_MODES) :]
    assert [int(mode.split(", ")[1].split()[0]) for mode in blocks] == list(BLOCK_SIZES)
    assert all(row["median_s"] > 0 for row in written["kernel_modes"])


def test_every_stage_has_a_limit_and_a_place_in_the_order():
    assert list(command.STAGE_LIMIT_S) == list(stage.STAGES)
    assert [step for step in command.ORDER if step not in command.TESTS] == list(stage.STAGES)


def test_the_dry_run_writes_the_log(dry_run):
    _, out = dry_run
    log = (out / "device_check.log").read_text()
    assert "device_check.stage torch-parity" in log and "tests/test_cuda.py" in log


def test_the_dry_run_draws_the_speed_comparison(dry_run):
    pytest.importorskip("matplotlib")
    _, out = dry_run
    assert (out / "device_check.png").read_bytes().startswith(b"\x89PNG")


def test_bench_draws_the_saved_device_check(dry_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, out = dry_run
    plot = tmp_path / "replot.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "softce_multi",
            "bench",
            "--from-json",
            str(out / "device_check.json"),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_the_tables_of_a_saved_run_are_ready_for_the_readme_and_the_docs(dry_run, capsys):
    _, out = dry_run
    assert command.main(["--tables", str(out / "device_check.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Run: ") and "device-check --out" in printed
    assert "| softce_multi[torch] | [1, 32, 256] | float32 |" in printed
    assert "   * - softce_multi[torch]" in printed and ".. list-table::" in printed


def test_the_report_names_the_commit_given_where_there_is_no_git_folder(monkeypatch):
    monkeypatch.setenv("SOFTCE_COMMIT", "0123abc")
    assert command._commit() == "0123abc"


def test_the_check_needs_a_folder_for_its_output(capsys):
    with pytest.raises(SystemExit) as raised:
        command.main(["--dry-run"])
    assert raised.value.code == 2
    assert "--out FOLDER is required" in capsys.readouterr().err


def _has_hopper_compiler() -> bool:
    try:
        from softce_multi._cli.device_check.resources import ptxas_path

        return os.path.exists(ptxas_path())
    except (ImportError, RuntimeError):
        return False


@pytest.mark.skipif(not _has_hopper_compiler(), reason="needs triton with its CUDA compiler")
def test_the_triton_kernels_compile_for_hopper_without_local_memory():
    # A fresh process: kernels defined under TRITON_INTERPRET=1 cannot be compiled.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = (
        "import json; from softce_multi._cli.device_check.resources import kernel_resources; "
        "print(json.dumps(kernel_resources()))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert {row["kernel"] for row in rows} == {"forward", "backward", "upstream"}
    local = [row for row in rows if row["spill_stores"] or row["spill_loads"] or row["stack_frame"]]
    assert not local
    assert all(0 < row["registers"] <= 255 for row in rows)


def test_the_dry_run_times_every_torch_peer_installed(dry_run):
    _, out = dry_run
    written = json.loads((out / "device_check.json").read_text())
    timed = {row["implementation"] for row in written["speed"]}
    skipped = {entry["implementation"] for entry in written["skipped"]}
    assert "softce_multi[torch]" in timed and "NeMo formula[torch.compile]" in timed
    assert "softce_multi[torch], upstream 0.33" in timed  # the gradient computed again
    assert ("NeMo Triton kernel" in timed) != ("NeMo Triton kernel" in skipped)


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is present")
def test_without_a_gpu_the_full_check_refuses_to_start(capsys, tmp_path):
    with pytest.raises(SystemExit) as raised:
        command.main(["--out", str(tmp_path)])
    assert raised.value.code == 2
    assert "--dry-run" in capsys.readouterr().err


def test_max_error_is_relative_to_the_largest_reference_entry():
    desired = torch.tensor([4.0, -2.0, 1.0], dtype=torch.float64)
    actual = torch.tensor([4.0, -2.0, 1.5])
    assert parity.max_error(actual, desired) == pytest.approx(0.125)


def test_max_error_requires_an_infinite_reference_entry_to_be_matched():
    desired = torch.tensor([torch.inf, 1.0], dtype=torch.float64)
    assert parity.max_error(torch.tensor([torch.inf, 1.0]), desired) == 0.0
    assert parity.max_error(torch.tensor([1e30, 1.0]), desired) == float("inf")


def test_max_error_of_a_nan_is_nan_and_fails():
    error = parity.max_error(torch.tensor([torch.nan, 1.0]), torch.tensor([2.0, 1.0]))
    assert error != error  # NaN: no comparison with a tolerance passes


def test_padding_holds_nan_and_inf_and_valid_positions_are_finite():
    made = case_inputs.make_inputs(
        (4, 9, 50), "float32", "nan_inf_padding", "mean", device="cpu", seed=3
    )
    padding = ~made.mask
    assert padding.any() and made.mask.any()
    assert torch.isnan(made.logits[padding]).any() and torch.isinf(made.logits[padding]).any()
    assert torch.isfinite(made.logits[made.mask]).all()
    assert torch.isnan(made.targets[padding]).all()


def test_reference_targets_gradient_is_inf_at_a_neg_inf_logit_of_a_valid_position():
    made = case_inputs.make_inputs(
        (3, 5, 40), "float32", "neg_inf_logits", "sum", device="cpu", seed=4
    )
    expected = case_inputs.reference(made)
    hidden = torch.isneginf(made.logits) & made.mask[..., None]
    assert hidden.any()
    assert torch.isposinf(expected.grad_targets[hidden]).all()
    assert (expected.grad_logits[hidden] == 0).all()
    assert torch.isfinite(expected.loss).all()


def test_a_path_that_leaves_nan_in_the_padding_gradient_fails():
    made = case_inputs.make_inputs((2, 6, 30), "float32", "random", "mean", device="cpu", seed=5)
    expected = case_inputs.reference(made)
    poisoned = expected.grad_logits.clone().float()
    poisoned[~made.mask] = torch.nan
    row = parity.compare("poisoned", {}, made, expected, expected.loss.float(), poisoned)
    assert not row["padding_exact_zero"] and not row["ok"]


def _speed_row(implementation: str, seconds: float, **values: object) -> dict:
    return {
        "implementation": implementation,
        "length": 32768,
        "vocab": 32000,
        "targets_dtype": "float32",
        "median_s": seconds,
        "time_vs_nemo": None,
        "copy_fraction": 0.8,
        "extra_peak_in_grads": 1.0,
        **values,
    }


def _report(speed: list[dict], *, dry_run: bool = False) -> dict:
    return {
        "dry_run": dry_run,
        "parity": [{"ok": True}],
        "stages": [{"stage": "torch-parity", "status": "ok"}],
        "tests": [],
        "speed": speed,
        "linear": [],
        "resources": [],
    }


def test_goals_hold_the_headline_case_to_the_issue_thresholds():
    rows = [
        _speed_row("softce_multi[torch]", 0.005, time_vs_nemo=0.5, copy_fraction=0.65),
        _speed_row("NeMo Triton kernel", 0.010),
    ]
    goals = {goal["goal"]: goal["met"] for goal in report.goals(_report(rows), (1, 32768, 32000))}
    prefix = "[1, 32768, 32000] bf16, float32 targets: "
    assert goals[prefix + "at most 0.6x NeMo's Triton kernel"] is True
    assert goals[prefix + "at least 70% of the copy bandwidth at its byte floor"] is False
    assert goals[prefix + "peak memory above the inputs at most 1.01 logits gradients"] is True


def test_a_dry_run_judges_parity_alone():
    rows = [_speed_row("softce_multi[torch]", 0.005, time_vs_nemo=2.0)]
    goals = report.goals(_report(rows, dry_run=True), (1, 32768, 32000))
    assert goals[0]["met"] is True
    assert all(goal["met"] is None for goal in goals[1:])


def test_a_part_that_raises_is_recorded_and_the_next_part_runs(monkeypatch, tmp_path):
    def broken(plan, device, dry_run, record):
        raise RuntimeError("kernel failed to compile")

    def working(plan, device, dry_run, record):
        record("parity", [{"ok": True}])

    monkeypatch.setitem(stage.STAGES, "environment", lambda: (broken, working))
    written = stage.run_stage("environment", tmp_path / "stage.json", dry_run=True)
    assert "kernel failed to compile" in written["errors"][0]
    assert written["results"]["parity"] == [{"ok": True}]
    assert json.loads((tmp_path / "stage.json").read_text()) == written


def test_an_implementation_that_fails_is_recorded_and_the_next_still_runs():
    recorded: dict[str, list] = {}

    def record(key, rows):
        recorded.setdefault(key, []).extend(rows)

    for name in ("peer", "ours"):
        with plan.failure_recorded(record, name, shape=[1, 8, 32]):
            if name == "peer":
                raise RuntimeError("CUDA error: an illegal memory access")
            record("speed", [{"implementation": name}])

    assert recorded["speed"] == [{"implementation": "ours"}]
    (failure,) = recorded["failed"]
    assert failure["implementation"] == "peer" and failure["shape"] == [1, 8, 32]
    assert "illegal memory access" in failure["error"]


def test_a_parity_case_that_raises_fails_its_row_and_the_next_case_runs(monkeypatch):
    calls = []

    def reference_failing_once(inputs, **options):
        calls.append(inputs.logits.dtype)
        if len(calls) == 3:  # bfloat16 at upstream 0.7 and 1, then float16: raises
            raise RuntimeError("triton compilation failed")
        return case_inputs.reference(inputs, **options)

    monkeypatch.setattr(parity, "reference", reference_failing_once)
    tiny = dataclasses.replace(plan.DRY, parity_shapes=((2, 3, 17),), parity_large=())

    rows = list(parity.torch_parity(tiny, "cpu", dry_run=True))

    failed = [row for row in rows if "error" in row]
    assert len(calls) == 4 and len(failed) == 1
    assert failed[0]["dtype"] == "float16" and not failed[0]["ok"]
    assert "triton compilation failed" in failed[0]["error"]
    assert [row["ok"] for row in rows if "error" not in row] == [True] * 5


def test_a_command_past_its_limit_is_stopped_with_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    with (tmp_path / "log").open("w") as log:
        status, seconds, returncode = command._run(
            [sys.executable, "-c", code], 2.0, dict(os.environ), log
        )
    assert (status, returncode) == ("timeout", None) and seconds < 10
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; the child is gone once it is reaped
        if (
            not Path(f"/proc/{child}").exists()
            or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
        ):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the child process {child} of the stopped command still runs")


def test_the_wheel_list_pins_each_wheel_once_and_matches_the_test_session():
    lines = (ROOT / "device" / "wheels.txt").read_text().splitlines()
    pins = [line for line in lines if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", pin) for pin in pins), pins
    names = [pin.split("==")[0] for pin in pins]
    assert len(names) == len(set(names))
    noxfile = (ROOT / "noxfile.py").read_text()
    for peer in ("nemo", "liger"):
        (pin,) = [pin for pin in pins if pin.startswith(peer)]
        assert pin.split("==")[1] in noxfile


def test_the_device_command_names_the_wheels_it_lacks(tmp_path):
    shutil.copytree(ROOT / "device", tmp_path / "device")
    done = subprocess.run(
        ["bash", str(tmp_path / "device" / "check")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "array-api-compat==" in done.stderr and "device/download-wheels" in done.stderr


def test_the_speed_floor_reads_the_kept_rows_and_writes_every_gradient_row():
    from softce_multi._cli.device_check.speed import _row

    # 10 rows of 7: 8 kept rows read bf16 logits (2 bytes) and float32 targets (4 bytes); all
    # 10 rows write the bf16 gradient.
    row = _row("softce_multi[torch]", (1, 10, 7), "float32", 1e-3, None, valid_rows=8)

    assert row["floor_bytes"] == 8 * 7 * (2 + 4) + 10 * 7 * 2
    assert row["floor_gb_per_s"] == pytest.approx(row["floor_bytes"] / 1e-3 / 1e9)
