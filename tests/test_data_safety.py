"""Nothing a user runs destroys work: pruning never counts a damaged checkpoint nor deletes the one just
written or resumed from; resuming an older checkpoint sets the newer ones aside; a save finishes through
a second Ctrl-C; diverged weights are never saved; a skipped step leaves BatchNorm as it was; a resume
may change the learning rate only when asked to, and then it takes effect."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from setr_lowmem.config import with_overrides
from setr_lowmem.engine import checkpoint as ckpt
from setr_lowmem.engine import train as train_mod
from setr_lowmem.engine.schedule import poly_lr
from setr_lowmem.engine.step import reset_accelerate
from tests.test_faults import config, inject


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def names(run_dir) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run_dir)]


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def again(cfg, **kw) -> dict:
    reset_accelerate()
    return train_mod.train(cfg, **kw)


def test_pruning_never_counts_a_damaged_checkpoint(tmp_path):
    """keep_last=1, checkpoints 2, 4, 6 with 6 damaged: the resumed run keeps 4 (its start) and 5 (just
    written), sets 6 aside; the next resume continues from 5."""
    cfg = config(tmp_path, ckpt_every=2, keep_last=3)
    train_mod.train(cfg, stop_after=6)
    assert names(tmp_path) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    flip_a_byte(tmp_path / "checkpoints/iter_0000006/model.safetensors")
    one = with_overrides(cfg, ["train.keep_last=1"])
    again(one, resume="auto", stop_after=1)
    assert names(tmp_path) == ["iter_0000004", "iter_0000005"]
    aside = list((tmp_path / "checkpoints/set_aside").glob("*/iter_0000006"))
    assert len(aside) == 1 and "is corrupt" in ckpt.damage(aside[0])
    assert again(one, resume="auto", stop_after=1)["start_iteration"] == 5
    assert names(tmp_path) == ["iter_0000005", "iter_0000006"]  # 4 went once 5 was no longer the start


def test_resuming_an_older_checkpoint_keeps_the_newer_ones_aside(tmp_path):
    cfg = config(tmp_path, ckpt_every=2, keep_last=2)
    train_mod.train(cfg)  # 8 iterations: keeps 6 and 8
    assert names(tmp_path) == ["iter_0000006", "iter_0000008"]
    start = tmp_path / "checkpoints/iter_0000006"
    again(cfg, resume=str(start), stop_after=1)
    assert names(tmp_path) == ["iter_0000006", "iter_0000007"]
    aside = list((tmp_path / "checkpoints/set_aside").iterdir())
    assert len(aside) == 1 and aside[0].name.endswith("resumed-from-iter_0000006")
    assert [p.name for p in aside[0].iterdir()] == ["iter_0000008"] and not ckpt.damage(aside[0] / "iter_0000008")
    assert "set aside the 1 newer checkpoint(s) (iter_0000008)" in (tmp_path / "train.log").read_text()


def test_a_writer_error_during_a_save_is_one_line_and_leaves_no_partial_files(tmp_path, monkeypatch):
    """What safetensors raises on a full disk (not an OSError): the earlier checkpoints and nothing else."""
    real, calls = Accelerator.save_state, {"n": 0}

    def save_state(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            (tmp_path / "checkpoints" / ".tmp-iter_0000004" / "model.safetensors").write_bytes(b"half")
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*the newest complete one is iter_0000002"):
        train_mod.train(config(tmp_path, ckpt_every=2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter_0000002"]


def test_a_second_ctrl_c_during_a_save_lets_it_finish(tmp_path, monkeypatch):
    real = ckpt.save_checkpoint

    def interrupted_save(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while the save runs
        return real(*args, **kw)

    monkeypatch.setattr(ckpt, "save_checkpoint", interrupted_save)
    summary = train_mod.train(config(tmp_path, ckpt_every=2))
    assert summary["stopped_by"] == "SIGINT" and summary["iteration"] == 2
    assert names(tmp_path) == ["iter_0000002"] and not ckpt.damage(tmp_path / "checkpoints/iter_0000002")
    assert "received while a checkpoint is being written" in (tmp_path / "train.log").read_text()


def test_a_second_ctrl_c_before_the_save_stops_at_once_in_one_line(tmp_path, monkeypatch):
    real, calls = train_mod.iterate, {"n": 0}

    def iterate(run):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C twice during iteration 3
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(run)

    monkeypatch.setattr(train_mod, "iterate", iterate)
    with pytest.raises(train_mod.Interrupted, match="stopped at once by a second Ctrl-C"):
        train_mod.train(config(tmp_path, ckpt_every=2))
    assert names(tmp_path) == ["iter_0000002"]


def test_diverged_weights_are_never_saved_and_the_advice_is_a_new_start(tmp_path):
    """optim.lr=1e30: after one step the weights are finite (about 1e30) but unusable."""
    cfg = with_overrides(config(tmp_path, ckpt_every=1), ["optim.lr=1e30"])
    with pytest.raises(train_mod.NonFiniteWeightsError, match=r"have diverged \(the largest is .*e\+[23]\d") as err:
        train_mod.train(cfg)
    assert "start again in a new train.out_dir" in str(err.value) and "--resume" not in str(err.value)
    assert names(tmp_path) == [] and not (tmp_path / "model.safetensors").exists()


def batchnorm_state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(tmp_path, monkeypatch):
    inject(monkeypatch, {1})  # iteration 1, second micro-batch: the forward of the first one moved BN
    run = train_mod.open_run(config(tmp_path), None, 1)
    try:
        before = batchnorm_state(run.step.module)
        assert before and train_mod.iterate(run) is True  # skipped
        after = batchnorm_state(run.step.module)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert train_mod.iterate(run) is False  # a good step moves them
        moved = batchnorm_state(run.step.module)
        assert any(not torch.equal(before[k], moved[k]) for k in before if "running_mean" in k)
    finally:
        run.lock.release()


def test_every_checkpoint_damaged_is_an_error_naming_what_to_do(tmp_path):
    cfg = config(tmp_path, ckpt_every=2)
    train_mod.train(cfg, stop_after=4)
    for p in ckpt.list_checkpoints(tmp_path):
        flip_a_byte(p / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint in .* is damaged .*set train.out_dir to a new"):
        again(cfg, resume="auto")
    assert names(tmp_path) == ["iter_0000002", "iter_0000004"]  # nothing was changed


def test_a_resume_may_change_the_learning_rate_only_when_asked_and_it_takes_effect(tmp_path):
    cfg = config(tmp_path, ckpt_every=2)
    train_mod.train(cfg, stop_after=4)
    lower = with_overrides(cfg, ["optim.lr=0.002", "schedule.min_lr=0.0001"])
    with pytest.raises(ckpt.CheckpointError, match="optim.lr: 0.01 -> 0.002 .*--allow-change optim.lr"):
        again(lower, resume="auto")
    with pytest.raises(ckpt.CheckpointError, match="--allow-change model.depth: only these keys may change"):
        again(lower, resume="auto", allow_change=("model.depth",))
    reset_accelerate()
    run = train_mod.open_run(lower, "auto", 1, ("optim.lr",))
    try:
        groups = {g["name"]: g["lr"] for g in run.step.scheduler.optimizer.param_groups}
        assert groups["encoder"] == pytest.approx(poly_lr(4, 0.002, lower.schedule))
        assert groups["head"] == pytest.approx(poly_lr(4, 0.02, lower.schedule))
    finally:
        run.lock.release()
    history = [json.loads(x) for x in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"] == ["optim.lr: 0.01 -> 0.002"] and history[-1]["iteration"] == 4
    assert "  lr: 0.002\n" in (tmp_path / "config.yaml").read_text()  # the run's config is the new one


def test_predict_keeps_inputs_apart_and_takes_a_file_a_glob_or_odd_images(tmp_path):
    """a.png and a.jpg get their own outputs; a single file and a glob work; a 16-bit photo is scaled,
    not clipped to white; a 3 x 2000 strip is predicted, not a traceback."""
    import numpy as np
    from PIL import Image

    from setr_lowmem.data.base import open_image
    from tests.bad_inputs import TINY, run_launcher

    run = tmp_path / "run"
    assert run_launcher("train", ["--cfg", "test_tiny", f"train.out_dir={run}", *TINY])[0] == 0
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (3, 2000, 3), dtype=np.uint8)).save(images / "strip.png")
    gray16 = (np.linspace(0, 40000, 40 * 50).reshape(40, 50)).astype(np.uint16)
    Image.fromarray(gray16).save(images / "g16.png")
    assert np.asarray(open_image(images / "g16.png", "RGB"))[..., 0].max() == round(40000 / 65535 * 255)

    def predict(inputs: str, out: str) -> list[str]:
        code, _, err = run_launcher("predict", ["--checkpoint", str(run / "model.safetensors"), "--input", inputs,
                                                "--out", str(tmp_path / out)])
        assert code == 0, err
        return sorted(p.name for p in (tmp_path / out).iterdir())

    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / "a_label.png")
    assert predict(str(images), "all") == [
        "a_jpg_label.png", "a_jpg_overlay.png", "a_label_label.png", "a_label_overlay.png", "a_png_label.png",
        "a_png_overlay.png", "g16_label.png", "g16_overlay.png", "strip_label.png", "strip_overlay.png"]
    assert Image.open(tmp_path / "all/strip_label.png").size == (2000, 3)
    assert predict(str(images / "a.jpg"), "one") == ["a_label.png", "a_overlay.png"]
    # an input named like another's class map (a_label.png beside a.png) gets outputs of its own
    assert predict(str(images / "*.png"), "glob") == ["a_label.png", "a_label_label.png", "a_label_overlay.png",
                                                       "a_overlay.png", "g16_label.png", "g16_overlay.png",
                                                       "strip_label.png", "strip_overlay.png"]
    assert sorted(p.name for p in images.iterdir()) == ["a.jpg", "a.png", "a_label.png", "g16.png", "strip.png"]


def test_export_into_a_folder_writes_model_safetensors_there(tmp_path):
    from tests.bad_inputs import TINY, run_launcher

    run = tmp_path / "run"
    assert run_launcher("train", ["--cfg", "test_tiny", f"train.out_dir={run}", *TINY])[0] == 0
    newest = ckpt.list_checkpoints(run)[-1]
    code, out, err = run_launcher("export", [str(newest), f"{tmp_path}/newdir/"])
    assert code == 0, err
    assert (tmp_path / "newdir" / "model.safetensors").is_file() and not ckpt.damage(newest)
    code, _, err = run_launcher("export", [str(newest), str(tmp_path / "newdir")])
    assert code == 2 and "already exists: not written over" in err
    assert run_launcher("export", [str(newest), str(tmp_path / "newdir"), "--overwrite"])[0] == 0


def test_sighup_saves_and_stops_as_sigterm_does(tmp_path, monkeypatch):
    """A closed terminal (or an ssh session that dropped) sends SIGHUP: the iteration is saved."""
    real, calls = train_mod.iterate, {"n": 0}

    def iterate(run):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGHUP)
        return real(run)

    monkeypatch.setattr(train_mod, "iterate", iterate)
    summary = train_mod.train(config(tmp_path))
    assert summary["stopped_by"] == "SIGHUP" and summary["iteration"] == 3
    assert names(tmp_path) == ["iter_0000003"] and not ckpt.damage(tmp_path / "checkpoints/iter_0000003")


def test_ctrl_c_before_a_run_starts_is_one_line(capsys):
    from setr_lowmem.cli import run_main

    def main():
        raise KeyboardInterrupt  # what Ctrl-C does while torch is still importing

    with pytest.raises(SystemExit) as stop:
        run_main(main)
    assert stop.value.code == 130 and capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"


def test_a_hub_export_that_cannot_be_written_leaves_no_folder(tmp_path, monkeypatch):
    from setr_lowmem.engine.hub import PretrainedSETR
    from tests.bad_inputs import TINY, run_launcher

    run = tmp_path / "run"
    assert run_launcher("train", ["--cfg", "test_tiny", f"train.out_dir={run}", *TINY])[0] == 0

    def full_disk(self, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(PretrainedSETR, "save_pretrained", full_disk)
    code, _, err = run_launcher("export", [str(ckpt.list_checkpoints(run)[-1]), str(tmp_path / "hub"), "--hub"])
    assert code == 2 and "Traceback" not in err and "No space left on device" in err
    assert not (tmp_path / "hub").exists()
