"""What a long run leaves and says: dated log lines with the time per iteration, the time left and each
head's loss; the final line in train.log too; the best model by validation mIoU kept beside the last
checkpoints; one TensorBoard run; files with the user's usual permissions; no lock file left."""

from __future__ import annotations

import json
import os
import re

import pytest
from safetensors import safe_open

from setr_lowmem.engine import train as train_mod
from setr_lowmem.engine.step import reset_accelerate
from tests.test_faults import config


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def scripted_validation(monkeypatch, scores: dict[int, float]):
    """Validation gives mIoU `scores[iteration]` (the real evaluation of a tiny model is flat)."""
    def evaluate(model, cfg, device, **kw):
        it = len(calls) and calls[-1]
        return {"mIoU": scores[it], "aAcc": 50.0, "mAcc": 40.0, "images": 4, "IoU": [], "Acc": []}

    calls: list[int] = []
    real_validate = train_mod._validate

    def validate(run):
        calls.append(run.state.iteration)
        return real_validate(run)

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    monkeypatch.setattr(train_mod, "_validate", validate)


def best_of(run_dir) -> tuple[float, int]:
    with safe_open(str(run_dir / "best_mIoU.safetensors"), "pt") as f:
        meta = f.metadata()
    return float(meta["mIoU"]), int(meta["iteration"])


def test_the_best_model_is_kept_and_named_in_the_final_line(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, {2: 30.0, 4: 45.0, 6: 41.0, 8: 44.0})
    summary = train_mod.train(config(tmp_path, val_every=2, keep_last=1))
    assert best_of(tmp_path) == (45.0, 4)
    assert summary["best"]["iteration"] == 4 and summary["best"]["score"] == 45.0
    # kept although the checkpoint of iteration 4 was pruned (keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter_0000008"]
    line = train_mod.final_line(summary)
    assert "best mIoU 45.00 at iteration 4" in line and line in (tmp_path / "train.log").read_text()


def test_a_resumed_run_compares_with_the_best_it_already_has(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, {2: 30.0, 4: 45.0, 6: 41.0, 8: 46.0})
    cfg = config(tmp_path, val_every=2)
    train_mod.train(cfg, stop_after=6)
    assert best_of(tmp_path) == (45.0, 4)
    reset_accelerate()
    train_mod.train(cfg, resume="auto")
    assert best_of(tmp_path) == (46.0, 8)


def test_log_lines_are_dated_with_time_per_iteration_eta_and_each_head(tmp_path):
    train_mod.train(config(tmp_path, log_every=4))
    log = (tmp_path / "train.log").read_text()
    line = next(x for x in log.splitlines() if " iter 4/8 " in x)
    assert re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} INFO iter 4/8 loss ", line), line
    assert re.search(r"\(decode \d\.\d{4} aux_0 \d\.\d{4} aux_1 \d\.\d{4} aux_2 \d\.\d{4}\)", line), line
    assert re.search(r" [\d.]+ s/it eta \d\d:\d\d:\d\d ", line), line
    record = next(r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                  if r.get("iteration") == 4 and "loss" in r)
    heads = record["losses"]
    assert list(heads) == ["decode.loss_ce", "aux_0.loss_ce", "aux_1.loss_ce", "aux_2.loss_ce"]
    assert sum(heads.values()) == pytest.approx(record["loss"], rel=1e-5)  # the parts make up the total
    assert record["s_per_it"] > 0 and record["eta_s"] >= 0


def test_one_tensorboard_run_usual_permissions_and_no_lock_left(tmp_path):
    train_mod.train(config(tmp_path, val_every=4, log_every=2, ckpt_every=4))
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert [e for e in entries if e.startswith("events.out.tfevents")] and not (tmp_path / ".lock").exists()
    assert [e for e in entries if (tmp_path / e).is_dir()] == ["checkpoints"]  # no timestamped run folders
    mask = os.umask(0)
    os.umask(mask)
    for f in [tmp_path / "model.safetensors", tmp_path / "best_mIoU.safetensors",
              *(tmp_path / "checkpoints").rglob("*.safetensors")]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_a_cpu_run_that_would_not_fit_host_memory_stops_before_it_starts(tmp_path, monkeypatch):
    """Without a GPU a large model is forecast first: one line instead of the kernel's out-of-memory kill."""
    import psutil

    from tests.bad_inputs import run_launcher

    class Little:
        available = 2**29  # half a GiB: less than any training run needs

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    large = ["model.embed_dim=384", "model.depth=12", "model.num_heads=6", "model.out_indices=[2,5,8,11]"]
    code, _, err = run_launcher("train", ["--cfg", "test_tiny", f"train.out_dir={tmp_path / 'run'}", "schedule.iters=1",
                                          *large])
    assert code == 2 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert re.search(r"no GPU: this run would train in host memory and needs about [\d.]+ GiB .* (2[0-9])M "
                     r"parameters\), but 0.5 GiB is available", line), line
    assert not (tmp_path / "run").exists()


def test_a_lock_taken_on_a_file_its_holder_just_removed_is_taken_again(tmp_path, monkeypatch):
    """A run that ends removes its lock file: a second run that opened the file before that must not
    believe it holds the directory (a third would then create a new file and hold it too)."""
    import fcntl

    from setr_lowmem.engine import rundir

    first = rundir.RunLock(tmp_path).acquire()
    real, calls = fcntl.flock, {"n": 0}

    def flock(file, op):
        calls["n"] += 1
        if calls["n"] == 1:
            first.release()  # the holder ends while the second run waits on the file it opened
        return real(file, op)

    monkeypatch.setattr(rundir.fcntl, "flock", flock)
    second = rundir.RunLock(tmp_path).acquire()
    with pytest.raises(rundir.RunDirError, match="is in use by another run"):
        rundir.RunLock(tmp_path).acquire()  # a third run sees the second's lock
    second.release()
    assert not (tmp_path / ".lock").exists()
