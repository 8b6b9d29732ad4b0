"""What the launchers share: known errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import NoReturn


def prepare_environment() -> None:
    """Process-wide settings every entry point needs before torch touches a device: the CUDA
    allocator's configuration, and DeepSpeed's accelerator on a machine without a GPU (DeepSpeed
    picks it at import and otherwise looks for mpi4py)."""
    import os

    import torch

    from setr_lowmem.memory.allocator import configure_cuda_allocator

    configure_cuda_allocator()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    quiet_known_warnings()


class _Drop(logging.Filter):
    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(t in record.getMessage() for t in self.texts)


def quiet_known_warnings() -> None:
    """Drop dependency warnings about choices this toolkit makes on purpose, before they print:
    DeepSpeed calls ZeRO with torch's or bitsandbytes' SGD an "untested optimizer" (the paper's
    optimizer, allowed with `zero_allow_untested_optimizer`), and bitsandbytes asks on CPUs with
    AVX512-BF16 for the `kernels` package of a 4-bit CPU matmul that the 8-bit optimizers never use."""
    logging.getLogger("DeepSpeed").addFilter(_Drop("untested optimizer"))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Drop("pip install kernels"))


def version() -> str:
    """'setr-lowmem 0.1.0 (torch 2.14.1, Python 3.11.7)': what a bug report needs first."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import torch

    try:
        own = installed("setr-lowmem")
    except PackageNotFoundError:  # run from a clone without installing
        own = "(not installed)"
    return f"setr-lowmem {own} (torch {torch.__version__}, Python {platform.python_version()})"


class _Version(argparse.Action):
    """`--version`, worked out only when asked for (it imports torch, seconds that --help should not pay)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show the versions and exit", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())
        parser.exit()


class OneLineParser(argparse.ArgumentParser):
    """argparse, with every refusal one line on stderr and exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def command_parser(doc: str | None, prog: str | None = None) -> OneLineParser:
    """The argument parser every console command starts from: its module's docstring as the help text
    (named after the command that was run), `--version`, and one-line refusals."""
    parser = OneLineParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    return parser


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return value


def positive_gib(text: str) -> float:
    """argparse type: a finite memory size in GiB above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size in GiB above 0")
    return value


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_main(main: Callable[[], None]) -> None:
    """Run a launcher's main; the toolkit's own errors print as `error: <one line>` (exit 2). Each main
    checks its arguments first and then calls `prepare_environment` (which imports torch: a refused
    argument or config answers at once)."""
    from setr_lowmem.errors import SetrError

    try:
        main()
    except SetrError as err:
        fail(one_line(err), getattr(err, "exit_code", 2))
    except KeyboardInterrupt as err:  # a second Ctrl-C in training, or one before it: nothing half-done to keep
        fail(one_line(err) if str(err) else "interrupted (Ctrl-C)", 130)


def one_line(err: BaseException) -> str:
    """The error's message in one line. An error raised in a DataLoader worker comes back as
    "Caught DataError in DataLoader worker process 0" followed by the worker's traceback, whose
    last line holds the original message (the file that could not be read): that line is kept."""
    text = str(err)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        return lines[-1].removeprefix(prefix).removeprefix(f"{type(err).__name__}: ")
    return lines[0]
