"""Will it fit, without the card: a configuration's peak memory predicted on any machine.

    setr-plan --cfg pup_ade20k.yaml --predict --as-configured [key=value ...]   (`sizing.planner`)

The model is built as training builds it, with every technique applied (`engine.step`), on the
CPU; its weights then become fake tensors (PyTorch's FakeTensorMode: shapes, dtypes and
storage sizes, no data, no arithmetic) and one training step, a warm-up step first so that the
optimizer states exist, runs on fake images under PyTorch's MemTracker, the tracker that the
profiler and the benchmark use on real tensors. Each technique's entry (`memory.registry`) says
whether the fake step computes it or what it runs instead (`simulate`) and accounts (`accounting`):

- computed: parameters, gradients, SGD/AdamW states, activations and temporaries, for every
  checkpointing policy (recomputation included), bf16 autocast (CUDA's rules where they differ
  from the CPU's, `setr_lowmem.sizing.cuda_rules`; the CPU's for a CPU forecast),
  the decoder rewrites (the fused loss's Triton kernels through their operators' fake
  implementations, `memory.fused_ce_op`; its PyTorch bands as they run);
- accounted from documented byte counts, each in its technique's module: bitsandbytes' 8-bit
  states (one byte per value, a float32 scale per 256 and a 256-entry code book, for tensors of
  4096 values or more; `memory.optim`), ZeRO-2's offloaded optimizer (its states and fp32 master
  copies leave the GPU), ZeRO-2's gradient bucket and buffers (DeepSpeed's sizes, checked against
  a real engine; `memory.deepspeed`) and bf16 weights (`memory.precision`);
- added as constants with their source (`Overheads`): cuBLAS's and cuBLASLt's workspaces (in
  the allocated figure: PyTorch takes them from its caching allocator), the allocator's reserve
  over allocated (measured ratios of `setr_lowmem.sizing.reference`), and the CUDA context (device-level).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from unittest import mock

import torch

from setr_lowmem.compat import FakeTensorMode
from setr_lowmem.config import Config, replace_keys, without_initial_weights
from setr_lowmem.engine.step import build_for_training
from setr_lowmem.memory import decoder
from setr_lowmem.memory.optim import build_optimizer
from setr_lowmem.memory.registry import techniques
from setr_lowmem.sizing import reference
from setr_lowmem.sizing.cuda_rules import cuda_rules
from setr_lowmem.sizing.meters import breakdown_step
from setr_lowmem.sizing.speed import OpCounter, OpCounts, StepCounts, configured_counts


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
    """The configuration the fake step runs (each technique's `simulate`: what it runs instead), and
    the notes on what is accounted instead of run. `cuda`: predict the step a GPU runs (the fused
    loss's 'auto' backend is Triton there), else the CPU's."""
    changes: dict = {}
    notes = []
    for technique in techniques():
        if technique.simulate is not None:
            values, note = technique.simulate(cfg, cuda)
            changes.update(values)
            notes += [note] if note else []
    return replace_keys(without_initial_weights(cfg), changes), notes


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
    (`sizes`: the trained parameters' element counts): every technique's `accounting`, in their
    order, each updating `categories` for the next."""
    computed = dict(categories)
    delta = 0.0
    for accounting in sorted((a for t in techniques() for a in t.accounting), key=lambda a: a.order):
        delta += accounting.gib(cfg, sizes, categories, computed)
    return delta
