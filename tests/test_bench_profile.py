"""``python -m softce_multi bench --profile``: the torch CPU loss's block loop, stage by stage,
tiny."""

from __future__ import annotations

from pathlib import Path

import pytest

from softce_multi._cli import bench
from softce_multi._cli.bench.profile import GRADIENTS, STAGES

pytest.importorskip("torch")


def test_bench_profile_times_every_stage_into_three_gradients(capsys):
    assert bench.main(["--profile", "--lengths", "64", "--vocab", "512", "--repeats", "3"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert "float32 [64, 512]" in lines[0]
    assert all(name in lines[1] for name in GRADIENTS)
    table = {line[:33].strip(): line[33:].split() for line in lines[2 : 3 + len(STAGES)]}
    assert list(table) == [*STAGES, "all"]
    times = {stage: [float(value) for value in values] for stage, values in table.items()}
    assert all(len(values) == len(GRADIENTS) and min(values) >= 0 for values in times.values())
    for column in range(len(GRADIENTS)):
        stages = sum(times[stage][column] for stage in STAGES)
        assert times["all"][column] == pytest.approx(stages, abs=0.05 * len(STAGES))
    assert lines[-3].startswith("the operator, fresh gradient:")
    assert "vocabulary of 8" in lines[-2]


@pytest.mark.parametrize(
    "extra", [["--busy-core"], ["--linear"], ["--sparse", "4"], ["--device", "cuda"], ["--json"]]
)
def test_bench_profile_refuses_what_it_would_ignore(extra, tmp_path: Path, capsys):
    if extra == ["--json"]:
        extra = ["--json", str(tmp_path / "profile.json")]

    with pytest.raises(SystemExit) as stop:
        bench.main(["--profile", "--lengths", "64", "--vocab", "512", *extra])

    assert stop.value.code == 2
    assert "--profile" in capsys.readouterr().err
