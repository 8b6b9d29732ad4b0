"""Faults during training: non-finite losses are skipped and counted, then stop the run without
a checkpoint; an out-of-memory error says what was measured and what to change."""

from __future__ import annotations

import pytest
import torch

from setr_lowmem.compat import reset_accelerate_state
from setr_lowmem.config import config_from_dict, config_to_dict
from setr_lowmem.engine import train as train_mod
from setr_lowmem.engine.checkpoint import list_checkpoints
from setr_lowmem.model.loss import SegmentationLoss
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def config(tmp_path, **train):
    settings = dict(total_batch=4, micro_batch=2, out_dir=str(tmp_path), ckpt_every=0, max_bad_steps=3) | train
    cfg = tiny_config("pup", schedule=dict(iters=8), train=settings)
    return config_from_dict(config_to_dict(cfg))


def inject(monkeypatch, bad_calls: set[int], error: Exception | None = None):
    """Make the loss of the given forward calls NaN (or raise `error`), counting calls from 0."""
    real = SegmentationLoss.forward
    calls = {"n": 0}

    def forward(self, images, labels):
        n = calls["n"]
        calls["n"] += 1
        loss, parts = real(self, images, labels)
        if n in bad_calls:
            if error is not None:
                raise error
            return loss * float("nan"), parts
        return loss, parts

    monkeypatch.setattr(SegmentationLoss, "forward", forward)
    return calls


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def test_nan_loss_skips_the_step_and_is_counted(tmp_path, monkeypatch):
    clean = train_mod.train(config(tmp_path / "clean"))
    calls = inject(monkeypatch, {5})  # iteration 3 (counted from 1, as the log lines), second micro-batch
    faulty = train_mod.train(config(tmp_path / "faulty"))
    assert faulty["skipped"] == 1 and faulty["iteration"] == 8 and clean["skipped"] == 0
    # 8 iterations x 2 micro-batches, minus nothing: a skipped iteration still consumes its data
    assert calls["n"] == 16
    assert len(faulty["losses"]) == 7 and all(torch.isfinite(torch.tensor(faulty["losses"])))
    log = (tmp_path / "faulty" / "train.log").read_text()
    assert "iteration 3: non-finite loss or gradients, step skipped (1 skipped in all, 1 in a row)" in log
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "faulty")
    assert all(torch.isfinite(v).all() for v in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)  # one update fewer


def test_consecutive_nan_losses_stop_without_a_checkpoint(tmp_path, monkeypatch):
    inject(monkeypatch, set(range(6, 100)))  # from iteration 4 on
    with pytest.raises(train_mod.NonFiniteLossError, match="3 consecutive non-finite losses at iteration 6"):
        train_mod.train(config(tmp_path / "run", ckpt_every=2))
    # the checkpoint of iteration 2 was written before the fault; none after it
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["iter_0000002"]


def test_out_of_memory_reports_peak_and_what_to_change(tmp_path, monkeypatch):
    inject(monkeypatch, {2}, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(train_mod.OutOfMemory) as err:
        train_mod.train(config(tmp_path / "run"))
    msg = str(err.value)
    assert "\n" not in msg and "CUDA out of memory at iteration 2" in msg
    assert "lower train.micro_batch" in msg and "memory.checkpointing=full" in msg and "Tried to allocate 2.00 GiB" in msg
