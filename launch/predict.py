"""Predict with a trained SETR and write colour overlays:

The same as the installed `setr-predict` command: see setr_lowmem/commands/predict.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.commands.predict import cli, main  # noqa: F401  (main: run in-process by the tests)

if __name__ == "__main__":
    cli()
