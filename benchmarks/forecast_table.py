"""The memory forecast of the nine paper configurations at their own micro-batch, and the cards
that hold them; then the planner's choice for each on the consumer cards (the fastest plan that
fits, its images/s and the days of the paper's schedule): `benchmarks/results/forecast_<date>.{md,json}`
(predicted, not measured).

    python benchmarks/forecast_table.py [--cards 8 12 16 24] [--plan-cards rtx3090 rtx4090 l4 12 16] [key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.cli import prepare_environment  # noqa: E402

prepare_environment()
from setr_lowmem.config import PAPER_CONFIGS, load_config  # noqa: E402
from setr_lowmem.sizing.cards import find_card  # noqa: E402
from setr_lowmem.sizing.forecast import OVERHEADS, forecast  # noqa: E402
from setr_lowmem.sizing.planner import card_target, days, predict  # noqa: E402



def planned(cards: list[str], overrides: list[str]) -> list[dict]:
    """The planner's choice (`setr-plan --predict`) for every paper config on each of `cards`."""
    targets = [card_target(c.memory_gb, c) if (c := find_card(text)) else card_target(float(text)) for text in cards]
    out = []
    for name in PAPER_CONFIGS:
        cfg = load_config(name, list(overrides) + ["model.pretrained="])
        for target, o in predict(cfg, targets, report=lambda line: None):
            out.append({"config": name, "card": target.label, "capacity": target.capacity,
                        "plan": o.plan.describe(cfg) if o else None, "overrides": o.plan.overrides() if o else [],
                        "fits": bool(o and o.fits), "need": o.peak if o else None, "img_s": o.img_s if o else None,
                        "low": o.low if o else None, "high": o.high if o else None,
                        "days": days(cfg, o.img_s) if o and o.img_s == o.img_s else None})
        print(f"{name}: planned for {len(targets)} cards", flush=True)
    return out


def choice_table(choices: list[dict]) -> list[str]:
    lines = ["The planner's choice per card (`setr-plan --cfg <config> --predict --cards ...`): the fastest plan "
             "that fits with the margin, its need at the worst measured reserve ratio (CUDA context included), "
             "images/s on the card with the speed model's leave-one-out range, and days of the paper's schedule. "
             "**Predicted, not measured.** A card given by its size gets no speed.", "",
             "| config | card | plan | need GiB | img/s (range) | days |", "|---|---|---|---|---|---|"]
    for c in choices:
        if not c["fits"]:
            lines.append(f"| {c['config']} | {c['card']} | no plan fits with the margin | | | |")
            continue
        speed = "-" if c["img_s"] != c["img_s"] else f"{c['img_s']:.1f} ({c['low']:.1f}-{c['high']:.1f})"
        when = "-" if c["days"] is None else f"{c['days']:.1f}"
        lines.append(f"| {c['config']} | {c['card']} | {c['plan']} | {c['need']:.2f} | {speed} | {when} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=float, nargs="+", default=[8, 12, 16, 24])
    parser.add_argument("--plan-cards", nargs="+", default=["rtx3090", "rtx4090", "l4", "12", "16"],
                        help="cards of docs/reference/cards.csv or sizes in GB to choose a plan for")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for name in PAPER_CONFIGS:
        f = forecast(load_config(name, list(args.overrides)))
        rows.append({"config": name, "micro_batch": f.micro_batch, "allocated": f.allocated,
                     "reserved": f.reserved(), "device": f.device(), "device_high": f.device(True),
                     "categories": f.categories, "seconds": f.seconds, "notes": f.notes,
                     "verdict": {str(c): f.verdict(c) for c in args.cards}})
        print(f"{name}: {f.allocated:.2f} GiB predicted at micro-batch {f.micro_batch} ({f.seconds:.0f} s)", flush=True)
    date = datetime.date.today().isoformat()
    head = ("| config | micro-batch | predicted peak allocated GiB | params | grads | optimizer | activations | "
            "temporaries | est. reserved | est. device-level | " + " | ".join(f"{c:g} GB" for c in args.cards) + " |")
    lines = [f"# Forecast of the paper configs as configured (predicted on fake tensors, not measured), {date}", "",
             ("Allocated: the fake step's peak, accounted techniques and cuBLAS workspaces included. Reserved: x "
              f"{OVERHEADS.reserved:.3f} (the reference's expandable-segments row); device-level: + "
              f"{OVERHEADS.context:g} GiB of CUDA context (estimated). A card column says 'fits' when even the "
              f"worst measured reserve (x {OVERHEADS.reserved_high:.3f}) fits, 'likely' when the expected one does."),
             "", head, "|" + "---|" * (10 + len(args.cards))]
    for r in rows:
        c = r["categories"]
        lines.append(f"| {r['config']} | {r['micro_batch']} | {r['allocated']:.2f} | " + " | ".join(
            f"{c.get(k, 0.0):.2f}" for k in ("params", "grads", "optimizer", "activations", "temporaries"))
            + f" | {r['reserved']:.2f} | {r['device']:.2f} | " + " | ".join(r["verdict"][str(x)] for x in args.cards)
            + " |")
    choices = planned(args.plan_cards, args.overrides)
    lines += ["", *choice_table(choices)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"forecast_{date}.md").write_text("\n".join(lines) + "\n")
    (out / f"forecast_{date}.json").write_text(json.dumps({"overrides": args.overrides, "rows": rows,
                                                          "plans": choices}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
