"""Measure one configuration: a few real training steps on random data, their peak memory
(allocated, reserved, device-level, host), its breakdown by category and phase, speed and MFU.

Used by `benchmarks/memory.py` and by the auto-fit planner. Each measurement builds the
model with the configured techniques (as training does), runs `steps` steps on a random
micro-batch (the first one warms up and is not timed), and frees everything afterwards. A
CUDA out-of-memory error makes the measurement "does not fit" instead of an exception.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from setr_lowmem.config import Config, without_initial_weights
from setr_lowmem.engine.loss import SegmentationLoss
from setr_lowmem.engine.train import build_for_training
from setr_lowmem.memory.precision import autocast_factory, input_dtype
from setr_lowmem.model import build_setr
from setr_lowmem.profiler import GIB, MemoryMeter, breakdown_step

log = logging.getLogger(__name__)

# Dense bf16 peak of the GPUs this project measures on (TFLOP/s), for MFU.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "4090": 165.2,
               "3090": 71.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


# What the benchmarks measure without a GPU: a tiny SETR-PUP (64x64 crops, 4 blocks, 64 wide) on the CPU.
TINY_OVERRIDES = ["model.embed_dim=64", "model.depth=4", "model.num_heads=4", "model.out_indices=[0,1,2,3]",
                  "model.head_channels=32", "data.crop=64"]


def benchmark_overrides(overrides: list[str], cuda: bool) -> list[str]:
    """The user's overrides, the tiny model without a GPU, random initial weights, data in-process."""
    return list(overrides) + ([] if cuda else TINY_OVERRIDES) + ["model.pretrained=", "data.num_workers=0"]


def device_tag(device: torch.device) -> str:
    """'H100-80GB-HBM3' (the GPU's name, for result file names), or 'cpu-tiny'."""
    if device.type != "cuda":
        return "cpu-tiny"
    return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-")


def fmt(x: float | None, digits: int = 2) -> str:
    """A figure for a results table; '-' for one not measured (None or NaN)."""
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def fmt_mfu(mfu: float) -> str:
    return "-" if mfu != mfu else f"{100 * mfu:.1f}%"


@dataclass
class Measurement:
    label: str
    micro_batch: int
    fits: bool = True
    note: str = ""
    step_s: float = float("nan")
    img_s: float = float("nan")
    allocated: float = float("nan")  # GiB; on the CPU: MemTracker's peak
    reserved: float = float("nan")
    device: float = float("nan")
    host_rss: float = float("nan")
    tflop_per_img: float = float("nan")  # model FLOPs of one training step per image (no recompute)
    mfu: float = float("nan")
    categories: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


_FLOPS_CACHE: dict = {}


def train_flops_per_image(cfg: Config) -> float:
    """FLOPs of forward + backward for one image, counted with torch.utils.flop_counter on the meta device
    (no checkpointing: the model's FLOPs, not the recomputation)."""
    key = (repr(cfg.model), cfg.data.crop, cfg.data.num_classes)
    if key not in _FLOPS_CACHE:
        with torch.device("meta"):
            module = SegmentationLoss(build_setr(without_initial_weights(cfg)), cfg.loss)
            images = torch.randn(1, 3, cfg.data.crop, cfg.data.crop)
            labels = torch.randint(0, cfg.data.num_classes, (1, cfg.data.crop, cfg.data.crop))
        with FlopCounterMode(display=False) as counter:
            loss, _ = module(images, labels)
            loss.backward()
        _FLOPS_CACHE[key] = float(counter.get_total_flops())
    return _FLOPS_CACHE[key]


def _build(cfg: Config, device: torch.device):
    torch.manual_seed(0)
    module, optimizer = build_for_training(without_initial_weights(cfg))
    module.to(device)  # moves the parameters in place: the optimizer keeps them
    return module, optimizer


def _deepspeed_engine(cfg: Config, module, optimizer):
    import deepspeed

    from setr_lowmem.memory.deepspeed import deepspeed_config, prepare_single_process_env

    prepare_single_process_env()
    ds_cfg = deepspeed_config(cfg, accumulation=1)
    ds_cfg["train_batch_size"] = cfg.train.micro_batch
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg)
    return engine


@dataclass
class Step:
    """A built training step on random data: `forward_backward()` then `optimizer_step()`."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    engine: object | None
    images: torch.Tensor
    labels: torch.Tensor
    autocast: object

    def forward_backward(self) -> None:
        with self.autocast():
            loss, _ = (self.engine or self.module)(self.images, self.labels)
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def optimizer_step(self) -> None:
        if self.engine is not None:
            self.engine.step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.forward_backward()
        self.optimizer_step()


def build_step(cfg: Config, device: torch.device) -> Step:
    """The model with `cfg`'s techniques, its optimizer (and DeepSpeed engine), and a random micro-batch."""
    module, optimizer = _build(cfg, device)
    engine = _deepspeed_engine(cfg, module, optimizer) if cfg.memory.deepspeed.stage > 0 else None
    mb, crop = cfg.train.micro_batch, cfg.data.crop
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(mb, 3, crop, crop, generator=g).to(device, input_dtype(cfg.memory.precision))
    labels = torch.randint(0, cfg.data.num_classes, (mb, crop, crop), generator=g).to(device)
    return Step(module, optimizer, engine, images, labels, autocast_factory(cfg.memory.precision, device))


def measure(cfg: Config, label: str = "", steps: int = 5, device: torch.device | None = None,
            breakdown: bool = True, cap_gib: float | None = None) -> Measurement:
    """Measure `cfg` at `cfg.train.micro_batch` (random data, `steps` steps, median after the first)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mb = cfg.train.micro_batch
    out = Measurement(label=label, micro_batch=mb)
    out.tflop_per_img = train_flops_per_image(cfg) / 1e12
    meter = MemoryMeter(device)
    proc = psutil.Process()
    step = None
    try:
        meter.reset()
        step = build_step(cfg, device)
        times, host = [], proc.memory_info().rss
        for _ in range(max(steps, 2)):
            start = time.perf_counter()
            step.forward_backward()
            meter.sample()
            step.optimizer_step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            meter.sample()
            host = max(host, proc.memory_info().rss)
        peaks = meter.peaks()
        out.step_s = statistics.median(times[1:])
        out.img_s = mb / out.step_s
        out.host_rss = host / GIB
        if device.type == "cuda":
            out.allocated, out.reserved, out.device = peaks.allocated, peaks.reserved, peaks.device
            if cap_gib is not None and out.device > cap_gib:
                out.fits = False
                out.note = f"device-level {out.device:.1f} GiB exceeds the {cap_gib:g} GiB card"
        if breakdown and step.engine is None:
            bd = breakdown_step(step.module, step.optimizer, step.forward_backward, step.optimizer_step)
            out.categories, out.phases = bd.categories, bd.phases
            if device.type != "cuda":
                out.allocated = bd.peak
        tflops = peak_tflops(device)
        if tflops:
            out.mfu = out.tflop_per_img * out.img_s / tflops
    except torch.OutOfMemoryError as err:
        out.fits = False
        out.note = "out of memory" + (f" under the {cap_gib:g} GiB cap" if cap_gib else "") + \
                   f" ({str(err).splitlines()[0][:80]})"
        out.allocated = meter.peaks().allocated if device.type == "cuda" else float("nan")
    finally:
        del step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def set_memory_cap(cap_gib: float | None, device: torch.device) -> None:
    """Emulate a smaller card: cap the caching allocator of this process at `cap_gib` (None lifts the cap).

    The CUDA context and allocations outside PyTorch's allocator are not under the cap: the
    device-level figure (`Measurement.device`) is what a real card of that size must hold."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    if cap_gib is not None:
        log.info("allocator capped at %.1f GiB of %.1f GiB", cap_gib, total / GIB)

