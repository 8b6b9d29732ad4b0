"""Measure one configuration: a few real training steps on random data, their peak memory
(allocated, reserved, device-level, host), its breakdown by category and phase, speed and MFU.

Used by `benchmarks/memory.py`, `benchmarks/targets.py` and the auto-fit planner. Each
measurement prepares training's own step (`engine.step`: the model with the configured
techniques, accelerate and DeepSpeed as in training), runs `steps` whole iterations (the
configured accumulation included; the first one warms up and is not timed), and frees
everything afterwards. A CUDA out-of-memory error makes the measurement "does not fit"
instead of an exception.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from setr_lowmem.config import Config, without_initial_weights
from setr_lowmem.engine.step import Outcome, make_accelerator, prepare_step, reset_accelerate
from setr_lowmem.model import build_setr
from setr_lowmem.model.loss import SegmentationLoss
from setr_lowmem.sizing.cards import card_for_device
from setr_lowmem.sizing.meters import GIB, Breakdown, MemoryMeter, breakdown_step, release

log = logging.getLogger(__name__)

def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of this GPU (TFLOP/s) for MFU, from the card table (`sizing.cards`); None
    for a card the table does not hold."""
    if device.type != "cuda":
        return None
    card = card_for_device(torch.cuda.get_device_name(device))
    return card.bf16_tflops if card else None


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
    losses: list = field(default_factory=list)  # the loss of each measured iteration

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


def random_batches(cfg: Config, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same random micro-batch over and over (images and labels at the crop size)."""
    mb, crop = cfg.train.micro_batch, cfg.data.crop
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(mb, 3, crop, crop, generator=g).to(device)
    labels = torch.randint(0, cfg.data.num_classes, (mb, crop, crop), generator=g).to(device)
    while True:
        yield images, labels


class MeasuredStep:
    """Training's own step (`engine.step`) for `cfg`, prepared through accelerate as training does,
    on a stream of micro-batches (random ones by default). `step()` runs one whole iteration;
    `forward_backward()` and `optimizer_step()` its two halves (for the memory breakdown)."""

    def __init__(self, cfg: Config, batches: Iterator | None = None):
        reset_accelerate()
        cfg = without_initial_weights(cfg)
        self.accelerator = make_accelerator(cfg)
        self.step = prepare_step(cfg, self.accelerator)
        self.batches = batches if batches is not None else random_batches(cfg, self.step.device)
        self.images_per_step = cfg.train.micro_batch * self.step.accumulation
        self._outcome: Outcome | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.step.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    def micro_batches(self) -> list:
        return [next(self.batches) for _ in range(self.step.accumulation)]

    def __call__(self, after_backward=None) -> Outcome:
        return self.step.run(self.micro_batches(), after_backward)

    def forward_backward(self, after_micro_batch=None) -> None:
        self._outcome = self.step.forward_backward(self.micro_batches(), after_micro_batch)

    def optimizer_step(self) -> None:
        self.step.finish(self._outcome.skipped)

    def breakdown(self) -> Breakdown:
        """One iteration under PyTorch's MemTracker: forward + backward, then the optimizer step."""
        return breakdown_step(self.module, self.optimizer, self.forward_backward, self.optimizer_step)

    def close(self) -> None:
        del self.step
        self.accelerator.free_memory()
        reset_accelerate()


def build_step(cfg: Config, device: torch.device | None = None) -> MeasuredStep:
    """Training's step for `cfg` on random data (`device`: where accelerate puts it; checked)."""
    step = MeasuredStep(cfg)
    if device is not None and step.step.device.type != device.type:
        raise ValueError(f"accelerate chose {step.step.device}, not {device}")
    return step


def measure(cfg: Config, label: str = "", steps: int = 5, device: torch.device | None = None,
            breakdown: bool = True, cap_gib: float | None = None, batches: Iterator | None = None) -> Measurement:
    """Measure `cfg` (random data unless `batches` is given; `steps` iterations, the median after the first)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Measurement(label=label, micro_batch=cfg.train.micro_batch)
    out.tflop_per_img = train_flops_per_image(cfg) / 1e12
    meter = MemoryMeter(device)
    proc = psutil.Process()
    step = None
    try:
        meter.reset()
        step = MeasuredStep(cfg, batches)
        times, host = [], proc.memory_info().rss
        for _ in range(max(steps, 2)):
            start = time.perf_counter()
            outcome = step(after_backward=meter.sample)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            out.losses.append(float(outcome.loss))
            meter.sample()
            host = max(host, proc.memory_info().rss)
        peaks = meter.peaks()
        out.step_s = statistics.median(times[1:])
        out.img_s = step.images_per_step / out.step_s
        out.host_rss = host / GIB
        if device.type == "cuda":
            out.allocated, out.reserved, out.device = peaks.allocated, peaks.reserved, peaks.device
            if cap_gib is not None and out.device > cap_gib:
                out.fits = False
                out.note = f"device-level {out.device:.1f} GiB exceeds the {cap_gib:g} GiB card"
        if breakdown and not step.step.deepspeed:
            bd = step.breakdown()
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
        if step is not None:
            step.close()
        del step
        release(device)
    return out


_CAPS: dict[str, float | None] = {}  # device -> the cap this process set on it (None: none)


def memory_cap(device: torch.device) -> float | None:
    """The cap `set_memory_cap` last set on `device` (None: uncapped)."""
    return _CAPS.get(str(device))


def set_memory_cap(cap_gib: float | None, device: torch.device) -> None:
    """Emulate a smaller card: cap the caching allocator of this process at `cap_gib` (None lifts the cap).

    The CUDA context and allocations outside PyTorch's allocator are not under the cap: the
    device-level figure (`Measurement.device`) is what a real card of that size must hold."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    _CAPS[str(device)] = cap_gib
    if cap_gib is not None:
        log.info("allocator capped at %.1f GiB of %.1f GiB", cap_gib, total / GIB)
