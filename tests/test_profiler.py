"""The profiler, the benchmark and the auto-fit planner, on the CPU with tiny models."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from setr_lowmem.config import load_config
from setr_lowmem.sizing.measure import build_step, measure, train_flops_per_image
from setr_lowmem.sizing.planner import apply_plan, search
from setr_lowmem.sizing.meters import Peaks, breakdown_step, fit_line, memory_timeline_png, timeline_peak
from tests.helpers import ROOT, run

TINY = ["model.embed_dim=128", "model.depth=2", "model.num_heads=4", "model.out_indices=[0,0,1,1]",
        "model.head_channels=32", "data.crop=64", "model.pretrained=", "data.num_workers=0"]


def cfg(*extra: str, batch: int = 2):
    return load_config("pup_ade20k", TINY + [f"train.micro_batch={batch}", f"train.total_batch={batch}", *extra])


def test_categories_add_up_to_the_measured_total():
    step = build_step(cfg("memory.precision=fp32", "memory.checkpointing=none"), torch.device("cpu"))
    step()  # optimizer states exist
    bd = breakdown_step(step.module, step.optimizer, step.forward_backward, step.optimizer_step)
    assert sum(bd.categories.values()) == pytest.approx(bd.peak, rel=1e-9)
    assert set(bd.phases) == {"forward", "backward", "optimizer step"}
    for phase in bd.phases.values():
        parts = {k: v for k, v in phase.items() if k != "total"}
        assert sum(parts.values()) == pytest.approx(phase["total"], rel=1e-9)
    params = sum(p.numel() * 4 for p in step.module.parameters()) / 2**30
    assert bd.categories["params"] == pytest.approx(params, rel=1e-6)
    assert bd.categories["optimizer"] == pytest.approx(params, rel=1e-6)  # SGD momentum: one fp32 copy
    # PyTorch's other tracker (the profiler's memory timeline) measures the same step independently
    independent = timeline_peak(step, torch.device("cpu"))
    assert bd.peak == pytest.approx(independent, rel=0.15), (bd.peak, independent)


def test_the_root_only_tracker_reports_what_the_stock_tracker_does(monkeypatch):
    """breakdown_step's tracker skips the submodules' peaks (speed); its results equal MemTracker's."""
    from setr_lowmem.compat import mem_tracker
    from setr_lowmem.sizing import meters as profiler

    MemTracker = mem_tracker().MemTracker

    step = build_step(cfg("memory.precision=fp32", "memory.checkpointing=blocks"), torch.device("cpu"))
    step()
    fast = breakdown_step(step.module, step.optimizer, step.forward_backward, step.optimizer_step)
    assert type(profiler._root_tracker(step.module)) is not MemTracker  # the override is in use
    monkeypatch.setattr(profiler, "_root_tracker", lambda root: MemTracker())
    stock = breakdown_step(step.module, step.optimizer, step.forward_backward, step.optimizer_step)
    assert fast.peak == stock.peak and fast.categories == stock.categories
    assert fast.phases == stock.phases and fast.phases["backward"]["total"] > 0


def test_checkpointing_shrinks_the_activation_category():
    plain = ["memory.classifier_first=false", "memory.fused_upsample_loss=false"]  # checkpointing alone
    none = measure(cfg("memory.checkpointing=none", *plain), steps=2)
    full = measure(cfg("memory.checkpointing=full", *plain), steps=2)
    assert full.categories["activations"] < 0.5 * none.categories["activations"]
    assert full.allocated < none.allocated
    assert full.phases["forward"]["activations"] < none.phases["forward"]["activations"]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_eight_bit_states_shrink_the_optimizer_category_about_4x(name):
    lr = "optim.lr=0.001"
    m32 = measure(cfg(f"optim.name={name}", "optim.bits=32", lr), steps=2)
    m8 = measure(cfg(f"optim.name={name}", "optim.bits=8", lr), steps=2)
    ratio = m32.categories["optimizer"] / m8.categories["optimizer"]
    assert 3.0 < ratio < 4.5, ratio
    assert m32.categories["params"] == m8.categories["params"]


def test_flops_are_counted_not_typed_in():
    """torch.utils.flop_counter on the meta device: SETR-PUP at 512 costs 2.95 TFLOP per training image."""
    full = load_config("pup_ade20k", ["model.pretrained="])
    assert train_flops_per_image(full) / 1e12 == pytest.approx(2.948, abs=0.01)
    assert train_flops_per_image(load_config("pup_cityscapes", ["model.pretrained="])) > 2 * train_flops_per_image(full)


def test_planner_picks_a_plan_that_runs_under_a_small_budget():
    base = cfg(batch=4)
    roomy = measure(apply_plan_args(base, 4, "none", 32), steps=2)
    frugal = measure(apply_plan_args(base, 1, "full", 8), steps=2)
    budget = (roomy.allocated + frugal.allocated) / 2  # GiB, between the two
    lines = []
    plan, tried = search(base, budget, steps=2, report=lines.append, policies=("none", "full"))
    assert plan is not None and len(tried) >= 2 and len(lines) == len(tried)
    assert any(not m.fits for _, m in tried)  # the roomiest plan is over the budget
    again = measure(apply_plan(base, plan), steps=2)
    assert again.allocated <= budget, (plan, again.allocated, budget)
    assert 4 % plan.micro_batch == 0  # the effective batch is kept through accumulation


def apply_plan_args(base, mb, policy, bits):
    from setr_lowmem.sizing.planner import Plan

    return apply_plan(base, Plan.of(mb, {"memory.checkpointing": policy, "memory.every_k": 1, "optim.bits": bits}))


def test_planner_command_line_measures_every_plan_and_prints_the_line_to_paste():
    proc = run([sys.executable, "launch/plan.py", "--cfg", "test_tiny", "--measure", "--budget-gib", "0.02",
                "--steps", "2"])
    assert "test_tiny: measured on this CPU, 2 steps per plan" in proc.stdout and "leaves 5% of the 0.02 GiB" in proc.stdout
    assert "paste: python launch/train.py --cfg test_tiny train.micro_batch=" in proc.stdout
    assert "--auto-fit 0.02" in proc.stdout and proc.stdout.count(" GiB") >= 2


def test_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    proc = run([sys.executable, "benchmarks/memory.py", "--rows", "naive", "head+loss", "ZeRO-2 offload",
                "--batches", "2", "--steps", "2", "--out", str(tmp_path), "--timeline"])
    assert "no GPU: running the same matrix on a tiny SETR-PUP" in proc.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    stems = {f.rsplit(".", 1)[0] for f in files if not f.endswith("_timeline.png")}
    assert len(stems) == 1 and next(iter(stems)).startswith("memory_cpu-tiny_")
    assert {f.rsplit(".", 1)[1] for f in files} == {"md", "csv", "json", "png"}
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {(r["label"], r["micro_batch"]): r for r in data["results"]}
    assert set(rows) == {(n, 2) for n in ("naive", "head+loss", "ZeRO-2 offload")}
    for r in rows.values():
        assert r["fits"] and r["img_s"] > 0 and r["tflop_per_img"] > 0
    assert rows[("head+loss", 2)]["categories"]["activations"] < rows[("naive", 2)]["categories"]["activations"]
    assert math.isnan(rows[("ZeRO-2 offload", 2)]["allocated"])  # no MemTracker breakdown under DeepSpeed
    md = next(tmp_path.glob("*.md")).read_text()
    assert md.count("| naive |") == 1 and "CPU run on a tiny model" in md
    assert (tmp_path / f"{next(iter(stems))}_timeline.png").stat().st_size > 1000


def test_benchmark_rows_of_the_decoder_levers_run_on_the_cpu(tmp_path):
    proc = run([sys.executable, "benchmarks/memory.py", "--rows", "fused upsample+CE", "Triton fused loss",
                "compiled convs", "--batches", "2", "--steps", "2", "--out", str(tmp_path), "--no-breakdown"])
    assert "Triton fused loss: not run (needs a GPU)" in proc.stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["label"] for r in data["results"]] == ["fused upsample+CE", "compiled convs"]
    assert all(r["fits"] and r["img_s"] > 0 for r in data["results"])
    # the rows are cumulative; on the CPU the later ones keep the PyTorch loss instead of Triton's
    bench = load_benchmark("memory")
    gpu, cpu = bench.row_overrides("compiled convs", cuda=True), bench.row_overrides("compiled convs", cuda=False)
    assert "memory.fused_upsample_backend=triton" in gpu and "memory.fused_upsample_backend=triton" not in cpu
    assert [x for x in gpu if x != "memory.fused_upsample_backend=triton"] == cpu
    assert cpu[-4:] == ["memory.fused_upsample_backend=torch", "memory.upsample_backward=matmul",
                        "memory.channels_last=true", "memory.compile_convs=true"]
    assert "memory.channels_last=false" in bench.row_overrides("ZeRO-2 offload")  # DeepSpeed refuses NHWC weights


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (its functions, without running its main)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/targets.py: the planner's pick with the levers on, then the same plan with them off."""
    run([sys.executable, "benchmarks/targets.py", "--case", "ade20k-mb16", "--policies", "full",
         "--steps", "2", "--out", str(tmp_path)])
    data = json.loads(next(tmp_path.glob("targets_cpu-tiny_*.json")).read_text())
    (r,) = data["results"]
    assert [(t["plan"]["memory.checkpointing"], t["plan"]["optim.bits"], t["micro_batch"]) for t in r["tried"]] == [
        ("full", 32, 16), ("full", 8, 16)]
    assert r["levers_on"]["fits"] and r["levers_off"]["fits"] and r["verdict"].startswith("not judged")
    assert r["levers_off"]["micro_batch"] == r["levers_on"]["micro_batch"] == 16  # the same plan, levers off
    assert r["levers_off"]["img_s"] > 0 and r["levers_off"]["allocated"] > 0
    md = next(tmp_path.glob("targets_cpu-tiny_*.md")).read_text()
    assert "| ADE20K 512, micro-batch 16, no accumulation | <= 12 GiB (device <= 13), >= 80 img/s |" in md


def test_memory_timeline_png(tmp_path, monkeypatch):
    """What the timeline draws: one band per category of PyTorch's profiler, in MiB for a tiny
    model, the parameters flat at their size all along, every gradient alive at once during the
    backward, SGD's momentum made by the step, activations freed by its end."""
    import matplotlib.axes
    import matplotlib.figure
    import matplotlib.image
    import numpy as np

    drawn = {}
    stackplot, savefig = matplotlib.axes.Axes.stackplot, matplotlib.figure.Figure.savefig

    def spy(self, x, *ys, labels=(), **kwargs):
        drawn.update(x=np.asarray(x), bands=dict(zip(labels, map(np.asarray, ys), strict=True)))
        return stackplot(self, x, *ys, labels=labels, **kwargs)

    def saving(self, *args, **kwargs):
        drawn.update(ylabel=self.axes[0].get_ylabel(), legend=[t.get_text() for t in self.axes[0].get_legend().texts])
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "stackplot", spy)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", saving)
    step = build_step(cfg(), torch.device("cpu"))  # its first step: the optimizer's states do not exist yet
    path = memory_timeline_png(step, str(tmp_path / "t.png"), torch.device("cpu"))
    params = sum(p.numel() * p.element_size() for p in step.module.parameters()) / 2**20  # MiB
    bands = drawn["bands"]
    assert list(bands) == ["parameter", "optimizer_state", "input", "temporary", "activation", "gradient",
                           "autograd_detail", "unknown"]
    assert np.allclose(bands["parameter"], params, rtol=1e-3), (bands["parameter"].min(), params)
    assert bands["gradient"].max() == pytest.approx(params, rel=1e-3)
    assert bands["optimizer_state"][0] == 0 and bands["optimizer_state"][-1] == pytest.approx(params, rel=1e-3)
    assert bands["activation"].max() > params and bands["activation"][-1] == 0
    assert drawn["x"][0] == 0 and drawn["x"][-1] > 0 and np.all(np.diff(drawn["x"]) >= 0)
    assert drawn["ylabel"].startswith("MiB") and drawn["legend"] == list(bands)
    assert matplotlib.image.imread(path).shape[:2] == (500, 1000)  # the PNG of that figure


def test_fit_line_says_whether_a_card_holds_it():
    assert fit_line(Peaks(allocated=14.0, reserved=15.8, device=16.4, host_rss=9.0)).endswith(
        "fits a 24 GB card with 7.6 GiB to spare")
    assert "needs 2.0 GiB more than a 24 GB card" in fit_line(Peaks(allocated=20, reserved=25, device=26, host_rss=1))
    assert "no GPU" in fit_line(Peaks(host_rss=1.0), cuda=False)


@pytest.mark.parametrize("mode", [[], ["memory.deepspeed.stage=2", "memory.deepspeed.offload_optimizer=true"]],
                         ids=["plain", "zero2_offload"])
def test_the_planner_measures_the_step_that_training_runs(tmp_path, mode, monkeypatch):
    """measure() (the planner's and the benchmarks' measurement) runs training's own step, prepared
    the same way: on training's data stream its losses are training's, accumulation included."""
    # DeepSpeed in this process sets the rendezvous variables; later tests' subprocesses must not inherit them
    monkeypatch.setattr(os, "environ", os.environ.copy())
    from setr_lowmem.data.loader import build_train_loader
    from setr_lowmem.engine.train import train

    tiny = load_config("test_tiny", [f"train.out_dir={tmp_path / 'run'}", "schedule.iters=3", "train.total_batch=4",
                                     "train.micro_batch=2", "data.num_workers=0", *mode])
    # measurement first, as `train.py --auto-fit` does (training ends by closing the process group)
    loader = build_train_loader(tiny, tiny.train.accumulation())
    measured = measure(tiny, steps=3, breakdown=False, batches=iter(loader))
    trained = train(tiny)["losses"]
    assert len(trained) == 3 and len(set(trained)) == 3
    assert measured.losses == pytest.approx(trained, rel=1e-6)
