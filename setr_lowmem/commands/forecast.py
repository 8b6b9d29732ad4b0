"""Will it fit, without the card: one configuration's peak memory predicted on fake tensors.

    setr-forecast --cfg pup_ade20k.yaml [--cards 8 12 16 24] [key=value ...]

See `setr_lowmem.sizing.forecast` for what is computed and what is accounted.
"""

from __future__ import annotations

import argparse

from setr_lowmem.cli import run_main


def main() -> None:
    parser = argparse.ArgumentParser(prog="setr-forecast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--cards", type=float, nargs="+", default=[8, 12, 16, 24])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    from setr_lowmem.config import load_config
    from setr_lowmem.sizing.forecast import report

    print(report(load_config(args.cfg, args.overrides), args.cards))


def cli() -> None:
    """The `setr-forecast` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
