"""The GPU suite and the parity benchmark run end to end on the CPU (`--tiny`), so that a GPU
machine's short lease is not the first place they run after a change."""

from __future__ import annotations

import json
import math
import sys

import torch

from tests.helpers import run


def test_gpu_suite_runs_its_stages_on_the_cpu(tmp_path):
    """env, gputests (skipped without a GPU), one paper config through the launcher, the profile."""
    proc = run([sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--stages", "env", "gputests", "paper", "profile",
                "--configs", "pup_ade20k", "--iters", "2", "--out", str(tmp_path)], timeout=300)
    assert "FAILED" not in proc.stdout and not list(tmp_path.glob("failed-*")), proc.stdout
    env = json.loads(next(tmp_path.glob("env_cpu-tiny_*.json")).read_text())
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["missing"] == [] and env["private_apis_missing"] == []
    assert next(tmp_path.glob("gputests_*.txt")).read_text().startswith("no GPU")
    (row,) = json.loads(next(tmp_path.glob("paper_cpu-tiny_*.json")).read_text())["rows"]
    assert row["config"] == "pup_ade20k" and row["exit"] == 0 and row["iterations"] == 2
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    profile = next(tmp_path.glob("profile_cpu-tiny_*.md")).read_text()
    assert "ms per step" in profile and "| GEMM |" in profile


def test_parity_runs_its_rows_on_the_cpu(tmp_path):
    """The baseline and bf16 autocast trained through the launcher: each row's curve, its mIoU, and
    a gap to the baseline that shows the technique was applied."""
    proc = run([sys.executable, "benchmarks/parity.py", "--tiny", "--out", str(tmp_path), "--work",
                str(tmp_path / "runs")], timeout=300)
    assert "wrote " in proc.stdout
    data = json.loads(next(tmp_path.glob("parity_cpu_*.json")).read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["fp32 baseline", "bf16 autocast"] and data["config"] == "test_tiny"
    for r in rows.values():
        assert r["exit"] == 0 and sorted(map(int, r["curve"])) == [1, 2, 3, 4] and r["mIoU"] is not None, r
    assert rows["fp32 baseline"]["gap"] == 0 and rows["bf16 autocast"]["gap"] > 0
    assert {p.suffix for p in tmp_path.glob("parity_cpu_*")} == {".md", ".json", ".png"}
