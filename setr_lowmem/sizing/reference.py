"""What plain PyTorch SETR costs on a GPU, as measured: the reference the toolkit is checked against.

The measurements are data, `setr_lowmem/sizing/data/h100_plain_pytorch.csv` (shipped in the wheel;
`docs/reference/` is a link to that folder), described in `docs/reference-measurements.md`: what
was measured, on which card and software, and how. Each row names this toolkit's configuration
and the overrides that run the same step, so that the memory forecast
(`benchmarks/forecast_check.py`) and the speed model (`benchmarks/speed_check.py`) can be compared
with it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from setr_lowmem.config import Config, load_config, replace_keys

DATA = Path(__file__).resolve().parent / "data"
H100_CSV = DATA / "h100_plain_pytorch.csv"


@dataclass(frozen=True)
class Row:
    label: str
    config: str  # "": no configuration of this toolkit runs the same step
    overrides: list[str]  # the whole difference from the config's file, micro-batch aside
    micro_batch: int
    allocated: float  # GiB, measured peak allocated
    reserved: float | None  # GiB, measured peak reserved (None: not given)
    expandable: bool = False  # measured with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    accumulation: int = 1
    img_s: float = float("nan")  # measured images per second (median step after the first)
    note: str = ""  # what the measurement does not say, and what is assumed for it

    def configured(self) -> Config:
        """This toolkit's configuration of the row's step (random initial weights): the config file
        with the row's overrides (the CSV's own strings, as a command line gives them), then its
        batch, typed."""
        return replace_keys(load_config(self.config, self.overrides), {
            "model.pretrained": "", "train.micro_batch": self.micro_batch,
            "train.total_batch": self.micro_batch * self.accumulation})


def read_rows(path: Path = H100_CSV) -> list[Row]:
    """The rows of a reference CSV (columns as in `h100_plain_pytorch.csv`)."""
    with open(path, newline="") as f:
        return [Row(label=r["label"], config=r["config"], overrides=r["overrides"].split(),
                    micro_batch=int(r["micro_batch"]), allocated=float(r["allocated_gib"]),
                    reserved=float(r["reserved_gib"]) if r["reserved_gib"] else None,
                    expandable=r["expandable_segments"] == "true", accumulation=int(r["accumulation"]),
                    img_s=float(r["img_s"]), note=r["note"]) for r in csv.DictReader(f)]


ROWS = read_rows()


def reserved_ratios(expandable: bool | None = None, deepspeed: bool = False) -> list[float]:
    """Measured peak reserved / peak allocated of the rows (DeepSpeed's or the others; with or
    without expandable segments, or both for None)."""
    return [r.reserved / r.allocated for r in ROWS if r.reserved is not None
            and (expandable is None or r.expandable == expandable)
            and any("deepspeed" in o for o in r.overrides) == deepspeed]
