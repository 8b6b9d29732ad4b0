"""Running the real launchers in subprocesses and reading what they leave behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], timeout: int = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repository root; on unexpected failure show its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train(out_dir: Path, *overrides: str, cfg: str = "test_tiny", extra: list[str] | None = None,
          launcher: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    """`python launch/train.py --cfg <cfg> train.out_dir=<out_dir> <overrides>` (or under `launcher`)."""
    cmd = (launcher or [sys.executable]) + ["launch/train.py", "--cfg", cfg, *(extra or []),
                                            f"train.out_dir={out_dir}", *overrides]
    return run(cmd, **kw)


def accelerate(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def metrics(run_dir: Path) -> list[dict]:
    """The run's `metrics.jsonl` records, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """Iteration -> mean loss of the logged window (later records win after a resume)."""
    return {r["iteration"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (weights, optimizer state incl. ZeRO partitions), flattened by path."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(ckpt).rglob("*")):
        rel = str(path.relative_to(ckpt))
        if path.suffix == ".safetensors":
            out.update({f"{rel}:{k}": v for k, v in load_file(str(path)).items()})
        elif path.suffix in (".bin", ".pt") or path.name.endswith("optim_states.pt"):
            _flatten(torch.load(path, map_location="cpu", weights_only=False), rel, out)
    return out


def _flatten(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)


def newest_checkpoint(run_dir: Path) -> Path:
    found = sorted((Path(run_dir) / "checkpoints").glob("iter_*"))
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]
