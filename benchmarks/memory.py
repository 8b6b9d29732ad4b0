"""Peak memory and speed of SETR-PUP training as each memory technique is added in turn.

The same as the installed `setr-benchmark` command: see setr_lowmem/commands/benchmark.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.commands.benchmark import ROWS, chart, cli, main, row_overrides, table  # noqa: F401

if __name__ == "__main__":
    cli()
