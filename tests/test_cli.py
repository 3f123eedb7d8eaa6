"""The command line (``python -m softce_multi``), its ``check`` command, and the code examples
of the README and the getting-started page."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import softce_multi
from softce_multi import __main__ as cli
from softce_multi._cli import check as _check

ROOT = Path(__file__).resolve().parents[1]
SMALL_SHAPE = ["--shape", "2", "8", "33"]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


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
    expected = {"numpy"} | {m for m in ("array_api_strict", "torch", "jax") if installed(m)}
    assert expected <= {row[0] for row in rows}
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

    numpy_loss, numpy_grad = _check.numpy_reference(logits, target, inputs.position_mask)
    torch_loss, torch_grad = _check.torch_reference(logits, target, inputs.position_mask)

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
