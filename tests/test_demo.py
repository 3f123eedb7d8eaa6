"""The demo trains a draft head: its loss falls and its accuracy rises, on PyTorch and on JAX."""

from __future__ import annotations

import io
import sys

import pytest

from softce_multi._cli import demo as _demo
from softce_multi._cli.demo import DemoConfig, DemoResult, run

# Small enough for the test suite: a few seconds per backend.
SMALL = {"steps": 40, "train_sequences": 128, "eval_sequences": 32, "log_every": 10}


def _run(backend: str) -> tuple[DemoResult, str]:
    pytest.importorskip(backend, reason=f"the {backend} demo needs {backend}")
    out = io.StringIO()
    result = run(DemoConfig(backend=backend, **SMALL), out=out)
    return result, out.getvalue()


@pytest.fixture(scope="module", params=["torch", "jax"])
def demo_run(request: pytest.FixtureRequest) -> tuple[DemoResult, str]:
    return _run(request.param)


def test_demo_lowers_the_held_out_loss(demo_run: tuple[DemoResult, str]) -> None:
    result, _ = demo_run
    assert result.loss_after < 0.8 * result.loss_before


def test_demo_lowers_the_training_loss_between_logged_windows(
    demo_run: tuple[DemoResult, str],
) -> None:
    result, _ = demo_run
    assert len(result.train_losses) == SMALL["steps"] // SMALL["log_every"]
    assert result.train_losses[-1] < result.train_losses[0]


def test_demo_raises_the_accuracy_of_every_test_time_step(
    demo_run: tuple[DemoResult, str],
) -> None:
    result, _ = demo_run
    assert len(result.accuracy_before) == len(result.accuracy_after) == DemoConfig().ttt_steps
    for before, after in zip(result.accuracy_before, result.accuracy_after, strict=True):
        assert after > before + 0.1


def test_demo_prints_each_logging_step_and_the_accuracy_before_and_after(
    demo_run: tuple[DemoResult, str],
) -> None:
    _, text = demo_run
    logged = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(logged) == SMALL["steps"] // SMALL["log_every"]
    assert all("loss" in line and "accuracy" in line for line in logged)
    assert "before training: held-out loss" in text
    assert "after training: held-out loss" in text
    assert text.splitlines()[-1].startswith("draft accuracy (first test-time step)")


def test_demo_starts_from_the_same_loss_on_both_backends() -> None:
    pytest.importorskip("torch", reason="comparing backends needs torch")
    pytest.importorskip("jax", reason="comparing backends needs jax")
    config = {**SMALL, "steps": 1, "log_every": 1}
    torch_run = run(DemoConfig(backend="torch", **config), out=io.StringIO())
    jax_run = run(DemoConfig(backend="jax", **config), out=io.StringIO())
    assert torch_run.loss_before == pytest.approx(jax_run.loss_before, rel=1e-5)
    assert torch_run.accuracy_before == pytest.approx(jax_run.accuracy_before, abs=1e-6)


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, where the demo draws its progress bar."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_beside_the_logged_lines() -> None:
    out = Terminal()
    pytest.importorskip("torch", reason="the torch demo needs torch")
    run(
        DemoConfig(backend="torch", steps=2, log_every=2, train_sequences=64, eval_sequences=8),
        out=out,
    )
    assert "2/2" in out.getvalue()
    assert "step 2/2  loss" in out.getvalue()


def test_without_tqdm_a_terminal_gets_plain_progress_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("torch", reason="the torch demo needs torch")
    monkeypatch.setitem(sys.modules, "tqdm", None)
    out = Terminal()
    run(
        DemoConfig(backend="torch", steps=2, log_every=2, train_sequences=64, eval_sequences=8),
        out=out,
    )
    lines = out.getvalue().splitlines()
    assert any(line.startswith("[1/2 steps] loss ") for line in lines)
    assert any(line.startswith("step 2/2  loss ") for line in lines)
    assert "\r" not in out.getvalue()


def test_progress_bar_stays_silent_off_a_terminal(demo_run: tuple[DemoResult, str]) -> None:
    assert "\r" not in demo_run[1]


def test_main_explains_a_missing_backend(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_demo, "installed", lambda name: False)
    assert _demo.main(["--backend", "jax"]) == 2
    error = capsys.readouterr().err
    assert "needs jax, which is not installed" in error
    assert "pip install 'softce_multi[jax]'" in error


def test_main_refuses_a_non_positive_number_of_steps(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _demo.main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_main_refuses_a_batch_larger_than_the_training_set_before_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def train(*args: object, **kwargs: object) -> None:
        msg = "the demo started before refusing its arguments"
        raise AssertionError(msg)

    monkeypatch.setattr(_demo, "run", train)
    with pytest.raises(SystemExit) as exit_info:
        _demo.main(["--batch-size", "5000"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m softce_multi demo: error: --batch-size 5000: a batch has at most the 2048 "
        "training sequences"
    )


def test_run_refuses_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        run(DemoConfig(backend="numpy"), out=io.StringIO())


def test_demo_with_the_linear_loss_trains_as_with_the_logits() -> None:
    """``--linear`` computes the same loss from the draft's states and output weight.

    On torch only, to keep the suite fast: the JAX training step compiles for many seconds, and
    the linear loss under ``jax.jit`` and ``jax.grad`` is held to the reference elsewhere.
    """
    pytest.importorskip("torch", reason="the torch demo needs torch")
    config = {**SMALL, "steps": 5, "log_every": 5}
    plain = run(DemoConfig(backend="torch", **config), out=io.StringIO())
    out = io.StringIO()
    linear = run(DemoConfig(backend="torch", linear=True, **config), out=out)
    assert "with linear_masked_soft_cross_entropy" in out.getvalue()
    assert linear.loss_before == pytest.approx(plain.loss_before, rel=1e-5)
    assert linear.loss_after == pytest.approx(plain.loss_after, rel=1e-4)
    assert linear.loss_after < linear.loss_before


@pytest.mark.parametrize(
    ("backend", "flags", "uses_linear"),
    [
        ("jax", [], True),
        ("torch", [], False),
        ("jax", ["--no-linear"], False),
        ("torch", ["--linear"], True),
    ],
)
def test_the_linear_loss_is_the_default_where_it_is_faster(backend, flags, uses_linear) -> None:
    """The demo trains with the linear loss on JAX unless told not to, and on torch if told to."""
    arguments = _demo._parser().parse_args(["--backend", backend, *flags])

    assert DemoConfig(**vars(arguments)).uses_linear is uses_linear
