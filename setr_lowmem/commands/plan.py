"""Choose the fastest memory plan that fits a card, keeping the effective batch.

    setr-plan --cfg pup_ade20k.yaml --budget-gib 24                         measure plans on this GPU
    setr-plan --cfg pup_ade20k.yaml --predict --cards 8 12 16 24            forecast them (no GPU needed)

(`python launch/plan.py ...` from a clone.) See `setr_lowmem.sizing.planner`.
"""

from __future__ import annotations

import argparse

from setr_lowmem.cli import run_main


def main() -> None:
    parser = argparse.ArgumentParser(prog="setr-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--budget-gib", type=float, help="measure plans on this machine within this budget")
    parser.add_argument("--predict", action="store_true",
                        help="forecast every plan on fake tensors instead of measuring (no GPU needed)")
    parser.add_argument("--cards", type=float, nargs="+", default=[8, 12, 16, 24], help="with --predict: card sizes, GB")
    parser.add_argument("--micro-batches", type=int, nargs="+", help="with --predict: micro-batches (default: the config's)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    if not args.predict and args.budget_gib is None:
        parser.error("give --budget-gib (measure plans here) or --predict (forecast them)")

    import torch

    from setr_lowmem.config import load_config
    from setr_lowmem.sizing.planner import auto_fit, predict

    cfg = load_config(args.cfg, list(args.overrides) + ["model.pretrained="])
    if args.predict:
        predict(cfg, args.cards, args.micro_batches)
        return
    if not torch.cuda.is_available():
        print("no GPU: measuring on the CPU (budget checked against PyTorch's MemTracker peak)")
    auto_fit(cfg, args.budget_gib, steps=args.steps)


def cli() -> None:
    """The `setr-plan` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
