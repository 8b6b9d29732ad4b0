"""Auto-fit: choose the fastest memory plan that fits a budget, keeping the effective batch.

    setr-plan --cfg pup_ade20k.yaml --budget-gib 24
    setr-plan --cfg pup_ade20k.yaml --predict --cards 8 12 16 24   (no GPU needed)
    python launch/train.py --cfg pup_ade20k.yaml --auto-fit 24

A plan is a micro-batch (a divisor of `train.total_batch`; accumulation makes up the rest),
an activation-checkpointing policy, 32- or 8-bit optimizer states, and (on a GPU) ZeRO-2
with the optimizer offloaded to the CPU. Every candidate is measured with a few real
training steps (`setr_lowmem.sizing.measure`): for each technique set, micro-batches are tried from
the largest down until one fits, and the fastest plan under the budget wins (plans within 5% of
it count as equally fast, and the one of them with the most memory to spare is chosen). The budget is
checked against the device-level peak on a GPU (what the card must hold, CUDA context
included) and against PyTorch's MemTracker peak on a CPU. accelerate's
`find_executable_batch_size` only halves the batch until it fits; this chooses among
techniques too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from setr_lowmem.config import Config, ConfigError, with_overrides
from setr_lowmem.sizing.measure import Measurement, measure, memory_cap, set_memory_cap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    checkpointing: str
    bits: int
    offload: bool

    def overrides(self) -> list[str]:
        """The plan as config overrides: what is printed and what is applied (`apply_plan`)."""
        out = [f"train.micro_batch={self.micro_batch}", f"memory.checkpointing={self.checkpointing}",
               "memory.every_k=1", f"optim.bits={self.bits}"]
        if self.offload:
            out += ["memory.deepspeed.stage=2", "memory.deepspeed.offload_optimizer=true"]
        return out

    def describe(self, cfg: Config) -> str:
        planned = apply_plan(cfg, self)
        return (f"micro-batch {self.micro_batch} x {planned.train.accumulation()}, checkpointing {self.checkpointing}, "
                f"{self.bits}-bit" + (", ZeRO-2 offload" if self.offload else ""))


POLICIES = ("none", "selective", "blocks", "full")


def technique_sets(cfg: Config, cuda: bool, offload: bool | None = None,
                   policies: tuple[str, ...] = POLICIES) -> list[tuple[str, int, bool]]:
    """(checkpointing, bits, offload), roughly from fastest to most frugal; `offload` None: both
    without and (on a GPU) with ZeRO-2 offload, else only that."""
    out = []
    for off in ([False, True] if cuda else [False]) if offload is None else [offload]:
        for bits in (32, 8):
            if off and bits == 8:
                continue  # offloaded states live on the host: 8-bit buys no GPU memory there
            for policy in policies:
                out.append((policy, bits, off))
    return out


def apply_plan(cfg: Config, plan: Plan) -> Config:
    return with_overrides(cfg, plan.overrides())


def peak_of(m: Measurement, cuda: bool) -> float:
    return max(m.device, m.reserved) if cuda else m.allocated


def search(cfg: Config, budget_gib: float, steps: int = 3, max_micro_batch: int | None = None,
           device: torch.device | None = None, report=print, micro_batches: list[int] | None = None,
           offload: bool | None = None, policies: tuple[str, ...] = POLICIES,
           ) -> tuple[Plan | None, list[tuple[Plan, Measurement]]]:
    """Measure candidate plans; return (fastest plan under the budget or None, every plan tried).
    `micro_batches`, `offload` and `policies` narrow the candidates."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    total = cfg.train.total_batch
    sizes = micro_batches or [b for b in range(total, 0, -1)
                              if total % b == 0 and (max_micro_batch is None or b <= max_micro_batch)]
    tried: list[tuple[Plan, Measurement]] = []
    before = memory_cap(device)  # the user's own cap (train.py --cap-gib, targets.py --cap-gib) comes back after
    cap = budget_gib if before is None else min(budget_gib, before)
    set_memory_cap(cap, device)  # a candidate over the budget fails fast instead of using the whole card
    try:
        _search(cfg, budget_gib, steps, sizes, device, cuda, tried, report, technique_sets(cfg, cuda, offload, policies))
    finally:
        set_memory_cap(before, device)
    return pick(tried, cuda), tried


TIE = 0.05  # plans within 5% of the fastest are equally fast: machine noise must not choose among them


def pick(tried: list[tuple[Plan, Measurement]], cuda: bool) -> Plan | None:
    """The fastest plan that fits; among those within `TIE` of it, the one with the lowest peak
    (the most memory to spare), so that a few steps' noise does not decide."""
    fitting = [(plan, m) for plan, m in tried if m.fits]
    if not fitting:
        return None
    fastest = max(m.img_s for _, m in fitting)
    ties = [(plan, m) for plan, m in fitting if m.img_s >= (1 - TIE) * fastest]
    return min(ties, key=lambda t: (peak_of(t[1], cuda), -t[1].img_s))[0]


def _search(cfg, budget_gib, steps, sizes, device, cuda, tried, report, candidates) -> None:
    started, most = time.time(), len(candidates) * len(sizes)  # at most: a set stops at its first fit
    if not cuda and cfg.model.embed_dim >= 768:
        report(f"  no GPU: each plan runs {steps} steps of the full-size model on the CPU, a minute or more each")
    for policy, bits, offload in candidates:
        for mb in sizes:
            plan = Plan(mb, policy, bits, offload)
            m = measure(apply_plan(cfg, plan), label=plan.describe(cfg), steps=steps, device=device,
                        breakdown=not cuda, cap_gib=budget_gib if cuda else None)
            fits = m.fits and peak_of(m, cuda) <= budget_gib
            if m.fits and not fits:
                m.note = m.note or f"peak {peak_of(m, cuda):.2f} GiB over the {budget_gib:g} GiB budget"
            m.fits = fits
            tried.append((plan, m))
            spent = time.time() - started
            left = spent / len(tried) * (most - len(tried)) / 60
            report(f"  {plan.describe(cfg):<58} " + (f"peak {peak_of(m, cuda):7.3f} GiB  {m.img_s:7.1f} img/s"
                                                       if fits else f"does not fit: {m.note}")
                   + f"  [{len(tried)}/{most} at most, {spent:.0f} s, at most {left:.1f} min left]")
            if fits:
                break  # smaller micro-batches of this technique set are slower


def auto_fit(cfg: Config, budget_gib: float, steps: int = 3, report=print) -> Config:
    """`cfg` with the fastest plan that fits `budget_gib` applied (an error if none fits)."""
    report(f"auto-fit: trying plans for {cfg.name} within {budget_gib:g} GiB (effective batch {cfg.train.total_batch})")
    plan, _ = search(cfg, budget_gib, steps=steps, report=report)
    if plan is None:
        raise ConfigError(f"no plan fits {budget_gib:g} GiB for {cfg.name}, even micro-batch 1 with full "
                          "checkpointing and 8-bit states (and offload on a GPU); use a smaller crop or a larger budget")
    report(f"chosen: {plan.describe(cfg)}")
    report("as overrides: " + " ".join(plan.overrides()))
    return apply_plan(cfg, plan)


def predict(cfg: Config, cards: list[float], micro_batches: list[int] | None = None, report=print) -> list:
    """Every plan (each technique set at each micro-batch, the config's by default) forecast on fake
    tensors, no GPU needed (`setr_lowmem.sizing.forecast`); prints which fit each card. Returns (plan, forecast)s."""
    from setr_lowmem.sizing.forecast import forecast

    sizes = micro_batches or [cfg.train.micro_batch]
    bad = [b for b in sizes if cfg.train.total_batch % b]
    if bad:
        raise ConfigError(f"--micro-batches {bad}: each must divide train.total_batch={cfg.train.total_batch}")
    out, says = [], {"fits": "fits", "likely": "likely", "no": "-"}
    report(f"{cfg.name}: predicted on fake tensors (no GPU used); 'likely': fits at the expected allocator "
           "reserve, not at the worst measured one")
    report(f"  {'plan':<66} {'allocated':>9} {'device':>7}  " + "  ".join(f"{c:>5g}G" for c in cards))
    for mb in sizes:
        for policy, bits, offload in technique_sets(cfg, cuda=True):
            plan = Plan(mb, policy, bits, offload)
            f = forecast(apply_plan(cfg, plan))
            out.append((plan, f))
            report(f"  {plan.describe(cfg):<66} {f.allocated:8.2f}G {f.device():6.2f}G  "
                   + "  ".join(f"{says[f.verdict(c)]:>6}" for c in cards))
    for c in cards:
        first = next((plan for plan, f in out if f.fits(c)), None)
        report(f"{c:g} GB card: " + (f"{first.describe(cfg)} (the first that fits, in the planner's order from "
                                     "fastest to most frugal)" if first else "no plan is predicted to fit"))
    return out
