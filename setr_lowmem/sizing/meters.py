"""Peak memory: what the caching allocator handed out, what it reserved, what the card holds
(CUDA context included), and the host's resident memory (where offloading moves things).

`MemoryMeter` is cheap enough to sample every iteration; `breakdown_step` gives the detailed
breakdown by category and phase (PyTorch's MemTracker), `memory_timeline_png` and
`record_snapshot` the profiler's timeline and a CUDA snapshot.
"""

from __future__ import annotations

import gc
import inspect
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil
import torch

from setr_lowmem.compat import (dump_memory_snapshot, mem_tracker, record_memory_history, root_mem_tracker,
                                timeline_category_names)

GIB = 2**30


def release(device: torch.device) -> None:
    """Give what an earlier step left (reference cycles included) back to the card."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass
class Peaks:
    allocated: float = 0.0  # GiB, torch.cuda.max_memory_allocated
    reserved: float = 0.0  # GiB, torch.cuda.max_memory_reserved
    device: float = 0.0  # GiB used on the card, sampled (NVML-level: includes the CUDA context)
    host_rss: float = 0.0  # GiB, the process's peak resident set

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.device_peak = 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.device_peak = 0.0

    def sample(self) -> None:
        """Record the card's current use (call at the points of highest use, e.g. after backward)."""
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            self.device_peak = max(self.device_peak, (total - free) / GIB)

    def peaks(self) -> Peaks:
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
        host = max(host, psutil.Process().memory_info().rss / GIB)
        if not self.cuda:
            return Peaks(host_rss=host)
        self.sample()
        return Peaks(allocated=torch.cuda.max_memory_allocated(self.device) / GIB,
                     reserved=torch.cuda.max_memory_reserved(self.device) / GIB,
                     device=self.device_peak, host_rss=host)

    def measured(self) -> dict[str, float]:
        """The peaks this device can measure: without a GPU only the host's (no GPU figure of 0)."""
        p = self.peaks().as_dict()
        return p if self.cuda else {"host_rss": p["host_rss"]}

    def short(self) -> str:
        """The peak so far, for a progress bar: reserved on a GPU, the host's resident set without one."""
        p = self.peaks()
        if self.cuda:
            return f"peak {p.reserved:.1f}G reserved"
        return f"host peak {p.host_rss:.1f}G"


def fit_line(p: Peaks, card_gib: float = 24.0, cuda: bool = True) -> str:
    """'peak 15.8 GiB reserved, 16.4 GiB on the device: fits a 24 GB card with 7.6 GiB to spare'."""
    if not cuda:
        return f"peak host memory {p.host_rss:.2f} GiB (no GPU: device figures not measured)"
    need = max(p.device, p.reserved)
    verdict = (f"fits a {card_gib:g} GB card with {card_gib - need:.1f} GiB to spare" if need <= card_gib
               else f"needs {need - card_gib:.1f} GiB more than a {card_gib:g} GB card")
    return (f"peak {p.reserved:.1f} GiB reserved ({p.allocated:.1f} allocated), {p.device:.1f} GiB on the device, "
            f"host {p.host_rss:.1f} GiB: {verdict}")


# ---- breakdown by category and phase (PyTorch's MemTracker) --------------------------------

CATEGORY_NAMES = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Optstate": "optimizer",
                  "Activation": "activations", "Temp": "temporaries", "Other": "other"}


@dataclass
class Breakdown:
    """Peak memory (GiB) by category at the step's peak, and each phase's peak with its categories."""

    peak: float
    categories: dict[str, float]
    phases: dict[str, dict[str, float]]


def _gib_snapshot(snapshot: dict) -> dict[str, float]:
    """MemTracker's {device: {reftype: bytes}} summed over devices, in GiB, with our category names."""
    out = {name: 0.0 for name in CATEGORY_NAMES.values()}
    total = 0.0
    for stats in snapshot.values():
        for key, value in stats.items():
            name = getattr(key, "value", key)
            if name == "Total":
                total += value / GIB
            elif name in CATEGORY_NAMES:
                out[CATEGORY_NAMES[name]] += value / GIB
    out["total"] = total
    return out


def _root_tracker(root: torch.nn.Module):
    """A MemTracker that keeps the per-phase peaks of `root` only. The stock tracker updates every
    submodule's peaks on every operator: a ViT-L's ~1,100 modules made one tracked full-size step
    take minutes (three quarters of a forecast's time), this one takes seconds; the totals and
    `root`'s own states are the same (tests/test_profiler.py compares them with the stock tracker).
    It overrides MemTracker's private members: `setr_lowmem.compat.root_mem_tracker`."""
    return root_mem_tracker(root)


def breakdown_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, forward_backward: Callable,
                   optimizer_step: Callable[[], None]) -> Breakdown:
    """Run one training step under `torch.distributed._tools.mem_tracker.MemTracker`.

    `forward_backward()` runs one micro-batch's forward and backward; a `forward_backward` that
    takes an argument runs several and is given `after_micro_batch`, to call after each.
    `optimizer_step()` runs the rest of the step. Forward and
    backward peaks come from the tracker's per-module states of `module` (the root it sees), the
    highest over the micro-batches (the tracker follows one call of a module at a time, so its
    module states are read and cleared after each); the optimizer step is tracked by a second
    tracker that starts from the tensors then alive. Works on the CPU and on CUDA (not under
    DeepSpeed, which manages its own buffers).
    """
    mt = mem_tracker()
    MemTracker, _ModState = mt.MemTracker, mt.ModState
    tracker = _root_tracker(module)
    tracker.track_external(module, optimizer)
    phases: dict[str, dict[str, float]] = {}

    def after_micro_batch() -> None:
        root = next((s for m, s in tracker.memory_tracking.items() if m is module), None)
        for phase, state in (("forward", _ModState.PEAK_FW), ("backward", _ModState.PEAK_BW)):
            snaps = root.snapshots.get(state) if root is not None else None
            if snaps:
                snap = _gib_snapshot(snaps[-1])
                if phase not in phases or snap["total"] > phases[phase]["total"]:
                    phases[phase] = snap
        tracker.reset_mod_stats()

    with tracker:
        if inspect.signature(forward_backward).parameters:
            forward_backward(after_micro_batch)
        else:
            forward_backward()
            after_micro_batch()
    step_tracker = MemTracker()
    step_tracker.track_external(module, optimizer)
    with step_tracker:
        optimizer_step()
    phases["optimizer step"] = _gib_snapshot(step_tracker.get_tracker_snapshot("peak"))
    overall = _gib_snapshot(tracker.get_tracker_snapshot("peak"))
    if phases["optimizer step"]["total"] > overall["total"]:
        overall = phases["optimizer step"]
    peak = overall.pop("total")
    return Breakdown(peak=peak, categories=overall, phases=phases)


def record_snapshot(step, path: str) -> str:
    """Run `step()` with CUDA allocation history recorded and dump a snapshot for
    https://pytorch.org/memory_viz (PyTorch's memory visualiser)."""
    record_memory_history(max_entries=200_000)
    try:
        step()
        torch.cuda.synchronize()
        dump_memory_snapshot(path)
    finally:
        record_memory_history(enabled=None)
    return path


def _memory_timeline(step, device: torch.device) -> tuple[list, list]:
    """Profile `step()` with PyTorch's memory profiler: (times in us, bytes per category at each time).

    `export_memory_timeline` is marked deprecated in favour of CUDA memory snapshots, but it is
    the one PyTorch tracker that also sees CPU tensors; it still works in torch 2.11 to 2.14."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    dev = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        prof.export_memory_timeline(tmp.name, device=dev)
        with open(tmp.name) as f:
            times, sizes = json.load(f)
    return times, sizes


def memory_timeline_png(step, path: str, device: torch.device, title: str = "") -> str:
    """Profile `step()` and draw its memory timeline by category as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    times, sizes = _memory_timeline(step, device)
    times = (np.array(times) - min(times)) / 1e3
    sizes = np.array(sizes, dtype=float) / GIB
    unit = "GiB"
    if sizes[:, 1:].sum(axis=1).max() < 1.0:  # a tiny model: MiB, where GiB would read 0.01
        sizes, unit = sizes * 1024, "MiB"
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    names = timeline_category_names(sizes.shape[1] - 1)
    ax.stackplot(times, *[sizes[:, i + 1] for i in range(len(names))], labels=names)
    ax.set_xlabel("time in the step (ms)")
    ax.set_ylabel(f"{unit} (tensors PyTorch's profiler saw)")
    ax.set_title(title or "memory over one training step")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def timeline_peak(step, device: torch.device) -> float:
    """Peak (GiB) of PyTorch's profiler memory timeline over `step()`: an independent check of MemTracker."""
    _, sizes = _memory_timeline(step, device)
    return max(sum(s) for s in sizes) / GIB
