"""Export the consolidated fp32 model of any checkpoint (ZeRO ones included) as one safetensors file:

The same as the installed `setr-export` command: see setr_lowmem/commands/export.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.commands.export import cli, main  # noqa: F401  (main: run in-process by the tests)

if __name__ == "__main__":
    cli()
