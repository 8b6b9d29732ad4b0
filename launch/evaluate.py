"""Evaluate a trained SETR: `python launch/evaluate.py --checkpoint PATH [--cfg pup_ade20k.yaml]`.

The same as the installed `setr-evaluate` command: see setr_lowmem/commands/evaluate.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.commands.evaluate import cli, main  # noqa: F401  (main: run in-process by the tests)

if __name__ == "__main__":
    cli()
