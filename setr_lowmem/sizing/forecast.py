"""Will it fit, without the card: a configuration's peak memory predicted on any machine.

    setr-plan --cfg pup_ade20k.yaml --predict --as-configured [key=value ...]   (`sizing.planner`)

The model is built as training builds it, with every technique applied (`engine.step`), on the
CPU; its weights then become fake tensors (PyTorch's FakeTensorMode: shapes, dtypes and
storage sizes, no data, no arithmetic) and one training step, a warm-up step first so that the
optimizer states exist, runs on fake images under PyTorch's MemTracker, the tracker that the
profiler and the benchmark use on real tensors. What is computed, and what is accounted:

- computed: parameters, gradients, SGD/AdamW states, activations and temporaries, for every
  checkpointing policy (recomputation included), bf16 autocast (CUDA's rules where they differ
  from the CPU's, `setr_lowmem.sizing.cuda_rules`; the CPU's for a CPU forecast),
  the decoder rewrites (the fused loss's Triton kernels through their operators' fake
  implementations, `memory.fused_ce_op`; its PyTorch bands as they run);
- accounted from documented byte counts: bitsandbytes' 8-bit states (one byte per value, a
  float32 scale per 256 and a 256-entry code book, for tensors of 4096 values or more), ZeRO-2's
  offloaded optimizer (its states and fp32 master copies leave the GPU), ZeRO-2's gradient bucket
  and buffers (DeepSpeed's sizes, checked against a real engine) and bf16 weights;
- added as constants with their source (`Overheads`): cuBLAS's and cuBLASLt's workspaces (in
  the allocated figure: PyTorch takes them from its caching allocator), the allocator's reserve
  over allocated (measured ratios of `setr_lowmem.sizing.reference`), and the CUDA context (device-level).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from unittest import mock

import torch

from setr_lowmem.compat import FakeTensorMode
from setr_lowmem.config import Config, with_overrides, without_initial_weights
from setr_lowmem.engine.step import build_for_training
from setr_lowmem.memory import decoder
from setr_lowmem.memory.deepspeed import BUCKET
from setr_lowmem.memory.optim import build_optimizer
from setr_lowmem.sizing import reference
from setr_lowmem.sizing.cuda_rules import cuda_rules
from setr_lowmem.sizing.meters import GIB, breakdown_step
from setr_lowmem.sizing.speed import OpCounter, OpCounts, StepCounts, configured_counts

BNB_MIN = 4096  # bitsandbytes keeps smaller tensors' states in 32 bits
BNB_BLOCK = 256  # values per float32 scale of a blockwise 8-bit state


@dataclass(frozen=True)
class Overheads:
    """What the card holds beyond the tensors of the step, with where each figure comes from."""

    workspaces: float = 2 * 32 / 1024  # GiB: cuBLAS and cuBLASLt, 32 MiB each on Hopper (PyTorch #120925;
    # 4 MiB or less on older cards), taken from the caching allocator: part of the allocated peak
    # the ratios below are read from docs/reference/h100_plain_pytorch.csv (`sizing.reference`)
    reserved: float = max(reference.reserved_ratios(expandable=True))  # reserved / allocated with expandable
    # segments (the toolkit's allocator setting): the reference's one such row
    reserved_high: float = max(reference.reserved_ratios(expandable=False))  # the worst ratio measured
    # without them (the row 'checkpoint blocks and heads'): the bound a "fits" verdict keeps to
    reserved_deepspeed: float = max(reference.reserved_ratios(deepspeed=True))  # the ZeRO rows' higher ratio
    context: float = 0.5  # GiB outside PyTorch's allocator (CUDA context, loaded kernels): ~0.3 GiB with
    # CUDA's lazy loading (PyTorch #107667) plus the kernels a training step loads; an estimate until
    # the GPU suite's `hidden` stage measures device-level minus reserved (`hidden.context`)


OVERHEADS = Overheads()


@dataclass
class Forecast:
    label: str
    micro_batch: int
    allocated: float  # GiB, the predicted peak allocated on the device (workspaces included)
    categories: dict[str, float]  # GiB at the peak, after accounting
    seconds: float
    notes: list[str] = field(default_factory=list)
    deepspeed: bool = False
    counts: StepCounts | None = None  # the step's operators for the speed model (`sizing.speed`)

    def reserved(self, high: bool = False) -> float:
        """Estimated peak reserved (GiB); `high`: the bound from the worst measured ratio."""
        o = OVERHEADS
        ratio = o.reserved_deepspeed if self.deepspeed else o.reserved_high if high else o.reserved
        return self.allocated * ratio

    def device(self, high: bool = False) -> float:
        """Estimated device-level peak (GiB): reserved plus what lives outside PyTorch's allocator."""
        return self.reserved(high) + OVERHEADS.context

    def verdict(self, card_gib: float) -> str:
        """'fits' (even at the worst measured reserve), 'likely' (at the expected one) or 'no'."""
        return "fits" if self.device(True) <= card_gib else "likely" if self.device() <= card_gib else "no"

    def fits(self, card_gib: float) -> bool:
        return self.verdict(card_gib) != "no"


def _fake_module(module: torch.nn.Module, mode: FakeTensorMode, device: str = "cpu") -> None:
    """Every parameter and buffer of `module` (built on the meta device: no memory, no initialisation)
    replaced by a fake tensor of its shape and dtype on `device`."""
    def fake(t: torch.Tensor) -> torch.Tensor:
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = fake(b)


def simulated(cfg: Config, cuda: bool = True) -> tuple[Config, list[str]]:
    """The configuration the fake step runs, and what is accounted instead of run. `cuda`: predict
    the step a GPU runs (the fused loss's 'auto' backend is Triton there), else the CPU's."""
    m, notes, over = cfg.memory, [], ["memory.deepspeed.stage=0", "memory.deepspeed.offload_optimizer=false",
                                      "memory.deepspeed.offload_params=false", "optim.bits=32",
                                      "memory.compile_convs=false"]
    if m.fused_upsample_loss:
        backend = "triton" if m.fused_upsample_backend == "triton" or (cuda and m.fused_upsample_backend == "auto") \
            else "torch"
        over.append(f"memory.fused_upsample_backend={backend}")
        notes.append("fused loss: " + ("the Triton operators' fake kernels (same outputs and temporaries)"
                                       if backend == "triton" else "PyTorch bands"))
    if m.precision == "bf16_weights":
        over.append("memory.precision=bf16")
        notes.append("bf16 weights: run as bf16 autocast, weights and gradients accounted at 2 bytes plus fp32 masters")
    if cfg.optim.bits == 8:
        notes.append("8-bit states: accounted (1 byte per value + a float32 scale per 256, tensors >= 4096 values)")
    if m.deepspeed.stage:
        notes.append(f"ZeRO-{m.deepspeed.stage}: accounted" + (" (optimizer states on the host)"
                                                                if m.deepspeed.offload_optimizer else "")
                     + {2: "; its gradient bucket and buffers from DeepSpeed's sizes",
                        1: "; its gradient bucket and flat partitions not accounted (predicted low)",
                        3: "; its prefetch and gradient buckets not accounted (predicted low)"}[m.deepspeed.stage])
    if m.compile_convs:
        notes.append("compiled conv units: predicted as eager (fusion saves temporaries only)")
    return with_overrides(without_initial_weights(cfg), over), notes


def forecast(cfg: Config, label: str = "", cuda: bool = True, plain_loop: bool = False) -> Forecast:
    """The predicted peak of one training iteration of `cfg` (one micro-batch's forward and
    backward, then the optimizer step, with the states of an earlier step alive), on a GPU (`cuda`)
    or on the CPU. Configurations that differ only in what is accounted (8-bit states, ZeRO
    offload) share one fake step. `plain_loop`: the step of a plain training loop instead of the
    toolkit's (`_keep_head_outputs`), for comparing with measurements of one."""
    start = time.time()
    sim, notes = simulated(cfg, cuda)
    key = f"{repr(sim)} cuda={cuda} plain_loop={plain_loop}"
    if key not in _STEPS:
        _STEPS[key] = _fake_step(sim, cuda, plain_loop)
    peak, found, sizes, ops = _STEPS[key]
    categories = dict(found)
    allocated = peak + _accounted(cfg, sizes, categories)
    if cuda:
        categories["workspaces"] = OVERHEADS.workspaces
        allocated += OVERHEADS.workspaces
    counts = configured_counts(cfg, ops.get("micro_batch", OpCounts()), ops.get("optimizer", OpCounts()), sizes)
    return Forecast(label or cfg.name, cfg.train.micro_batch, allocated, categories, time.time() - start, notes,
                    deepspeed=cfg.memory.deepspeed.stage > 0, counts=counts)


_STEPS: dict[str, tuple[float, dict[str, float], list[int], dict[str, OpCounts]]] = {}  # fake steps run here


def _keep_head_outputs(module: torch.nn.Module, kept: list[torch.Tensor]) -> None:
    """Make `module`'s step the one of a plain loop, `out = model(x); loss = criterion(out, y)`: the
    model returns each head's output at full size and the loop holds it through the backward, where
    the toolkit's loss upsamples inside and frees it. Heads checkpointed with their loss keep
    nothing outside the checkpoint: they are left as they are."""
    from setr_lowmem.model.heads import upsample
    from setr_lowmem.model.loss import HeadLoss, resized_cross_entropy

    def keeping(logits, scale, labels, cfg):
        full = upsample(logits, scale)
        kept.append(full)
        return resized_cross_entropy(full, 1, labels, cfg)

    for unit in module.head_losses:
        if isinstance(unit, HeadLoss) and unit.criterion is resized_cross_entropy:
            unit.criterion = keeping


def _fake_step(sim: Config, cuda: bool, plain_loop: bool = False
               ) -> tuple[float, dict[str, float], list[int], dict[str, OpCounts]]:
    """(peak GiB, categories at the peak, sizes of the trained parameters, the operators counted
    by phase) of one tracked fake step; `cuda`: under CUDA's autocast rules (`cuda_rules`) with
    the optimizer's multi-tensor (foreach) step that PyTorch uses on CUDA, else the CPU's;
    `plain_loop`: with the heads' outputs held through the backward (`_keep_head_outputs`)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        module, _ = build_for_training(sim)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_module(module, mode)
    optimizer = build_optimizer(module.model, sim.optim)
    if cuda:  # torch.optim's default on CUDA tensors: one multi-tensor kernel per update, not one per parameter
        for group in optimizer.param_groups:
            group["foreach"] = True
    counter = OpCounter()
    kept: list[torch.Tensor] = []
    if plain_loop:
        _keep_head_outputs(module, kept)
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if sim.memory.precision == "bf16" else contextlib.nullcontext
    # the rules stay in place through the backward: checkpointed parts re-run their forward there
    rules = cuda_rules if cuda and sim.memory.precision == "bf16" else contextlib.nullcontext
    mb, crop, classes = sim.train.micro_batch, sim.data.crop, sim.data.num_classes
    # the matmul upsample backward builds its interpolation matrices from index arithmetic, which
    # fake tensors cannot run: a matrix of the same shape and dtype holds the same memory
    shape_only = mock.patch.object(decoder, "bilinear_matrix",
                                   lambda out, inp, device, dtype: torch.zeros(out, inp, device=device, dtype=dtype))
    with mode, shape_only:
        images = torch.randn(mb, 3, crop, crop)
        labels = torch.randint(0, classes, (mb, crop, crop))

        def forward_backward() -> None:
            counter.phase = "micro_batch"
            with rules():
                with autocast():
                    loss, _ = module(images, labels)
                loss.backward()
            kept.clear()

        def optimizer_step() -> None:
            counter.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # the optimizer's states exist from the first step on: one step on zero gradients makes them
        # (the same tensors a warm-up forward and backward would leave, in a fraction of the time)
        for p in module.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer_step()
        with counter:
            found = breakdown_step(module, optimizer, forward_backward, optimizer_step)
    return (found.peak, dict(found.categories), [p.numel() for p in module.parameters() if p.requires_grad],
            counter.counts)


def _accounted(cfg: Config, sizes: list[int], categories: dict[str, float]) -> float:
    """GiB to add to the computed peak (negative: to remove) for what the fake step did not run
    (`sizes`: the trained parameters' element counts); updates `categories` to match."""
    ds, delta = cfg.memory.deepspeed, 0.0
    grads_at_peak = categories.get("grads", 0.0)
    states = categories.get("optimizer", 0.0)
    if cfg.optim.bits == 8 and not ds.offload_optimizer:
        per_value = {"sgd": 1, "adamw": 2}[cfg.optim.name]
        # per state: a uint8 per value, a float32 scale per block, a 256-entry float32 code book
        eight = sum((n + math.ceil(n / BNB_BLOCK) * 4 + 1024) * per_value if n >= BNB_MIN
                    else n * 4 * per_value for n in sizes) / GIB
        delta += eight - states
        categories["optimizer"] = eight
    if ds.stage and ds.offload_optimizer:
        delta -= categories.get("optimizer", 0.0)
        categories["optimizer"] = 0.0
    if ds.stage == 3 and ds.offload_params:  # the GPU holds only the layers in use (prefetch buckets: not counted)
        delta -= categories.get("params", 0.0) + categories.get("grads", 0.0)
        categories["params"] = categories["grads"] = 0.0
    bf16_weights = cfg.memory.precision == "bf16_weights"
    if bf16_weights:
        half = sum(sizes) * 2 / GIB
        masters = 0.0 if ds.offload_optimizer else 2 * half  # fp32 copies of the bf16 weights
        delta += (half - categories.get("params", 0.0)) + (half - categories.get("grads", 0.0)) + masters
        categories["params"], categories["grads"] = half, half
        categories["optimizer"] = categories.get("optimizer", 0.0) + masters
    if ds.stage == 2:  # DeepSpeed's stage-2 optimizer (zero/stage_1_and_2.py) as `memory.deepspeed` configures it
        buffers = zero2_buffers(sizes, ds.offload_optimizer, 2 if bf16_weights else 4)
        computed = grads_at_peak * GIB / 4  # gradient values at the fake step's peak (float32 there)
        # the bucket lives from a backward's first gradient to its end; the flat partition from the
        # first full bucket (or the end of a backward, for a model smaller than one) to the step
        grads = (buffers["bucket"] if computed > 0 else 0.0) + (
            buffers["gradients"] if ds.offload_optimizer or computed >= min(BUCKET, sum(sizes)) else 0.0)
        delta += grads - categories.get("grads", 0.0) + buffers["masters"]
        categories["grads"] = grads
        categories["optimizer"] = categories.get("optimizer", 0.0) + buffers["masters"]
    return delta


def zero2_buffers(sizes: list[int], offload: bool, width: int) -> dict[str, float]:
    """GiB that ZeRO-2 with contiguous gradients keeps on one GPU for parameters of `sizes` values
    in `width`-byte weights: a reduction bucket of `BUCKET` values ('bucket'), then either a buffer
    the size of the largest parameter on the way to the host (optimizer offload) or a flat partition
    of every gradient ('gradients'), and without offload a float32 master copy of fp32 weights
    ('masters'; bf16 weights count theirs already). Not counted: the flat gradient copy that the
    step makes without offload."""
    return {"bucket": BUCKET * width / GIB,
            "gradients": (max(sizes) if offload else sum(sizes)) * width / GIB,
            "masters": 0.0 if offload or width == 2 else sum(sizes) * 4 / GIB}
