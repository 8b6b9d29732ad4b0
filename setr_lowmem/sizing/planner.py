"""The planner: the fastest memory plan that fits a card, keeping the effective batch.

    setr-plan --cfg pup_ade20k.yaml --predict [--cards rtx4090 l4 24]   on fake tensors, any machine
    setr-plan --cfg pup_ade20k.yaml --measure [--budget-gib 24]         on the GPU at hand
    setr-train --cfg pup_ade20k.yaml --auto-fit 24                      measure, then train with the plan

A plan is a micro-batch (a divisor of `train.total_batch`; accumulation makes up the rest) and
a choice for each technique whose registry entry offers one (`memory.registry.PlanChoice`): an
activation-checkpointing policy, 32- or 8-bit optimizer states, and (on a GPU) ZeRO-2 with the
optimizer offloaded to the CPU. For each technique set, micro-batches are tried from the largest
down until one fits; the fastest plan that fits wins (plans within 5% of it count as equally
fast, and the one of them with the most memory to spare is chosen).

Two modes share this module and one table (`summary`):

- **predict** (`predict`): every plan forecast on fake tensors (`sizing.forecast`: memory;
  `sizing.speed`: images/s on each card of `sizing.cards`). A plan fits a card only with a
  margin: its forecast peak at the worst reserve/allocated ratio ever measured, plus the CUDA
  context, within what CUDA offers of the card's memory (`Target`). A plan that fits only at the
  expected ratio is 'likely' and never chosen.
- **measure** (`search`, `auto_fit`): a few real training steps per plan (`sizing.measure`) on
  this machine; the budget is checked against the device-level peak on a GPU (CUDA context
  included) and PyTorch's MemTracker peak on a CPU, and a plan fits when it leaves
  `MEASURED_MARGIN` of the budget free.

accelerate's `find_executable_batch_size` only halves the batch until it fits; this chooses
among techniques too.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from setr_lowmem.config import Config, ConfigError, replace_keys
from setr_lowmem.memory.checkpointing import POLICIES
from setr_lowmem.memory.registry import PlanChoice, override, plan_choices
from setr_lowmem.sizing.cards import CARDS, DRIVER_SHARE, Card
from setr_lowmem.sizing.measure import Measurement, measure, memory_cap, set_memory_cap

log = logging.getLogger(__name__)


Settings = tuple[tuple[str, Any], ...]  # (config key, value) pairs: hashable, in the choices' order


@dataclass(frozen=True)
class Plan:
    """A micro-batch and the values chosen for the techniques (`settings`), or the config's own
    (`as_configured`: nothing overridden)."""

    micro_batch: int
    settings: Settings = ()
    as_configured: bool = False

    @staticmethod
    def of(micro_batch: int, settings: dict[str, Any]) -> Plan:
        """`Plan.of(8, {"memory.checkpointing": "full", "optim.bits": 8})`."""
        return Plan(micro_batch, tuple(settings.items()))

    @staticmethod
    def configured(cfg: Config) -> Plan:
        """The config as it is, described as a plan."""
        return Plan(cfg.train.micro_batch, as_configured=True)

    def changes(self) -> dict[str, Any]:
        """The config values the plan sets ({} as configured)."""
        return {} if self.as_configured else {"train.micro_batch": self.micro_batch, **dict(self.settings)}

    def overrides(self) -> list[str]:
        """The plan as the command line's overrides: what is printed to paste."""
        return [override(k, v) for k, v in self.changes().items()]

    def describe(self, cfg: Config) -> str:
        """'micro-batch 8 x 2, checkpointing full, 32-bit': the micro-batch and accumulation, then how
        each technique with a planner choice reads in the planned config (`PlanChoice.label`)."""
        planned = apply_plan(cfg, self)
        labels = [label for choice in plan_choices() if (label := choice.label(planned))]
        return ("as configured: " if self.as_configured else "") + ", ".join(
            [f"micro-batch {self.micro_batch} x {planned.train.accumulation()}", *labels])


def _value(cfg: Config, key: str) -> Any:
    """The value of dotted `key` in `cfg`."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def technique_sets(cfg: Config, cuda: bool, only: dict[str, tuple] | None = None) -> list[Settings]:
    """Every combination of the techniques' planner choices, roughly from fastest to most frugal:
    the first choice (checkpointing) varies fastest. `only` narrows a key to some values (an option
    that leaves a key alone has the config's value); an option that needs a GPU is left out on a
    CPU unless `only` names one of its keys."""
    choices = plan_choices()
    out = []
    for picked in itertools.product(*(_options(c, cfg, cuda, only or {}) for c in reversed(choices))):
        chosen = {k: v for option in reversed(picked) for k, v in option.items()}
        if all(choice.allowed(chosen) for choice in choices):
            out.append(tuple(chosen.items()))
    return out


def _options(choice: PlanChoice, cfg: Config, cuda: bool, only: dict[str, tuple]) -> list[dict[str, Any]]:
    """The options of `choice` that `technique_sets` tries: those `only` allows, in its order."""
    named = [k for k in only if any(k in option for option in choice.options)]

    def values(option: dict[str, Any]) -> list[Any]:
        return [option.get(k, _value(cfg, k)) for k in named]

    kept = [o for i, o in enumerate(choice.options)
            if all(v in only[k] for k, v in zip(named, values(o))) and (cuda or i not in choice.gpu_only or named)]
    return sorted(kept, key=lambda o: [only[k].index(v) for k, v in zip(named, values(o))])


def narrowed(offload: bool | None = None, policies: tuple[str, ...] = POLICIES) -> dict[str, tuple]:
    """`technique_sets`' `only` for a set of checkpointing policies, and with or without ZeRO offload."""
    only: dict[str, tuple] = {"memory.checkpointing": tuple(policies)}
    if offload is not None:
        only["memory.deepspeed.offload_optimizer"] = (offload,)
    return only


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """`cfg` with the plan's values (typed: nothing is written out and parsed again)."""
    return replace_keys(cfg, plan.changes())


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
    sizes = micro_batches or [b for b in micro_batch_sizes(cfg) if max_micro_batch is None or b <= max_micro_batch]
    tried: list[tuple[Plan, Measurement]] = []
    before = memory_cap(device)  # the user's own cap (train.py --cap-gib, targets.py --cap-gib) comes back after
    cap = budget_gib if before is None else min(budget_gib, before)
    set_memory_cap(cap, device)  # a candidate over the budget fails fast instead of using the whole card
    try:
        _search(cfg, budget_gib, steps, sizes, device, cuda, tried, report,
                technique_sets(cfg, cuda, narrowed(offload, policies)))
    finally:
        set_memory_cap(before, device)
    return pick(tried, cuda), tried


TIE = 0.05  # plans within 5% of the fastest are equally fast: machine noise must not choose among them
MEASURED_MARGIN = 0.05  # a measured plan fits when it leaves 5% of the budget free: a few steps do not show
# what hours add (the allocator's fragmentation over a long run); the planner's policy, not a measurement


def fastest(candidates: list[tuple[Plan, float, float]]) -> Plan | None:
    """The fastest of (plan, images/s, peak GiB) fitting candidates; among those within `TIE` of
    it, the one with the lowest peak (the most memory to spare), so that noise does not decide.
    Without any speed (all NaN): the first, in the planner's order from fastest to most frugal."""
    if not candidates:
        return None
    known = [c for c in candidates if not math.isnan(c[1])]
    if not known:
        return candidates[0][0]
    top = max(img_s for _, img_s, _ in known)
    ties = [c for c in known if c[1] >= (1 - TIE) * top]
    return min(ties, key=lambda c: (c[2], -c[1]))[0]


def pick(tried: list[tuple[Plan, Measurement]], cuda: bool) -> Plan | None:
    """The measured plan to choose (`fastest` among those that fit)."""
    return fastest([(plan, m.img_s, peak_of(m, cuda)) for plan, m in tried if m.fits])


def _search(cfg, budget_gib, steps, sizes, device, cuda, tried, report, candidates) -> None:
    started, most = time.time(), len(candidates) * len(sizes)  # at most: a set stops at its first fit
    if not cuda and cfg.model.embed_dim >= 768:
        report(f"  no GPU: each plan runs {steps} steps of the full-size model on the CPU, a minute or more each")
    for settings in candidates:
        for mb in sizes:
            plan = Plan(mb, settings)
            m = measure(apply_plan(cfg, plan), label=plan.describe(cfg), steps=steps, device=device,
                        breakdown=not cuda, cap_gib=budget_gib if cuda else None)
            fits = m.fits and peak_of(m, cuda) <= budget_gib * (1 - MEASURED_MARGIN)
            if m.fits and not fits:
                m.note = m.note or (f"peak {gib(peak_of(m, cuda))} GiB leaves less than {MEASURED_MARGIN:.0%} of the "
                                    f"{budget_gib:g} GiB budget free")
            m.fits = fits
            tried.append((plan, m))
            spent = time.time() - started
            left = spent / len(tried) * (most - len(tried)) / 60
            report(f"  {plan.describe(cfg):<58} " + (f"peak {gib(peak_of(m, cuda)):>7} GiB  {m.img_s:7.1f} img/s"
                                                       if fits else f"does not fit: {m.note}")
                   + f"  [{len(tried)}/{most} at most, {spent:.0f} s, at most {left:.1f} min left]")
            if fits:
                break  # smaller micro-batches of this technique set are slower


def auto_fit(cfg: Config, budget_gib: float, steps: int = 3, report=print) -> Config:
    """`cfg` with the fastest plan that fits `budget_gib` applied (an error if none fits)."""
    report(f"auto-fit: trying plans for {cfg.name} within {budget_gib:g} GiB (effective batch {cfg.train.total_batch})")
    plan, _ = search(cfg, budget_gib, steps=steps, report=report)
    if plan is None:
        raise ConfigError(f"no plan fits {budget_gib:g} GiB for {cfg.name} with {MEASURED_MARGIN:.0%} of it free, even "
                          "micro-batch 1 with full checkpointing and 8-bit states (and offload on a GPU); use a "
                          "smaller crop or a larger budget")
    report(f"chosen: {plan.describe(cfg)}")
    report("as overrides: " + " ".join(plan.overrides()))
    return apply_plan(cfg, plan)




def gib(x: float) -> str:
    """A GiB figure with enough digits to compare with a budget: 3 decimals under 0.1 GiB."""
    return f"{x:.3f}" if abs(x) < 0.1 else f"{x:.2f}"


# ---- the table both modes print -----------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What a plan must fit: `capacity` GiB on the device (a plan's need includes the CUDA
    context), from a card of the table, a card given by its size, or a budget; `how` says how."""

    label: str
    capacity: float
    card: Card | None = None
    how: str = ""


def card_target(memory_gb: float, card: Card | None = None) -> Target:
    """A card sold as `memory_gb` GB: vendors size memory in binary units (24 GB of chips are
    24 GiB) and CUDA offers a little less of it (`cards.DRIVER_SHARE`)."""
    capacity = memory_gb * DRIVER_SHARE
    label = f"{card.name.replace('NVIDIA ', '')} ({memory_gb:g} GB)" if card else f"a {memory_gb:g} GB card"
    return Target(label, capacity, card, f"{memory_gb:g} GB sold = {memory_gb:g} GiB of memory, x {DRIVER_SHARE:.4f} "
                                         f"offered by CUDA = {capacity:.2f} GiB")


def budget_target(budget_gib: float, label: str = "") -> Target:
    return Target(label or f"a budget of {budget_gib:g} GiB", budget_gib, None, f"{budget_gib:g} GiB as given")


@dataclass
class Outcome:
    """One plan on one target: its peak (GiB, with the mode's margin), images/s with its range
    (NaN where unknown) and whether it fits."""

    plan: Plan
    peak: float
    img_s: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    fits: bool = False
    rank: float = float("nan")  # the speed that orders the plans (a card's own, or the H100's for a size)


def days(cfg: Config, img_s: float) -> float:
    """Days that the config's schedule (iterations x total batch images) takes at `img_s`."""
    return cfg.schedule.iters * cfg.train.total_batch / img_s / 86400


def loader_rate(cfg: Config, where: tuple[Path, ...] = ()) -> tuple[float, str] | None:
    """(images/s that one CPU core prepares for `cfg`'s dataset at its crop, and where that was measured)
    from the newest `loader_*.json` of `benchmarks/loader.py` (in `benchmarks/results` under the working
    directory or the clone), or None when it was not measured for this dataset and crop."""
    folders = where or (Path.cwd() / "benchmarks" / "results", Path(__file__).resolve().parents[2] / "benchmarks" / "results")
    files = sorted({f for d in folders if d.is_dir() for f in d.glob("loader_*.json")}, key=lambda f: f.name[-15:])
    for f in reversed(files):
        found = json.loads(f.read_text())
        for row in found["rows"]:
            if row["dataset"] == cfg.data.dataset and row["crop"] == cfg.data.crop:
                return row["img_s_per_core"], f"{f.name}: {row['img_s_per_core']:g} img/s per core of {found['cpu']}"
    return None


def cores(img_s: float, rate: tuple[float, str] | None) -> str:
    """The CPU cores (DataLoader workers, one process each) that feed `img_s`, or '-' when unknown."""
    return "-" if rate is None or math.isnan(img_s) else str(math.ceil(img_s / rate[0]))


def summary(cfg: Config, rows: list[tuple[Target, Outcome | None]], paste: str) -> list[str]:
    """One line per target with the plan chosen for it, its peak and what it leaves free, images/s
    with its range, the days of the schedule and the CPU cores the data loader needs at that speed,
    then the command line to paste."""
    rate = loader_rate(cfg)
    lines = [f"  {'card':<34} {'GiB':>6}  {'plan':<68} {'peak GiB':>8} {'free':>6} {'img/s':>6} {'range':>11} "
             f"{'days':>11} {'cores':>5}"]
    for target, out in rows:
        if out is None:
            lines.append(f"  {target.label:<34} {gib(target.capacity):>6}  no plan fits")
            continue
        elif not out.fits:
            lines.append(f"  {target.label:<34} {gib(target.capacity):>6}  no plan fits with the margin; "
                         f"'likely' (not chosen): {out.plan.describe(cfg)}, {gib(out.peak)} GiB at the worst ratio")
            continue
        speed = "-" if math.isnan(out.img_s) else f"{out.img_s:.1f}"
        spread = "" if math.isnan(out.low) else f"{out.low:.1f}-{out.high:.1f}"
        when = "" if math.isnan(out.img_s) else f"{days(cfg, out.img_s):.1f}" + (
            "" if math.isnan(out.low) else f" ({days(cfg, out.high):.1f}-{days(cfg, out.low):.1f})")
        lines.append(f"  {target.label:<34} {gib(target.capacity):>6}  {out.plan.describe(cfg):<68} {gib(out.peak):>8} "
                     f"{gib(target.capacity - out.peak):>6} {speed:>6} {spread:>11} {when:>11} "
                     f"{cores(out.img_s, rate):>5}")
        lines.append(f"      paste: {paste}" + "".join(f" {o}" for o in out.plan.overrides()))
    lines.append("  cores: the data loader's workers (one CPU core each) that keep up, at " + (
        rate[1] + " (benchmarks/loader.py)" if rate else "a rate not measured for this dataset and crop: "
        "run benchmarks/loader.py"))
    return lines


# ---- predict: every plan on fake tensors ---------------------------------------------------

def micro_batch_sizes(cfg: Config) -> list[int]:
    """Every micro-batch that keeps the effective batch, largest (fastest) first."""
    total = cfg.train.total_batch
    return [b for b in range(total, 0, -1) if total % b == 0]


def _forecast_plans(cfg: Config, targets: list[Target], sizes: list[int], as_configured: bool, report) -> list:
    """(plan, forecast) of the config as configured, or of every technique set from the largest
    micro-batch down until one fits every target (smaller ones are slower)."""
    from setr_lowmem.sizing.forecast import forecast

    if as_configured:
        plan = Plan.configured(cfg)
        f = forecast(cfg)
        cats = ", ".join(f"{k} {v:.2f}" for k, v in f.categories.items() if v > 0.0005)
        report(f"  {plan.describe(cfg)}: allocated {f.allocated:.2f} GiB ({cats}); need {gib(f.device(True))} GiB "
               f"at the worst ratio, {gib(f.device())} expected")
        for note in f.notes:
            report(f"    {note}")
        return [(plan, f)]
    out, started = [], time.time()
    report(f"  {'plan':<68} {'allocated':>9} {'need':>7} {'expected':>8}")
    for settings in technique_sets(cfg, cuda=True):
        for mb in sizes:
            plan = Plan(mb, settings)
            f = forecast(apply_plan(cfg, plan))
            out.append((plan, f))
            report(f"  {plan.describe(cfg):<68} {f.allocated:9.2f} {gib(f.device(True)):>7} {gib(f.device()):>8}"
                   f"  [{len(out)} plans, {time.time() - started:.0f} s]")
            if all(f.device(True) <= t.capacity for t in targets):
                break
    return out


def _choose(target: Target, candidates: list, model) -> Outcome | None:
    """The fastest plan that fits `target` with the margin; else the fastest 'likely' one, marked
    as not fitting; else None."""
    from setr_lowmem.sizing.speed import images_per_second

    outcomes = []
    for plan, f in candidates:
        out = Outcome(plan, f.device(True), fits=f.device(True) <= target.capacity)
        if model is not None:
            card = target.card or CARDS["h100"]  # a card given by its size: ordered by the H100's speeds
            out.rank = images_per_second(f.counts, card, model.efficiencies)
            if target.card is not None:
                out.img_s = out.rank
                out.low, out.high = model.range(out.img_s)
        outcomes.append((out, f.device() <= target.capacity))
    for wanted in (lambda o, likely: o.fits, lambda o, likely: likely):
        chosen = fastest([(o.plan, o.rank, o.peak) for o, likely in outcomes if wanted(o, likely)])
        if chosen is not None:
            return next(o for o, _ in outcomes if o.plan == chosen)
    return None


def predict(cfg: Config, targets: list[Target], micro_batches: list[int] | None = None, report=print,
            as_configured: bool = False, paste: str = "setr-train") -> list[tuple[Target, Outcome | None]]:
    """Forecast the plans on fake tensors (no GPU needed) and choose the fastest that fits each
    target with the margin; prints the plans, then `summary`. Returns (target, chosen outcome)."""
    from setr_lowmem.sizing.forecast import OVERHEADS
    from setr_lowmem.sizing.speed import load_model

    model = load_model()
    report(f"{cfg.name}: predicted on fake tensors, no GPU used (total batch {cfg.train.total_batch}, "
           f"{cfg.schedule.iters} iterations)")
    report(f"  a plan fits a card when its peak allocated x {OVERHEADS.reserved_high:.3f} (the worst reserve/allocated "
           f"ratio measured; x {OVERHEADS.reserved:.3f} expected with expandable segments) + {OVERHEADS.context:g} GiB "
           "of CUDA context and kernels (an estimate, PyTorch #107667) is within what CUDA offers of it; a plan "
           "that fits only at the expected ratio is 'likely' and never chosen")
    for t in targets:
        report(f"  {t.label}: {t.how}")
    if model is None:
        report("  images/s: no speed model stored (run benchmarks/speed_check.py): plans in the planner's order")
    else:
        report(f"  images/s: the time model fitted to {model.fitted_on}; range: its leave-one-out errors there "
               f"({100 * min(model.errors):+.0f}% to {100 * max(model.errors):+.0f}%), other cards assumed to reach "
               "the same efficiencies (docs/speed-forecast.md); a card given by its size gets no speed")
    candidates = _forecast_plans(cfg, targets, micro_batches or micro_batch_sizes(cfg), as_configured, report)
    rows = [(t, _choose(t, candidates, model)) for t in targets]
    report("")
    for line in summary(cfg, rows, paste):
        report(line)
    return rows


def measure_plans(cfg: Config, budget_gib: float, steps: int = 3, report=print, paste: str = "setr-train",
                  auto_fit_line: str = "") -> tuple[Target, Outcome | None]:
    """Measure the plans on this machine (`search`, the code `auto_fit` runs inside training) and
    print the chosen one in `summary`'s table."""
    cuda = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if cuda else "this CPU"
    report(f"{cfg.name}: measured on {where}, {steps} steps per plan; a plan fits when its peak "
           + ("on the device (CUDA context included)" if cuda else "(PyTorch's MemTracker)")
           + f" leaves {MEASURED_MARGIN:.0%} of the {budget_gib:g} GiB budget free")
    plan, tried = search(cfg, budget_gib, steps=steps, report=report)
    target = budget_target(budget_gib, f"{where} within {budget_gib:g} GiB")
    out = None
    if plan is not None:
        m = dict(tried)[plan]
        out = Outcome(plan, peak_of(m, cuda), m.img_s, fits=True, rank=m.img_s)
    report("")
    for line in summary(cfg, [(target, out)], paste):
        report(line)
    if out is not None and auto_fit_line:
        report(f"      or measure again at the start of training: {auto_fit_line}")
    return target, out
