"""The performance targets, each measured with the fastest plan that meets its memory.

    python benchmarks/targets.py --cap-gib 24                  # every case (GPU: about 5 min each)
    python benchmarks/targets.py --cap-gib 24 --case ade20k-mb16

For each case the auto-fit planner (`setr_lowmem.sizing.planner.search`) measures the candidate plans
(checkpointing policy x 32/8-bit states, at the case's micro-batch) with the decoder levers on
(bf16, SDPA, classifier first, the fused upsample+CE, the matrix-product upsample backward,
channels-last, compiled conv units) and keeps the fastest one within the case's device-level
budget. That plan is then measured again with the levers off (the reference path: bf16, SDPA,
classifier first, stock upsample and cross-entropy), so the table shows what the levers buy at
equal plan. Results are written as Markdown and JSON under benchmarks/results/.

Without a GPU the same cases run on a tiny SETR-PUP on the CPU: budgets are not applied and
no target is judged (the tool and its plumbing are what that run checks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from setr_lowmem.cli import prepare_environment  # noqa: E402

prepare_environment()
from setr_lowmem.config import load_config  # noqa: E402
from setr_lowmem.memory.registry import perf_levers  # noqa: E402
from setr_lowmem.sizing.measure import (benchmark_overrides, device_tag, fmt, fmt_mfu, measure,  # noqa: E402
                                 set_memory_cap)
from setr_lowmem.sizing.planner import POLICIES, apply_plan, search  # noqa: E402


@dataclass(frozen=True)
class Case:
    title: str
    cfg: str
    total_batch: int
    micro_batches: tuple[int, ...] | None  # None: any divisor of the total batch (accumulation)
    reserved_gib: float  # targets
    device_gib: float | None
    img_s: float
    offload: bool = False


CASES = {
    "ade20k-mb16": Case(title="ADE20K 512, micro-batch 16, no accumulation", cfg="pup_ade20k.yaml", total_batch=16,
                        micro_batches=(16,), reserved_gib=12, device_gib=13, img_s=80),
    "cityscapes-mb8": Case(title="Cityscapes 768, micro-batch 8, no accumulation", cfg="pup_cityscapes.yaml",
                           total_batch=8, micro_batches=(8,), reserved_gib=7, device_gib=8, img_s=45),
    "ade20k-8gib": Case(title="ADE20K 512, effective batch 16 within an 8 GiB budget", cfg="pup_ade20k.yaml",
                        total_batch=16, micro_batches=None, reserved_gib=7, device_gib=8, img_s=40),
    "ade20k-zero2": Case(title="ZeRO-2 CPU offload, ADE20K, micro-batch 16", cfg="pup_ade20k.yaml", total_batch=16,
                         micro_batches=(16,), reserved_gib=10, device_gib=None, img_s=30, offload=True),
}
# The decoder levers all on / all off, from the techniques' `perf` values (`memory.registry`).
LEVERS_ON = perf_levers(on=True)
LEVERS_OFF = perf_levers(on=False)


def run_case(key: str, case: Case, cuda: bool, steps: int, policies: tuple[str, ...], extra: list[str]) -> dict:
    base = benchmark_overrides(extra, cuda) + [f"train.total_batch={case.total_batch}"]
    budget = (case.device_gib or case.reserved_gib) if cuda else float("inf")
    on = LEVERS_ON + (["memory.channels_last=false"] if case.offload else [])  # DeepSpeed refuses channels-last
    cfg = load_config(case.cfg, base + on)
    print(f"\n{key}: {case.title}" + (f" (device budget {budget:g} GiB)" if cuda else " (CPU: no budget)"), flush=True)
    plan, tried = search(cfg, budget, steps=steps, micro_batches=list(case.micro_batches or []) or None,
                         offload=case.offload, policies=policies)
    out = {"key": key, "case": asdict(case), "tried": [dict(plan=_plan(p), **m.as_dict()) for p, m in tried]}
    if plan is None:
        out["verdict"] = "no plan fits the budget"
        return out
    best = next(m for p, m in tried if p == plan and m.fits)
    ref = measure(apply_plan(load_config(case.cfg, base + LEVERS_OFF), plan), label="levers off", steps=steps,
                  breakdown=not cuda)
    out.update(plan=_plan(plan), plan_text=plan.describe(cfg), levers_on=best.as_dict(),
               levers_off=ref.as_dict())
    if cuda:
        met = [best.reserved <= case.reserved_gib, case.device_gib is None or best.device <= case.device_gib,
               best.img_s >= case.img_s]
        out["verdict"] = "met" if all(met) else "missed: " + ", ".join(
            what for what, ok in zip(("reserved", "device-level", "throughput"), met) if not ok)
    else:
        out["verdict"] = "not judged (CPU, tiny model)"
    return out


def _plan(plan) -> dict:
    """A plan as JSON: its micro-batch and the config values it sets."""
    return {"micro_batch": plan.micro_batch, **dict(plan.settings)}


def table(results: list[dict], cuda: bool) -> str:
    peak = "reserved" if cuda else "allocated"
    lines = ["| case | target | plan | peak " + peak + " GiB | device GiB | img/s | MFU | levers off: peak / img/s | "
             "memory ratio | speed ratio | verdict |", "|" + "---|" * 11]
    for r in results:
        c = r["case"]
        target = (f"<= {c['reserved_gib']:g} GiB" + (f" (device <= {c['device_gib']:g})" if c["device_gib"] else "")
                  + f", >= {c['img_s']:g} img/s")
        if "plan" not in r:
            lines.append(f"| {c['title']} | {target} | - | - | - | - | - | - | - | - | {r['verdict']} |")
            continue
        on, off = r["levers_on"], r["levers_off"]
        lines.append("| " + " | ".join([
            c["title"], target, r["plan_text"], fmt(on[peak]), fmt(on["device"]), fmt(on["img_s"], 1),
            fmt_mfu(on["mfu"]),
            f"{fmt(off[peak])} / {fmt(off['img_s'], 1)}", fmt(off[peak] / on[peak]) + "x",
            fmt(on["img_s"] / off["img_s"]) + "x", r["verdict"]]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--cap-gib", type=float, default=None, help="emulate a card of this size (e.g. 24)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    set_memory_cap(args.cap_gib, device)
    results = [run_case(k, CASES[k], cuda, args.steps, tuple(args.policies), list(args.overrides)) for k in args.case]
    tag = device_tag(device)
    date = datetime.date.today().isoformat()
    stem = f"targets_{tag}_{date}" + (f"_cap{args.cap_gib:g}" if args.cap_gib else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# Performance targets on {tag}, {date}\n\n{table(results, cuda)}\n"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"cap_gib": args.cap_gib, "results": results}, indent=1))
    print("\n" + md)
    print(f"wrote {out / stem}.md, .json")


if __name__ == "__main__":
    main()
