"""The real launcher in every memory mode, exact resume, crash safety, several processes.

Each run is `python launch/train.py --cfg test_tiny ...` (a 2-block SETR-PUP on the
built-in scenes) in a subprocess, with real DeepSpeed engines and bitsandbytes optimizers.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, accelerate, checkpoint_tensors, losses, newest_checkpoint, run, train

LEVERS = ["memory.precision=bf16", "memory.upsample_backward=matmul", "memory.channels_last=true",
          "memory.compile_convs=true", "memory.fused_upsample_backend=torch"]
# mode: (overrides, what the log must say). The resumed modes' uninterrupted runs are also their
# "trains and the loss decreases" runs (test_resume_continues_exactly).
RESUME_MODES = {
    "fp32": ([], "optimizer SGD in use (no DeepSpeed)"),
    "zero2_offload": (["memory.deepspeed.stage=2", "memory.deepspeed.offload_optimizer=true"],
                      "DeepSpeed ZeRO-2 active: optimizer SGD states on the CPU (offloaded)"),
    "decoder_levers": (LEVERS, "torch.compile: 10 conv+BatchNorm+ReLU units of the decoder"),
    # with 8-bit SGD: bitsandbytes made the channels-last weights contiguous at the first step, so a
    # resumed run (built channels-last) convolved differently (tests/test_kernels.py, layout test)
    "decoder_levers_sgd8": ([*LEVERS, "optim.bits=8"], "optimizer SGD8bit in use"),
}
MODES = {
    "bf16": (["memory.precision=bf16"], "optimizer SGD in use"),
    "sgd8": (["optim.bits=8"], "optimizer SGD8bit in use"),
    "adamw8": (["optim.bits=8", "optim.name=adamw", "optim.lr=0.001"], "optimizer AdamW8bit in use"),
    "zero3_offload": (["memory.deepspeed.stage=3", "memory.deepspeed.offload_optimizer=true",
                       "memory.deepspeed.offload_params=true"],
                      "DeepSpeed ZeRO-3 active: optimizer SGD states on the CPU (offloaded), parameters offloaded"),
    "zero2_bf16_weights": (["memory.deepspeed.stage=2", "memory.precision=bf16_weights"],
                           "bf16 weights with fp32 master copies"),
    "full_checkpointing": (["memory.checkpointing=full"], "wrapped every encoder block, the neck and each head"),
}
ITERS = 30


def assert_trained(run_dir, proc, mode: str, expect_log: str) -> None:
    """The run said it used `mode`, ran every iteration, learned (mean loss of the last 5 iterations
    under 0.8x the first 5), evaluated and exported."""
    log = (run_dir / "train.log").read_text()
    assert expect_log in log, log[-2000:]
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, ITERS + 1))
    first = statistics.mean(curve[i] for i in range(1, 6))
    last = statistics.mean(curve[i] for i in range(ITERS - 4, ITERS + 1))
    assert last < 0.8 * first, f"{mode}: loss {first:.3f} -> {last:.3f}"
    assert f"final: iteration {ITERS}, mIoU" in proc.stdout
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_trains_and_the_loss_decreases(tmp_path, mode):
    overrides, expect_log = MODES[mode]
    assert_trained(tmp_path / mode, train(tmp_path / mode, f"schedule.iters={ITERS}", *overrides), mode, expect_log)


@pytest.mark.parametrize("mode", list(RESUME_MODES))
def test_resume_continues_exactly(tmp_path, mode):
    """N iterations straight == N/2, stop, resume, N/2: same losses, bit-identical weights and optimizer
    state; the straight run also trains (its loss decreases)."""
    overrides, expect_log = RESUME_MODES[mode]
    extra = [f"schedule.iters={ITERS}", *overrides]
    half = ITERS // 2
    assert_trained(tmp_path / "straight", train(tmp_path / "straight", *extra), mode, expect_log)
    stopped = train(tmp_path / "resumed", *extra, extra=["--stop-after", str(half)])
    assert "final:" not in stopped.stdout and (tmp_path / f"resumed/checkpoints/iter_{half:07d}").is_dir()
    train(tmp_path / "resumed", *extra, extra=["--resume", "auto"])
    assert f"at iteration {half}" in (tmp_path / "resumed/train.log").read_text()  # resumed from the stop
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a = checkpoint_tensors(newest_checkpoint(tmp_path / "straight"))
    b = checkpoint_tensors(newest_checkpoint(tmp_path / "resumed"))
    assert a.keys() == b.keys() and len(a) > 50
    optimizer_keys = [k for k in a if "optim" in k]
    assert optimizer_keys, "the checkpoint holds no optimizer state"
    if "optim.bits=8" in overrides:
        assert any(a[k].dtype == torch.uint8 for k in optimizer_keys), "8-bit states were not saved as uint8"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{mode}: {k} differs after resume"
    # any checkpoint exports to one fp32 file, ZeRO partitions consolidated, equal to the run's own export
    out = tmp_path / "exported.safetensors"
    run([sys.executable, "launch/export.py", str(newest_checkpoint(tmp_path / "straight")), str(out)])
    from safetensors.torch import load_file

    exported, final = load_file(str(out)), load_file(str(tmp_path / "straight/model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert all(v.dtype in (torch.float32, torch.int64) for v in exported.values())


def test_resume_refuses_a_config_that_changes_what_is_trained(tmp_path):
    train(tmp_path / "run", "schedule.iters=4", extra=["--stop-after", "2"])
    proc = train(tmp_path / "run", "schedule.iters=4", "optim.lr=0.02", "train.log_every=2",
                 extra=["--resume", "auto"], check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: cannot resume from") and "optim.lr: 0.01 -> 0.02" in err
    assert "log_every" not in err  # logging may change
    # a fresh run into a directory that holds checkpoints is refused rather than mixed in
    proc = train(tmp_path / "run", "schedule.iters=4", check=False)
    assert proc.returncode == 2 and "already holds the results of an earlier run (checkpoints/" in proc.stderr
    assert (tmp_path / "run/checkpoints/iter_0000002/meta.json").is_file()


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """Kill the run while it writes its second checkpoint: the first stays loadable and is resumed from."""
    out = tmp_path / "run"
    # a wider model, so that writing a checkpoint takes long enough to be caught in the act
    args = [sys.executable, "launch/train.py", "--cfg", "test_tiny", f"train.out_dir={out}", "schedule.iters=40",
            "train.ckpt_every=2", "train.keep_last=5", "model.embed_dim=512", "model.num_heads=8",
            "model.head_channels=128"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if (ckpts / "iter_0000002").is_dir() and any(p.name.startswith(".tmp-iter_0000004") for p in ckpts.iterdir()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed during a save"
    assert (ckpts / ".tmp-iter_0000004").exists() and not (ckpts / "iter_0000004").exists()
    assert (ckpts / "iter_0000002/meta.json").is_file()
    resumed = run(args + ["--resume", "auto", "--stop-after", "2"])
    log = (out / "train.log").read_text()
    assert f"resumed from {ckpts / 'iter_0000002'} at iteration 2" in log
    assert "removing incomplete checkpoint" in log and not (ckpts / ".tmp-iter_0000004").exists()
    assert (ckpts / "iter_0000004/meta.json").is_file() and resumed.returncode == 0


def test_sigterm_saves_and_resume_auto_continues(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "launch/train.py", "--cfg", "test_tiny", f"train.out_dir={out}", "schedule.iters=2000",
            "train.log_every=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "iter 3/" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr
    saved = newest_checkpoint(out)
    stopped_at = int(saved.name.split("_")[1])
    assert stopped_at >= 3
    run(args + ["--resume", "auto", "--stop-after", "1"])
    assert newest_checkpoint(out).name == f"iter_{stopped_at + 1:07d}"


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_two_processes_match_one_process_with_accumulation(tmp_path, backend):
    ds = ["memory.deepspeed.stage=2"] if backend == "zero2" else []
    common = ["schedule.iters=6", "train.total_batch=4", "train.micro_batch=2", *ds]
    train(tmp_path / "one", *common)  # accumulation 2
    launch = accelerate("--use_deepspeed" if ds else "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0")
    proc = train(tmp_path / "two", *common, launcher=launch)  # accumulation 1 on each
    assert "2 process(es)" in (tmp_path / "two/train.log").read_text(), proc.stderr[-2000:]
    assert proc.stdout.count("final: iteration 6") == 1  # said by the main process only
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    for k in a:
        if "running_" in k or "num_batches" in k:
            continue  # BatchNorm statistics: each process keeps its own (SyncBN needs GPUs)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_accelerate_cpu_flag_that_drops_deepspeed_fails_loudly(tmp_path):
    launch = accelerate("--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no")
    proc = train(tmp_path / "run", "memory.deepspeed.stage=2", launcher=launch, check=False)
    assert proc.returncode != 0  # the launcher turns the script's exit 2 into its own failure
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: "))
    assert "memory.deepspeed.stage is 2 but DeepSpeed is not active" in line and "--cpu" in line


def test_embedded_dataset_is_learned_well_above_chance(tmp_path):
    """A small SETR trained a few hundred steps on the built-in scenes, evaluated with the real launchers."""
    out = tmp_path / "run"
    proc = train(out, "schedule.iters=300", "train.total_batch=8", "train.micro_batch=8", "model.embed_dim=64",
                 "model.num_heads=4", "model.head_channels=32", "data.synthetic.num_val=24", "train.log_every=50")
    evaluated = run([sys.executable, "launch/evaluate.py", "--cfg", "test_tiny", "--checkpoint",
                     str(out / "model.safetensors"), "model.embed_dim=64", "model.num_heads=4",
                     "model.head_channels=32", "data.synthetic.num_val=24"])
    miou = float(evaluated.stdout.split("mIoU ")[1].split()[0])
    assert f"mIoU {miou:.2f}" in proc.stdout  # the launcher's own validation agrees
    # chance: predicting the most frequent class (background) everywhere gives IoU only for it
    import numpy as np

    from setr_lowmem.config import load_config
    from setr_lowmem.data.base import load_pair
    from setr_lowmem.data.sources import open_source

    cfg = load_config("test_tiny", ["data.synthetic.num_val=24"])
    src = open_source(cfg.data, "val")
    labels = np.concatenate([load_pair(src.rows, i, src.lut, 9)[1].ravel() for i in range(len(src))])
    chance = 100 * np.mean(labels == 0) / 9
    print(f"mIoU {miou:.2f} after 300 iterations; constant-prediction baseline {chance:.2f}")
    assert miou > 3 * chance and miou > 30, (miou, chance)
    # launch/predict.py on a folder of those images: a label map per image, right more often than all-background
    from PIL import Image

    folder, pred_dir = tmp_path / "images", tmp_path / "pred"
    folder.mkdir()
    truth = {}
    for i in range(4):
        image, label, _ = load_pair(src.rows, i, src.lut, 9)
        Image.fromarray(image).save(folder / f"scene{i}.png")
        truth[f"scene{i}"] = label
    run([sys.executable, "launch/predict.py", "--cfg", "test_tiny", "--checkpoint", str(out / "model.safetensors"),
         "--input", str(folder), "--out", str(pred_dir), "model.embed_dim=64", "model.num_heads=4",
         "model.head_channels=32"])
    hits = background = 0
    for name, label in truth.items():
        pred = np.asarray(Image.open(pred_dir / f"{name}_label.png"))
        assert pred.shape == label.shape and (pred_dir / f"{name}_overlay.png").is_file()
        hits += int((pred == label).sum())
        background += int((label == 0).sum())
    assert hits > background, (hits, background)
