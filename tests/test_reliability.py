"""What a run keeps when things go wrong: no non-finite weights saved, a failed validation or a full
disk does not cost the training, a damaged checkpoint is skipped, a signal to the whole process group
saves, a user's memory cap survives the planner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from setr_lowmem.config import with_overrides
from setr_lowmem.data.base import DataError
from setr_lowmem.engine import checkpoint as ckpt
from setr_lowmem.engine import train as train_mod
from setr_lowmem.engine.step import TrainingStep, reset_accelerate
from setr_lowmem.model.loss import SegmentationLoss
from tests.helpers import ROOT, newest_checkpoint, run
from tests.test_faults import config, inject


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


class NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradients_skip_the_step(tmp_path, monkeypatch):
    real, calls = SegmentationLoss.forward, {"n": 0}

    def forward(self, images, labels):
        loss, parts = real(self, images, labels)
        calls["n"] += 1
        return (NaNGrad.apply(loss) if calls["n"] == 3 else loss), parts  # iteration 2, first micro-batch

    monkeypatch.setattr(SegmentationLoss, "forward", forward)
    summary = train_mod.train(config(tmp_path))
    assert summary["skipped"] == 1 and summary["iteration"] == 8
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "model.safetensors")).values())
    assert "iteration 2: non-finite loss or gradients, step skipped" in (tmp_path / "train.log").read_text()


def test_non_finite_weights_are_never_saved_or_exported(tmp_path, monkeypatch):
    real = TrainingStep.finish

    def finish(self, skipped):
        out = real(self, skipped)
        if self.scheduler.last_epoch == 6:  # the 6th step leaves NaN weights (its loss was finite)
            with torch.no_grad():
                next(self.module.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(TrainingStep, "finish", finish)
    with pytest.raises(train_mod.NonFiniteWeightsError, match="not finite at iteration 6: no checkpoint written"):
        train_mod.train(config(tmp_path, ckpt_every=2))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000002", "iter_0000004"]
    assert not (tmp_path / "model.safetensors").exists()


def test_a_failed_validation_keeps_the_training(tmp_path, monkeypatch):
    real, calls = train_mod.evaluate, {"n": 0}

    def evaluate(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise DataError("cannot read image val/0007.png: truncated")
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    summary = train_mod.train(config(tmp_path, val_every=4, ckpt_every=4))
    assert summary["iteration"] == 8 and summary["val"]["images"] > 0 and not summary["val_error"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000004", "iter_0000008"]
    assert (tmp_path / "model.safetensors").is_file()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"iteration": 4, "val_error": "cannot read image val/0007.png: truncated"} in records
    assert "validation failed, training goes on" in (tmp_path / "train.log").read_text()


def test_a_skipped_last_iteration_still_ends_with_its_checkpoint_and_export(tmp_path, monkeypatch):
    inject(monkeypatch, {14})  # iteration 8 of 8, first micro-batch
    summary = train_mod.train(config(tmp_path))
    assert summary["skipped"] == 1 and summary["iteration"] == 8
    final = ckpt.checkpoint_dir(tmp_path) / "iter_0000008"
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert exported.keys() == ckpt.consolidated_state_dict(final).keys()
    assert all(torch.equal(v, ckpt.consolidated_state_dict(final)[k]) for k, v in exported.items())


def test_resume_auto_skips_a_damaged_checkpoint_and_says_why(tmp_path):
    train_mod.train(config(tmp_path, ckpt_every=2), stop_after=4)
    newest = ckpt.checkpoint_dir(tmp_path) / "iter_0000004"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: same size, another checksum
    weights.write_bytes(bytes(data))
    assert "is corrupt" in ckpt.damage(newest)
    reset_accelerate()
    summary = train_mod.train(config(tmp_path, ckpt_every=2), resume="auto", stop_after=1)
    assert summary["start_iteration"] == 2
    log = (tmp_path / "train.log").read_text()
    assert f"skipping checkpoint {newest}: model.safetensors is corrupt" in log
    aside = next((tmp_path / "checkpoints" / "set_aside").glob("*/iter_0000004"))  # kept, out of the way
    with pytest.raises(ckpt.CheckpointError, match="iter_0000004 cannot be used: model.safetensors is corrupt"):
        ckpt.export_fp32(aside, tmp_path / "out.safetensors")


def test_resume_auto_without_a_checkpoint_says_it_starts_fresh(tmp_path):
    train_mod.train(config(tmp_path), resume="auto", stop_after=1)
    assert "no checkpoint in" in (tmp_path / "train.log").read_text()


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    real, calls = Accelerator.save_state, {"n": 0}

    def save_state(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device; the newest complete one is iter_0000002"):
        train_mod.train(config(tmp_path, ckpt_every=2))
    root = ckpt.checkpoint_dir(tmp_path)
    assert [p.name for p in root.iterdir()] == ["iter_0000002"] and not ckpt.damage(root / "iter_0000002")


def test_resuming_with_another_micro_batch_says_batchnorm_changes(tmp_path):
    train_mod.train(config(tmp_path, ckpt_every=2), stop_after=2)
    reset_accelerate()
    train_mod.train(config(tmp_path, ckpt_every=2, micro_batch=1), resume="auto", stop_after=1)
    assert "BatchNorm now sees batches of 1" in (tmp_path / "train.log").read_text()


def test_sigterm_to_the_process_group_saves_despite_dataloader_workers(tmp_path):
    """What Slurm, Kubernetes and `timeout` do: SIGTERM to every process of the group, workers included."""
    out = tmp_path / "run"
    args = [sys.executable, "launch/train.py", "--cfg", "test_tiny", f"train.out_dir={out}", "schedule.iters=2000",
            "data.num_workers=2", "train.log_every=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = out / "train.log"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.is_file() and "iter 3/" in log.read_text()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr
    saved = newest_checkpoint(out)
    assert not ckpt.damage(saved) and int(saved.name.split("_")[1]) >= 3
    run(args + ["--resume", "auto", "--stop-after", "1"])


def test_the_planner_gives_back_the_memory_cap_it_found(monkeypatch):
    """train.py --cap-gib 12 --auto-fit 10: after the search the process is capped at 12 GiB again."""
    from setr_lowmem.sizing import measure as measure_mod
    from setr_lowmem.sizing import planner as plan_mod
    from setr_lowmem.config import load_config

    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: fractions.append(f))
    monkeypatch.setattr(plan_mod, "measure", lambda cfg, **kw: measure_mod.Measurement(
        "fake", cfg.train.micro_batch, img_s=1.0, allocated=1.0, reserved=1.0, device=1.0))
    cuda = torch.device("cuda", 0)
    measure_mod.set_memory_cap(12, cuda)
    try:
        plan, _ = plan_mod.search(load_config("test_tiny"), 10, device=cuda, report=lambda _: None,
                                  micro_batches=[2], policies=("none",))
        assert plan is not None and fractions == [12 / 80, 10 / 80, 12 / 80]
        assert measure_mod.memory_cap(cuda) == 12
    finally:
        measure_mod._CAPS.clear()


def test_an_error_ends_the_dataloader_workers_and_frees_the_run_directory(tmp_path, monkeypatch):
    """The caller may keep the error (and through its traceback the run) as long as it likes: the
    persistent workers end with the run anyway, and the next run may take the directory."""
    import multiprocessing

    from setr_lowmem.engine.rundir import RunLock

    inject(monkeypatch, {3}, RuntimeError("boom"))
    cfg = with_overrides(config(tmp_path), ["data.num_workers=2"])
    with pytest.raises(RuntimeError, match="boom") as kept:
        train_mod.train(cfg)
    assert kept.traceback  # the frames (and the run) are still referenced here
    deadline = time.time() + 30
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.1)
    assert multiprocessing.active_children() == []
    RunLock(tmp_path).acquire().release()


def test_a_live_loader_does_not_hang_the_interpreter_exit(tmp_path):
    """Python ends daemon workers with SIGTERM at exit and then waits for them: a worker that ignored
    SIGTERM would hang every process that still held a loader at exit (a test run, a notebook)."""
    script = ("from setr_lowmem.data.loader import build_train_loader\n"
              "from tests.conftest import tiny_config\n"
              "cfg = tiny_config('naive', data=dict(num_workers=2))\n"
              "KEPT = iter(build_train_loader(cfg, cfg.train.accumulation()))\n"
              "next(KEPT)\n"
              "print('exiting', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]
