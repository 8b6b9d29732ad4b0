"""Choose the fastest memory plan that fits a card: `python launch/plan.py --cfg pup_ade20k.yaml --predict`.

The same as the installed `setr-plan` command: see setr_lowmem/commands/plan.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.commands.plan import cli, main  # noqa: F401  (main: run in-process by the tests)

if __name__ == "__main__":
    cli()
