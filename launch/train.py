"""Train SETR: `accelerate launch launch/train.py --cfg pup_ade20k.yaml [key.sub=value ...]`.

The same as the installed `setr-train` command: see setr_lowmem/commands/train.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.commands.train import cli, main  # noqa: F401  (main: run in-process by the tests)

if __name__ == "__main__":
    cli()
