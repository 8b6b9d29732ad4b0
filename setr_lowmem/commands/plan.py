"""The planner: the fastest memory plan that fits a card, keeping the effective batch.

    setr-plan --cfg pup_ade20k.yaml --predict                           every card of the table, no GPU needed
    setr-plan --cfg pup_ade20k.yaml --predict --cards rtx4090 l4 12     named cards, or sizes in GB
    setr-plan --cfg pup_ade20k.yaml --predict --as-configured           the config itself, not a search
    setr-plan --cfg pup_ade20k.yaml --measure [--budget-gib 24]         real steps on the GPU at hand

--predict forecasts every plan on fake tensors (memory, and images/s on each named card from the
time model fitted to measured H100 steps); --measure runs a few real steps of each plan here, the
code that `setr-train --auto-fit GIB` runs before training. Both print one table: per card, the
plan chosen, its peak, the memory it leaves free, images/s with a range, the days the config's
schedule takes, and the command line to paste. (`python launch/plan.py ...` from a clone,
`python -m setr_lowmem.commands.plan ...`.) See `setr_lowmem.sizing.planner`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from setr_lowmem.cli import OneLineParser, command_parser, positive_gib, positive_int, prepare_environment, run_main


def command_names(argv0: str | None = None) -> tuple[str, str]:
    """(this command as it was run, the training command run the same way): `setr-plan` and
    `setr-train`, `python launch/plan.py` and `python launch/train.py`, or the `python -m` forms."""
    path = Path(argv0 if argv0 is not None else sys.argv[0])
    if path.name == "plan.py" and path.parent.name == "launch":
        return f"python {path.parent.name}/plan.py", "python launch/train.py"
    if path.name == "plan.py":
        return "python -m setr_lowmem.commands.plan", "python -m setr_lowmem.commands.train"
    return "setr-plan", "setr-train"


MOST_GB = 1024  # a size above this is a typo or a card's number ('4090'), not a card's memory


def build_parser(prog: str) -> OneLineParser:
    parser = command_parser(__doc__, prog)
    parser.add_argument("--cfg", required=True, help="config file (a bare name is looked up in configs/)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--predict", action="store_true", help="forecast every plan on fake tensors (any machine)")
    mode.add_argument("--measure", action="store_true", help="measure plans with real steps on this machine")
    parser.add_argument("--cards", nargs="+", metavar="CARD",
                        help="--predict: cards of docs/reference/cards.csv by key (rtx4090, l4, h100, ...) or sizes in "
                             "GB as sold (24); default: every card of the table")
    parser.add_argument("--budget-gib", type=positive_gib, metavar="GIB",
                        help="a budget in GiB for the step (device-level, CUDA context included); --measure "
                             "default: the GPU's whole memory")
    parser.add_argument("--micro-batches", type=positive_int, nargs="+", metavar="N",
                        help="micro-batches to try (divisors of train.total_batch); default: all of them")
    parser.add_argument("--as-configured", action="store_true",
                        help="--predict: forecast the config as it is (its breakdown by category), no search")
    parser.add_argument("--steps", type=positive_int, help="--measure: steps per plan (default 3)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    return parser


def checked(parser: OneLineParser, args: argparse.Namespace) -> list:
    """Every argument checked before any work (and before the planner is imported): the cards
    to plan for as (card or None, size in GB) pairs, for --predict."""
    from setr_lowmem.sizing.cards import CARDS, find_card, positive_size

    for flag, value in (("--cards", args.cards), ("--as-configured", args.as_configured)):
        if args.measure and value:
            parser.error(f"{flag} is for --predict (--measure plans for the GPU at hand)")
    if args.predict and args.steps is not None:
        parser.error("--steps is for --measure (--predict runs no steps)")
    targets = []
    for text in args.cards or ([] if args.budget_gib else list(CARDS)):
        card, size = find_card(text), positive_size(text)
        if card is None and size is None:
            parser.error(f"--cards: {text!r} is neither a card of docs/reference/cards.csv ({', '.join(CARDS)}) "
                         "nor a memory size in GB above 0")
        if card is None and size > MOST_GB:
            alike = [key for key in CARDS if text in key]
            parser.error(f"--cards: {text} GB is more than any card holds (at most {MOST_GB} GB taken as a size)"
                         + (f"; did you mean {' or '.join(alike)}?" if alike else ""))
        targets.append((card, card.memory_gb if card else size))
    return targets


def main() -> None:
    prog, train = command_names()
    parser = build_parser(prog)
    args = parser.parse_intermixed_args()
    targets = checked(parser, args)
    prepare_environment()

    import torch

    from setr_lowmem.config import load_config
    from setr_lowmem.sizing.meters import GIB
    from setr_lowmem.sizing.planner import budget_target, card_target, measure_plans, predict

    if args.measure and args.budget_gib is None and not torch.cuda.is_available():
        parser.error("--measure without a GPU needs --budget-gib (the budget for PyTorch's MemTracker peak)")
    cfg = load_config(args.cfg, list(args.overrides) + ["model.pretrained="])
    bad = [b for b in args.micro_batches or [] if cfg.train.total_batch % b]
    if bad:
        parser.error(f"--micro-batches {' '.join(map(str, bad))}: each must divide train.total_batch="
                     f"{cfg.train.total_batch}")
    paste = " ".join([train, "--cfg", args.cfg, *args.overrides])
    if args.predict:
        targets = [card_target(gb, card) for card, gb in targets]
        targets += [budget_target(args.budget_gib)] if args.budget_gib else []
        predict(cfg, targets, args.micro_batches, as_configured=args.as_configured, paste=paste)
        return
    budget = args.budget_gib or torch.cuda.get_device_properties(0).total_memory / GIB
    measure_plans(cfg, budget, steps=args.steps or 3, paste=paste, auto_fit_line=f"{paste} --auto-fit {budget:g}")


def cli() -> None:
    """The `setr-plan` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
