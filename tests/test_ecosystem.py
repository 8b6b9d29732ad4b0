"""What users of pip, the Hub and the usual tools expect: a wheel with its configs and commands, an
exported model that rebuilds itself, `save_pretrained`/`from_pretrained`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from setr_lowmem.config import ConfigError, config_to_dict, with_overrides
from setr_lowmem.engine import checkpoint as ckpt
from setr_lowmem.engine.hub import PretrainedSETR
from setr_lowmem.engine.inference import load_trained, model_config
from tests.conftest import fan_in_weights, tiny_config
from tests.helpers import ROOT, run


def _sh(args: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_a_wheel_trains_and_evaluates_through_its_commands_from_an_empty_directory(tmp_path):
    """pip wheel . -> a fresh environment -> `setr-train --cfg tiny_synthetic` in an empty directory
    (the config comes from the wheel), then `setr-evaluate` of the exported model without --cfg.
    The fresh environment takes this one's installed dependencies through a .pth line, so that the
    test needs no network; the package itself can only come from the wheel."""
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", src], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("setr_lowmem-*.whl"))
    env = tmp_path / "env"
    _sh([sys.executable, "-m", "venv", "--without-pip", env], cwd=tmp_path)
    purelib = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh([sys.executable, "-m", "pip", "--python", env / "bin/python", "install", "-q", "--no-deps", wheel], cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    where = _sh([env / "bin/python", "-c", "import setr_lowmem; print(setr_lowmem.__file__)"], cwd=work).stdout
    assert where.startswith(str(env)), where  # not this checkout
    _sh([env / "bin/setr-train", "--cfg", "tiny_synthetic", "schedule.iters=4", "train.val_every=0",
         "train.val_max_images=4", "train.log_every=2"], cwd=work)
    exported = work / "runs/tiny_synthetic/model.safetensors"
    assert exported.is_file()
    out = _sh([env / "bin/setr-evaluate", "--checkpoint", exported, "--max-images", "4"], cwd=work).stdout
    assert "mIoU" in out and (work / "runs/tiny_synthetic/eval.json").is_file()
    for command in ("setr-predict", "setr-export", "setr-plan", "setr-benchmark"):
        assert "usage:" in _sh([env / "bin" / command, "--help"], cwd=work).stdout


def test_an_exported_model_carries_its_config(tmp_path):
    run([sys.executable, "launch/train.py", "--cfg", "test_tiny", f"train.out_dir={tmp_path}", "schedule.iters=2",
         "model.decoder=naive", "model.head_channels=24", "train.val_every=0"])
    exported = tmp_path / "model.safetensors"
    stored = model_config(exported)  # test_tiny is PUP with 32 channels: these come from the file
    assert stored.model.decoder == "naive" and stored.model.head_channels == 24
    assert model_config(exported, overrides=["eval.mode=slide"]).eval.mode == "slide"
    assert ckpt.stored_config(ckpt.list_checkpoints(tmp_path)[-1]) == stored
    load_trained(stored, exported)  # loads strictly: every weight has its place
    # a file without one (imported from mmseg, or from an older export) asks for --cfg
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(ConfigError, match="bare.safetensors carries no config .*give --cfg"):
        model_config(bare)


def test_save_pretrained_and_from_pretrained_give_the_same_logits(tmp_path):
    cfg = tiny_config("pup")
    torch.manual_seed(0)
    model = PretrainedSETR(config_to_dict(cfg)).eval()
    model.save_pretrained(tmp_path / "hub")
    assert {p.name for p in (tmp_path / "hub").iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    loaded = PretrainedSETR.from_pretrained(tmp_path / "hub")
    assert loaded.cfg == cfg
    images = torch.randn(2, 3, cfg.data.crop, cfg.data.crop)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
        torch.manual_seed(1)
        other = PretrainedSETR(config_to_dict(cfg)).eval()  # what an unloaded model would give
        assert not torch.allclose(other(images), model(images))


@pytest.mark.parametrize("decoder,quarter", [("pup", False), ("naive", True), ("mla", True)])
def test_forward_crops_the_padding_and_predict_runs_the_test_protocol(decoder, quarter):
    """An image whose sides are not multiples of 16: the logits cover the image, not the encoder's padding
    (PUP at the image's size, Naive and MLA at a quarter, rounded up); `predict` normalises a raw image
    with the model's own mean and std and gives the evaluation's class map."""
    import numpy as np

    from setr_lowmem.engine.evaluate import predict_classes

    cfg = tiny_config(decoder)
    torch.manual_seed(0)
    model = PretrainedSETR(config_to_dict(cfg)).eval()
    fan_in_weights(model)  # a class map that varies
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 50, 70))
        padded = model.setr.predict(torch.randn(1, 3, 50, 70))
    assert tuple(logits.shape[-2:]) == ((13, 18) if quarter else (50, 70))
    assert tuple(padded.shape[-2:]) == ((16, 20) if quarter else (64, 80))  # 64 x 80: the encoder's padding
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    classes = model.predict(image)
    assert classes.shape == (50, 70) and classes.dtype == np.uint8 and len(np.unique(classes)) > 1
    assert np.array_equal(classes, predict_classes(model.setr, image, cfg, torch.device("cpu")).numpy())
    from PIL import Image

    assert np.array_equal(model.predict(Image.fromarray(image)), classes)
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        model.predict(image.astype(np.float32) / 255)  # a normalised array is refused, not mis-scaled


def test_a_hub_directory_has_a_model_card_that_says_what_it_is(tmp_path):
    run([sys.executable, "launch/train.py", "--cfg", "test_tiny", f"train.out_dir={tmp_path / 'run'}",
         "schedule.iters=6", "train.val_every=2", "--stop-after", "4"])
    checkpoint = ckpt.list_checkpoints(tmp_path / "run")[-1]
    run([sys.executable, "launch/export.py", str(checkpoint), str(tmp_path / "setr-tiny"), "--hub"])
    hub = tmp_path / "setr-tiny"
    card = (hub / "README.md").read_text()
    val = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if '"val"' in x][-1]
    for said in ("# SETR-PUP on synthetic", "64 x 64 crops", "background, disc, square", "4 of 6 iterations",
                 f"mIoU **{val['val']['mIoU']:.2f}**", "at iteration 4", 'from_pretrained("setr-tiny")',
                 "model.predict(image)", "decoder: pup", "total_batch: 4"):
        assert said in card, said
    assert "More Information Needed" not in card
    mask = os.umask(0)
    os.umask(mask)
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~mask for f in hub.iterdir())  # model.safetensors was 0600
    # the directory is also a --checkpoint for evaluate and predict
    out = run([sys.executable, "launch/evaluate.py", "--checkpoint", str(hub), "--max-images", "2"]).stdout
    assert "mIoU" in out
    with pytest.raises(ckpt.CheckpointError, match="model folder not found: .*nowhere"):
        PretrainedSETR.from_pretrained(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("log_with", ["tensorboard", "none"])
def test_trackers_log_into_the_run_directory_and_no_gpu_figure_on_a_cpu(tmp_path, log_with):
    from setr_lowmem.engine import train as train_mod
    from setr_lowmem.engine.step import reset_accelerate
    from tests.helpers import metrics
    from tests.test_faults import config

    reset_accelerate()
    cfg = with_overrides(config(tmp_path / "run", log_every=2), [f"train.log_with={log_with}"])
    train_mod.train(cfg, stop_after=2)
    reset_accelerate()
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(events) == (log_with == "tensorboard") and not (tmp_path / "run/tb").exists()
    logged = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert logged and all(set(r["mem"]) == {"host_rss"} for r in logged)  # no allocated/reserved of 0


def test_a_tracker_that_is_not_installed_is_named(tmp_path, monkeypatch):
    import accelerate.utils

    from setr_lowmem.engine.step import tracker

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match="train.log_with is wandb but wandb is not installed: pip install wandb"):
        tracker(with_overrides(tiny_config("pup"), ["train.log_with=wandb"]))
    assert tracker(with_overrides(tiny_config("pup"), ["train.log_with=none"])) is None


def test_official_class_names_and_palettes():
    from setr_lowmem.data.classes import class_names, class_palette

    ade = class_names("ade20k", 150)
    assert len(ade) == 150 and ade[:3] == ["wall", "building", "sky"] and ade[-1] == "flag"
    assert class_names("cityscapes", 19)[-1] == "bicycle" and class_names("pascal_context", 60)[0] == "background"
    assert class_names("pascal_context59", 59)[0] == "aeroplane"
    assert class_palette("cityscapes", 19)[0].tolist() == [128, 64, 128]  # road
    for name, n in (("ade20k", 150), ("cityscapes", 19), ("pascal_context", 60), ("pascal_context59", 59)):
        assert class_palette(name, n).shape == (n, 3)
    assert class_palette("ade20k", 150)[-1].tolist() == [92, 0, 255]  # flag
    assert class_names("synthetic", 3) == ["background", "disc", "square"]
    spread = class_names("synthetic", 150)  # a paper head on the built-in scenes: the kinds at their labels
    assert spread[0] == "background" and spread[19] == "disc" and spread[149] == "diamond" and spread[1] == "class 1"
    assert class_names("ade20k", 7)[6] == "class 6"  # a head of another size is not given ADE20K's names


def test_label_maps_are_palette_pngs_and_overlays_have_a_legend(tmp_path):
    import numpy as np
    from PIL import Image

    from setr_lowmem.data.classes import class_names, class_palette
    from setr_lowmem.engine.inference import label_png, overlay

    palette, names = class_palette("cityscapes", 19), class_names("cityscapes", 19)
    pred = np.zeros((40, 60), np.uint8)
    pred[:, 30:] = 13  # car
    pred[:5, :5] = 18  # bicycle
    label_png(pred, palette).save(tmp_path / "label.png")
    back = Image.open(tmp_path / "label.png")
    assert back.mode == "P" and np.array_equal(np.asarray(back), pred)
    assert np.array_equal(np.asarray(back.convert("RGB"))[0, 40], palette[13])
    image = np.full((40, 60, 3), 200, np.uint8)
    image[:, 45:] = 20  # half of the car's region is dark: its swatch shows the blend over the mean
    shown = np.asarray(overlay(image, pred, palette, names))
    strip = shown[:, 60:].reshape(-1, 3)
    colours = {tuple(c) for c in strip.tolist()}
    # each swatch looks like the regions it labels: the region's colour where the image is uniform under it
    assert shown.shape[1] > 60 and tuple(shown[20, 10]) in colours and tuple(shown[0, 0]) in colours
    car = tuple(int(round(v)) for v in (np.array([110.0] * 3) * 0.5 + palette[13] * 0.5))  # mean of 200 and 20
    assert car in colours
    assert not any(tuple(palette[k].tolist()) in colours for k in (0, 13, 18))  # never the unblended colour
    person = tuple(int(round(v)) for v in (np.array([200.0] * 3) * 0.5 + palette[11] * 0.5))
    assert person not in colours  # person: not in the prediction, not in the legend


def test_the_planner_does_not_let_noise_choose_between_equally_fast_plans():
    from setr_lowmem.sizing.measure import Measurement
    from setr_lowmem.sizing.planner import Plan, pick

    def tried(speed_b: float):
        a = (Plan.of(16, {"memory.checkpointing": "none"}), Measurement("a", 16, img_s=100.0, allocated=20.0))
        b = (Plan.of(8, {"memory.checkpointing": "full", "optim.bits": 8}), Measurement("b", 8, img_s=speed_b,
                                                                                     allocated=9.0))
        return [a, b]

    assert pick(tried(97.0), cuda=False).micro_batch == 8  # 3% slower: a tie, and 11 GiB more to spare
    assert pick(tried(90.0), cuda=False).micro_batch == 16  # 10% slower: the faster plan
    assert pick([], cuda=False) is None


def test_known_dependency_warnings_are_dropped_and_others_kept():
    import logging

    from setr_lowmem.cli import quiet_known_warnings

    quiet_known_warnings()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name, dropped in (("DeepSpeed", "You are using ZeRO with an untested optimizer, proceed with caution"),
                          ("bitsandbytes.backends.cpu.ops", "Please make sure you already `pip install kernels`")):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning(dropped)
            logger.warning("something else")
        finally:
            logger.removeHandler(handler)
    assert seen == ["something else", "something else"]


def test_accelerate_cpu_with_several_processes_is_said_to_run_one(tmp_path):
    from tests.helpers import accelerate, train

    launch = accelerate("--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no")
    proc = train(tmp_path / "run", "schedule.iters=1", launcher=launch)
    log = (tmp_path / "run/train.log").read_text()
    assert "1 process(es)" in log and "runs ONE process" in log and "--multi_gpu --num_processes N" in proc.stderr
    plain = train(tmp_path / "plain", "schedule.iters=1")
    assert "runs ONE process" not in plain.stderr
