"""The losses from hidden states under ``torch.autocast``: the matmuls in the autocast dtype.

Under autocast, ``torch.nn.functional.linear`` runs in the autocast dtype and the loss in
float32. The linear losses, their module, the vocabulary-parallel linear loss and
``eagle3.prepare_targets_from_hidden`` compute each chunk's logits the same way, so that they
equal ``F.linear`` followed by the loss under the same autocast, in value and gradients; the
gradients come back in the dtypes of ``hidden``, ``weight`` and ``bias``. Outside autocast
nothing changes. Tolerances are those of Liger-Kernel's own autocast test of its fused linear
losses (``atol=5e-3, rtol=5e-2``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import softce_multi as sc
from softce_multi import eagle3
from softce_multi.testing import REDUCTIONS

torch = pytest.importorskip("torch")

from softce_multi._adapters import torch_shared  # noqa: E402

F = torch.nn.functional

pytestmark = pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Liger-Kernel's tolerances for its fused linear losses under autocast.
LIGER_TOLERANCES = {"atol": 5e-3, "rtol": 5e-2}
#: Those of the same matmuls and the same row math in one chunk (only sums taken in another
#: order differ): a float32 matmul where autocast asked for 16 bits is far outside them. Over
#: several chunks the weight gradient sums each chunk's 16-bit product in float32, where
#: ``F.linear``'s backward rounds one product of every row: Liger's tolerances apply then.
SAME_MATMULS = {"atol": 1e-6, "rtol": 1e-4}


def linear_inputs(seed: int, *, rows: int = 48, hidden: int = 64, vocab: int = 300) -> dict:
    """float32 hidden states, an ``lm_head`` weight and bias, soft targets and a bool mask."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(2, rows // 2, hidden, generator=generator),
        "weight": torch.randn(vocab, hidden, generator=generator) * hidden**-0.5,
        "bias": torch.randn(vocab, generator=generator) * 0.1,
        "target_probs": torch.softmax(torch.randn(2, rows // 2, vocab, generator=generator), -1),
        "position_mask": torch.rand(2, rows // 2, generator=generator) < 0.8,
    }


def differentiate(loss_of: Any, inputs: dict, autocast_dtype: Any, upstream: Any) -> tuple:
    """``loss_of(hidden, weight, bias)`` under CPU autocast, and its gradients to the three."""
    leaves = [inputs[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    with torch.autocast("cpu", dtype=autocast_dtype):
        loss = loss_of(*leaves)
    loss.backward(upstream)
    return (loss.detach(), *(leaf.grad for leaf in leaves))


def materialised(inputs: dict, reduction: str = "mean") -> Any:
    """``F.linear``, then the loss of the logits: the path the linear loss must equal."""

    def loss_of(hidden: Any, weight: Any, bias: Any) -> Any:
        logits = F.linear(hidden, weight, bias)
        return sc.masked_soft_cross_entropy(
            logits, inputs["target_probs"], inputs["position_mask"], reduction=reduction
        )

    return loss_of


def assert_results_close(actual: tuple, expected: tuple, **tolerances: float) -> None:
    """Same dtypes (float32 loss, the inputs' dtypes for the gradients), close values.

    ``tolerances`` (Liger's by default) apply to the loss and the gradients to ``hidden`` and
    ``weight``; the bias gradient, a fourth entry, is held to Liger's: ``F.linear``'s backward
    rounds it to the 16-bit dtype, where the linear loss sums it in float32.
    """
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.dtype == want.dtype
        close = LIGER_TOLERANCES if index == 3 or not tolerances else tolerances
        torch.testing.assert_close(got, want, **close)


@pytest.mark.parametrize("chunk_rows", [None, 7], ids=["one chunk", "7 rows a chunk"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_linear_loss_equals_f_linear_then_the_loss_under_autocast(dtype, reduction, chunk_rows):
    inputs = linear_inputs(1)
    upstream = torch.tensor(0.3) if reduction != "none" else torch.rand(2, 24)

    def linear(hidden: Any, weight: Any, bias: Any) -> Any:
        return sc.linear_masked_soft_cross_entropy(
            hidden=hidden,
            weight=weight,
            target_probs=inputs["target_probs"],
            position_mask=inputs["position_mask"],
            bias=bias,
            reduction=reduction,
            chunk_rows=chunk_rows,
        )

    ours = differentiate(linear, inputs, AUTOCAST_DTYPES[dtype], upstream)
    expected = differentiate(
        materialised(inputs, reduction), inputs, AUTOCAST_DTYPES[dtype], upstream
    )

    assert ours[0].dtype == torch.float32
    assert all(grad.dtype == torch.float32 for grad in ours[1:])
    assert_results_close(ours, expected, **(SAME_MATMULS if chunk_rows is None else {}))


def liger_amp_inputs() -> dict:
    """The inputs of Liger-Kernel's autocast test: ``[2 * 4, 2048]`` hidden states, a float32
    ``[3200, 2048]`` weight of uniform values, targets the softmax of uniform values, every
    position valid (and a zero bias, for :func:`differentiate`)."""
    generator = torch.Generator().manual_seed(42)
    hidden_size, vocab = 2048, 3200
    weight = torch.rand(vocab, hidden_size, generator=generator)
    return {
        "hidden": torch.randn(2 * 4, hidden_size, generator=generator),
        "weight": weight,
        "bias": torch.zeros(vocab),
        "target_probs": torch.rand(2 * 4, vocab, generator=generator).softmax(dim=-1),
        "position_mask": torch.ones(2 * 4, dtype=torch.bool),
    }


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_liger_amp_case_passes(dtype):
    """Liger-Kernel's autocast test of its fused linear KL loss, adapted: ``[2, 4]`` positions,
    ``H = 2048``, ``V = 3200``, a float32 weight of uniform values, targets the softmax of
    uniform values, the mean over the rows (KL and the soft cross entropy differ by the targets'
    entropy, a constant, so their gradients are equal)."""
    inputs = liger_amp_inputs()

    def reference_head(hidden: Any, weight: Any, bias: Any) -> Any:
        logits = F.linear(hidden, weight).to(torch.float32)
        log_probs = torch.log_softmax(logits, dim=-1)
        return -(inputs["target_probs"] * log_probs).sum() / hidden.shape[0] + 0 * bias.sum()

    def linear(hidden: Any, weight: Any, bias: Any) -> Any:
        loss = sc.linear_masked_soft_cross_entropy(
            hidden, weight, inputs["target_probs"], inputs["position_mask"]
        )
        return loss + 0 * bias.sum()

    upstream = torch.tensor(1.0)
    ours = differentiate(linear, inputs, AUTOCAST_DTYPES[dtype], upstream)
    expected = differentiate(reference_head, inputs, AUTOCAST_DTYPES[dtype], upstream)

    assert_results_close(ours[:3], expected[:3])


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_linear_module_equals_f_linear_then_the_loss_under_autocast(dtype):
    inputs = linear_inputs(2)
    criterion = sc.torch.LinearMaskedSoftCrossEntropy()

    def module(hidden: Any, weight: Any, bias: Any) -> Any:
        return criterion(hidden, weight, inputs["target_probs"], inputs["position_mask"], bias=bias)

    upstream = torch.tensor(0.7)
    ours = differentiate(module, inputs, AUTOCAST_DTYPES[dtype], upstream)
    expected = differentiate(materialised(inputs), inputs, AUTOCAST_DTYPES[dtype], upstream)

    assert_results_close(ours, expected, **SAME_MATMULS)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_vocab_parallel_linear_loss_equals_f_linear_then_the_loss_under_autocast(
    group_of_one, dtype
):
    from softce_multi import distributed

    inputs = linear_inputs(3)

    def vocab_parallel(hidden: Any, weight: Any, bias: Any) -> Any:
        return distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            hidden, weight, inputs["target_probs"], inputs["position_mask"], bias_shard=bias
        )

    upstream = torch.tensor(0.4)
    ours = differentiate(vocab_parallel, inputs, AUTOCAST_DTYPES[dtype], upstream)
    expected = differentiate(materialised(inputs), inputs, AUTOCAST_DTYPES[dtype], upstream)

    assert_results_close(ours, expected, **SAME_MATMULS)


def target_inputs(seed: int) -> tuple:
    """float32 target hidden states ``[2, 32, 48]``, a ``[400, 48]`` head, a loss mask, and a
    ``t2d`` marking 120 draft tokens."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 32, 48, generator=generator)
    weight = torch.randn(400, 48, generator=generator) * 48**-0.5
    loss_mask = torch.rand(2, 32, generator=generator) < 0.9
    t2d = torch.zeros(400, dtype=torch.bool)
    t2d[torch.randperm(400, generator=generator)[:120]] = True
    return hidden, weight, loss_mask, t2d


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_targets_from_hidden_equal_the_targets_of_f_linear_under_autocast(dtype):
    hidden, weight, loss_mask, t2d = target_inputs(4)

    with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[dtype]):
        ours = eagle3.prepare_targets_from_hidden(
            hidden, weight, loss_mask, t2d, draft_vocab_size=120, chunk_rows=5
        )
        expected = eagle3.prepare_targets(F.linear(hidden, weight), loss_mask, t2d)

    torch.testing.assert_close(ours[0], expected[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(ours[1], expected[1])


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_linear_with_grad_equals_f_linear_then_the_loss_under_autocast(dtype):
    inputs = linear_inputs(6)
    arrays = {name: inputs[name] for name in ("hidden", "weight", "target_probs", "position_mask")}

    with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[dtype]):
        loss, grads = sc.linear_masked_soft_cross_entropy_with_grad(**arrays, bias=inputs["bias"])
    expected = differentiate(materialised(inputs), inputs, AUTOCAST_DTYPES[dtype], None)

    assert_results_close((loss, grads.hidden, grads.weight, grads.bias), expected, **SAME_MATMULS)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_top_k_targets_from_hidden_are_the_top_k_of_f_linear_under_autocast(dtype):
    hidden, weight, loss_mask, t2d = target_inputs(5)

    with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[dtype]):
        ids, probs, mask = eagle3.prepare_top_k_targets_from_hidden(
            hidden, weight, loss_mask, t2d, 8, draft_vocab_size=120, chunk_rows=5
        )
        dense, expected_mask = eagle3.prepare_targets(F.linear(hidden, weight), loss_mask, t2d)
    expected_ids, expected_probs = eagle3.top_k_targets(dense, 8)

    torch.testing.assert_close(probs, expected_probs, rtol=1e-6, atol=1e-7)
    assert torch.equal(mask, expected_mask)
    # Ids may differ only where two probabilities are equal (which of them comes first).
    gathered = torch.gather(dense, -1, ids)
    torch.testing.assert_close(gathered, expected_probs, rtol=1e-6, atol=1e-7)
    assert (ids == expected_ids).float().mean() > 0.9


@pytest.mark.parametrize("logits_dtype", ["float32", "bfloat16"])
def test_loss_of_logits_stays_float32_under_autocast(logits_dtype):
    """Autocast runs losses in float32: so does this one, with the value it has outside."""
    inputs = linear_inputs(5)
    logits = F.linear(inputs["hidden"], inputs["weight"]).to(getattr(torch, logits_dtype))
    arguments = (logits, inputs["target_probs"], inputs["position_mask"])
    outside = sc.masked_soft_cross_entropy(*arguments)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sc.masked_soft_cross_entropy(*arguments)

    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def chunk_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtypes of the chunks' logits as the torch linear loss makes them, recorded."""
    seen: list[torch.dtype] = []
    make = torch_shared.LogitsBuffer.__call__

    def spy(self: Any, hidden: Any, weight: Any, bias: Any) -> Any:
        logits = make(self, hidden, weight, bias)
        seen.append(logits.dtype)
        return logits

    monkeypatch.setattr(torch_shared.LogitsBuffer, "__call__", spy)
    return seen


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_chunk_matmuls_run_in_the_autocast_dtype(monkeypatch, dtype):
    inputs = linear_inputs(6)
    seen = chunk_dtypes(monkeypatch)
    linear = sc.linear_masked_soft_cross_entropy

    with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[dtype]):
        linear(**{k: v for k, v in inputs.items()}, chunk_rows=16)

    assert seen == [AUTOCAST_DTYPES[dtype]] * 3


def test_chunk_matmuls_keep_the_inputs_dtype_outside_autocast_and_in_float64(monkeypatch):
    inputs = linear_inputs(7)
    seen = chunk_dtypes(monkeypatch)
    as_float64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}

    sc.linear_masked_soft_cross_entropy(**inputs, chunk_rows=48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sc.linear_masked_soft_cross_entropy(**as_float64, chunk_rows=48)

    assert seen == [torch.float32, torch.float64]


def test_compiled_step_under_autocast_passes_the_autocast_dtype_and_equals_eager():
    """One graph under ``fullgraph=True``; the operator that runs the chunks receives the
    autocast dtype as its matmul dtype; values and gradients are those of eager mode."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    inputs = linear_inputs(8)
    graphs: list[Any] = []

    def record(graph_module: Any, _: Any) -> Any:
        graphs.append(graph_module)
        return make_boxed_func(graph_module)

    recording_backend = aot_autograd(
        fw_compiler=record, bw_compiler=lambda graph_module, _: make_boxed_func(graph_module)
    )

    def step(hidden: Any, weight: Any, bias: Any) -> Any:
        return sc.linear_masked_soft_cross_entropy(
            hidden,
            weight,
            inputs["target_probs"],
            inputs["position_mask"],
            bias=bias,
            num_valid=inputs["position_mask"].sum(),
        )

    torch._dynamo.reset()
    upstream = torch.tensor(0.5)
    compiled = differentiate(
        torch.compile(step, fullgraph=True, backend=recording_backend),
        inputs,
        torch.bfloat16,
        upstream,
    )
    eager = differentiate(step, inputs, torch.bfloat16, upstream)

    assert len(graphs) == 1  # one forward graph: no break
    operators = [
        node
        for node in graphs[0].graph.nodes
        if node.op == "call_function" and "linear_forward" in str(node.target)
    ]
    assert len(operators) == 1
    assert torch.bfloat16 in operators[0].args
    assert_results_close(compiled, eager, rtol=0, atol=0)


def test_gradients_made_in_the_forward_pass_outside_autocast_only(monkeypatch):
    """Under a 16-bit autocast the logits are 16-bit: their gradient is made in the backward
    pass, with the upstream gradient in its one rounding; outside, in the forward pass."""
    from softce_multi.kernels import torch_cpu

    calls: list[str] = []
    for name in ("torch_row_routine_", "torch_gradient_routine_"):
        original = getattr(torch_cpu, name)

        def spy(*arguments: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return _original(*arguments)

        monkeypatch.setattr(torch_cpu, name, spy)
    inputs = linear_inputs(9)
    differentiate(
        lambda h, w, b: sc.linear_masked_soft_cross_entropy(
            h, w, inputs["target_probs"], inputs["position_mask"], bias=b
        ),
        inputs,
        torch.bfloat16,
        torch.tensor(0.2),
    )
    in_autocast, calls[:] = list(calls), []
    leaves = [inputs[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    sc.linear_masked_soft_cross_entropy(
        leaves[0], leaves[1], inputs["target_probs"], inputs["position_mask"], bias=leaves[2]
    ).backward()

    assert in_autocast == ["torch_gradient_routine_"]
    assert calls == ["torch_row_routine_"]
    assert np.isfinite(leaves[0].grad.numpy()).all()


def test_bench_times_both_linear_paths_under_autocast(tmp_path, monkeypatch, capsys):
    """``bench --linear --autocast bfloat16`` runs torch alone (JAX has no autocast), both
    paths' chunks or logits in bfloat16, and says so in its title."""
    import json

    from softce_multi._cli import bench

    monkeypatch.setattr(bench, "_memory_from_hidden", bench.peak_extra_memory_from_hidden)
    seen = chunk_dtypes(monkeypatch)
    report = tmp_path / "autocast.json"
    argv = ["--linear", "--rows", "16", "--hidden", "4", "--vocab", "10", "--repeats", "1"]

    assert bench.main([*argv, "--autocast", "bfloat16", "--json", str(report)]) == 0

    rows = json.loads(report.read_text())
    assert {(row["framework"], row["implementation"]) for row in rows} == {
        ("torch", "linear"),
        ("torch", "materialised"),
    }
    assert seen and set(seen) == {torch.bfloat16}
    assert "under torch.autocast(bfloat16)" in capsys.readouterr().out.splitlines()[0]
    sizes = bench.Sizes(16, 4, 10, 10, True, "bfloat16")
    comparison = bench.FROM_HIDDEN["linear"]
    inputs = bench._framework_arrays("torch", comparison.inputs(sizes, 0), "float32", 3)
    own, materialised = (
        bench._from_hidden_torch_step(comparison, path, sizes)(*inputs)
        for path in ("linear", "materialised")
    )
    for grad, want in zip(own, materialised, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, want, **LIGER_TOLERANCES)


def liger_amp_errors(dtype: str) -> str:
    """Liger's autocast case, measured: the gradient elements outside its tolerance, and the
    relative errors against ``F.linear`` then the formula under the same autocast, and against
    float64."""
    inputs = liger_amp_inputs()
    hidden, weight, targets, mask = (
        inputs[name] for name in ("hidden", "weight", "target_probs", "position_mask")
    )
    gradients = {}
    for path in ("reference", "ours", "float64"):
        wide = torch.float64 if path == "float64" else torch.float32
        leaves = [x.to(wide, copy=True).requires_grad_(True) for x in (hidden, weight)]
        autocast = torch.autocast("cpu", dtype=AUTOCAST_DTYPES[dtype], enabled=path != "float64")
        with autocast:
            if path == "ours":
                loss = sc.linear_masked_soft_cross_entropy(*leaves, targets, mask)
            else:
                log_probs = torch.log_softmax(F.linear(*leaves).to(wide), dim=-1)
                loss = -(targets.to(wide) * log_probs).sum() / 8
        loss.backward()
        gradients[path] = [leaf.grad.double() for leaf in leaves]

    def outside(got: Any, want: Any) -> int:
        return int((~torch.isclose(got, want, **LIGER_TOLERANCES)).sum())

    def relative(got: Any, want: Any) -> float:
        return float((got - want).norm() / want.norm())

    (hidden_ref, weight_ref), (hidden_ours, weight_ours) = gradients["reference"], gradients["ours"]
    hidden_exact = gradients["float64"][0]
    return (
        f"{dtype}: outside Liger's tolerance: hidden {outside(hidden_ours, hidden_ref)} of "
        f"{hidden_ours.numel()}, weight {outside(weight_ours, weight_ref)} of "
        f"{weight_ours.numel()}; relative error against the autocast reference: hidden "
        f"{relative(hidden_ours, hidden_ref):.2e}, weight {relative(weight_ours, weight_ref):.2e}"
        f"; hidden against float64: ours {relative(hidden_ours, hidden_exact):.2e}, the "
        f"reference {relative(hidden_ref, hidden_exact):.2e}"
    )


if __name__ == "__main__":
    # python tests/test_autocast.py: Liger's autocast case, measured.
    for name in AUTOCAST_DTYPES:
        print(liger_amp_errors(name))
