"""What a training step holds on a GPU that its tensors do not show, measured on the GPU.

The memory forecast (`setr_lowmem.sizing.forecast`) runs the step on fake tensors, so it sees every
tensor and nothing else: not the CUDA context, not the cuBLAS workspaces, not what an operator
takes while it runs (cuDNN's workspaces, a kernel's internal buffers). Where its prediction and a
GPU's peak differ, these tools say by how much and where:

- `context()`: device-level memory minus the caching allocator's reserve, and the persistent
  cuBLAS/cuBLASLt workspaces of the first matrix product;
- `OpTransients`: for every operator of a step (backward included), the memory it took above both
  what was allocated before it and what it left allocated (its transients), by operator and shapes;
- `live_at_peak()`: the allocations alive at a step's peak, replayed from PyTorch's memory history
  (`torch.cuda.memory._record_memory_history`), grouped by the code that made them.

`benchmarks/gpu_suite.py --stages hidden` runs them on the forecast check's worst rows.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from setr_lowmem.compat import (TorchDispatchMode, clear_cublas_workspaces, memory_snapshot, record_memory_history,
                                tree_leaves)
from setr_lowmem.sizing.meters import GIB, release

MIB = 2**20


def context(device: torch.device) -> dict[str, float]:
    """MiB outside the caching allocator (CUDA context, loaded kernels: device-level used minus
    reserved; other processes on the card count too) and the persistent workspaces one bf16 matrix
    product leaves in it (cuBLAS's and cuBLASLt's, freed first so that they are made again)."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    outside = (total - free - torch.cuda.memory_reserved(device)) / MIB
    clear_cublas_workspaces()
    a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
    before = torch.cuda.memory_allocated(device)
    out = a @ a
    torch.cuda.synchronize(device)
    workspaces = (torch.cuda.memory_allocated(device) - before - out.untyped_storage().nbytes()) / MIB
    return {"outside_allocator_mib": round(outside, 1), "matmul_workspaces_mib": round(workspaces, 1)}


def _describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return ""
    dtype = str(x.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float", "f")
    layout = "" if x.dim() != 4 or x.is_contiguous() else \
        ",cl" if x.is_contiguous(memory_format=torch.channels_last) else ",strided"
    return f"{dtype}{list(x.shape)}{layout}"


@dataclass
class Transient:
    op: str  # operator and its tensor arguments: "aten.convolution.default(bf16[16, 256, 512, 512], ...)"
    mib: float  # the largest transient of one call
    calls: int = 0


class OpTransients(TorchDispatchMode):
    """Each operator's transient memory on `device`, from the caching allocator's peak: reset
    before the call, read after it. Resets the device's peak statistics on every operator."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.found: dict[str, Transient] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = func(*args, **kwargs)
        stats = torch.cuda.memory_stats(self.device)  # one read for both figures: this runs for every operator
        above = stats["allocated_bytes.all.peak"] - max(before, stats["allocated_bytes.all.current"])
        if above > 0:
            inputs = ", ".join(d for d in map(_describe, tree_leaves((args, kwargs))) if d)
            key = f"{func}({inputs})"
            t = self.found.setdefault(key, Transient(key, 0.0))
            t.mib, t.calls = max(t.mib, above / MIB), t.calls + 1
        return out

    def largest(self, n: int = 25) -> list[Transient]:
        return sorted(self.found.values(), key=lambda t: -t.mib)[:n]


PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # frames in this package's own files


def _where(frames: list[dict]) -> str:
    """The code that made an allocation: its innermost frame in this package, and the innermost
    frame of all (frames run innermost first); "no Python frame" for the autograd engine's own."""
    if not frames:
        return "no Python frame (a backward kernel on the autograd engine's thread)"

    def at(f):
        name = f["filename"]
        name = name[len(PACKAGE):] if name.startswith(PACKAGE) else name.split("site-packages/")[-1]
        return f"{name}:{f['line']} {f['name']}"

    ours = next((f for f in frames if f["filename"].startswith(PACKAGE)), None)
    return at(frames[0]) if ours is None or ours is frames[0] else f"{at(ours)} <- {at(frames[0])}"


def trace_of(device: torch.device, fn) -> list[dict]:
    """The CUDA allocator's history (allocations with their Python stacks) over `fn()`: recording
    on, `fn` run and synchronised, recording off; earlier entries of the process dropped."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
    try:
        start = len(memory_snapshot()["device_traces"][index])
        fn()
        torch.cuda.synchronize(device)
        return memory_snapshot()["device_traces"][index][start:]
    finally:
        record_memory_history(enabled=None)


def requested(device: torch.device, key: str = "current") -> int:
    """The caching allocator's requested bytes ('current' or 'peak'): what a trace's sizes add up to
    (allocated bytes count whole blocks: rounded to 512 bytes, a large one up to 1 MiB over)."""
    return torch.cuda.memory_stats(device)[f"requested_bytes.all.{key}"]


def live_at_peak(trace: list[dict], before: int = 0, top: int = 25) -> dict:
    """Replay one device's memory-history trace (`torch.cuda.memory._snapshot()["device_traces"][i]`):
    requested bytes rise at each 'alloc' and fall at each 'free_requested' (when the allocator's
    statistics drop), starting from `before` (`requested(device)` when recording began). Returns the peak (MiB)
    and what was alive at it that the trace made, grouped by `_where`, largest first (the rest of
    the peak was allocated before the recording)."""
    now = best = before
    at = -1  # the index of the allocation that made the peak
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            now += e["size"]
            if now > best:
                best, at = now, i
        elif e["action"] == "free_requested":  # blocks from before the recording are freed too
            now -= e["size"]
    live: dict[int, dict] = {}  # the trace's own blocks alive at the peak: replayed up to it
    for e in trace[:at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    best_live = list(live.values())
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in best_live:
        g = groups[_where(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    rows = [{"where": w, "mib": round(b / MIB, 1), "blocks": n} for w, (b, n) in groups.items()]
    rows.sort(key=lambda r: -r["mib"])
    return {"peak_mib": round(best / MIB, 1), "before_mib": round(before / MIB, 1), "live": rows[:top],
            "others_mib": round(sum(r["mib"] for r in rows[top:]), 1)}


def probe(cfg, device: torch.device, label: str = "") -> dict:
    """Training's step for `cfg` on `device` (random data): its measured peak allocated next to the
    forecast's, what was alive at the peak (memory history of one step) and the operators with the
    largest transients (another step). Two warm-up steps first: optimizer states, kernel choices.
    What one part measured is kept when a later one fails (`error`)."""
    from setr_lowmem.sizing.forecast import forecast
    from setr_lowmem.sizing.measure import build_step

    predicted = forecast(cfg, label)
    out = {"label": label or cfg.name, "micro_batch": cfg.train.micro_batch,
           "forecast_gib": round(predicted.allocated, 3),
           "forecast_categories_gib": {k: round(v, 3) for k, v in predicted.categories.items()}}
    release(device)
    out["allocated_before_build_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3)
    step = None
    try:
        step = build_step(cfg, device)
        for _ in range(2):
            step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        out["measured_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        out["measured_requested_gib"] = round(requested(device, "peak") / GIB, 3)
        before = requested(device)
        out["at_peak"] = live_at_peak(trace_of(device, step), before)
        with OpTransients(device) as ops:
            step()
            torch.cuda.synchronize(device)
        out["transients"] = [{"op": t.op[:300], "mib": round(t.mib, 1), "calls": t.calls} for t in ops.largest()]
    except Exception as err:  # noqa: BLE001 - keep what was measured
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    finally:
        if step is not None:
            step.close()
        del step
        release(device)
    return out
