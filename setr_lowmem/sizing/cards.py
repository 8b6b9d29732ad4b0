"""The cards the planner predicts for: published memory, dense throughput and bandwidth, as data.

`data/cards.csv` (also `docs/reference/cards.csv`) holds one row per card with its source (the
vendor's datasheet or whitepaper) and where the figures were checked. Every throughput is
*dense*: vendors' headline tensor figures are often with 2:4 sparsity, twice the dense ones,
which a training step never reaches. BF16 is the rate with float32 accumulation, the one bf16
autocast uses (GeForce cards run it at half their FP16-accumulate rate).

How much of a card's memory a step may use (`usable_gib`): vendors size memory in binary units
(a 24 GB card carries 24 GiB of memory chips), CUDA reports a little less (the GPU machine of this
project, an H200 sold as 141 GB, reports about 139 GiB: `DRIVER_SHARE`), and the CUDA context
and loaded kernels take `CONTEXT_GIB` outside PyTorch's allocator (`sizing.forecast.Overheads`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

CARDS_CSV = Path(__file__).resolve().parent / "data" / "cards.csv"
DRIVER_SHARE = 139 / 141  # what CUDA reports of a card's nominal memory: the project's H200 (141 GB, ~139 GiB)


@dataclass(frozen=True)
class Card:
    key: str
    name: str
    memory_gb: float  # as sold
    bf16_tflops: float  # dense, float32 accumulation
    tf32_tflops: float  # dense
    fp32_tflops: float  # without tensor cores
    bandwidth_gbs: float  # memory bandwidth, GB/s
    host_link_gbs: float  # PCIe to the host, GB/s each way
    source: str = ""
    note: str = ""


def read_cards(path: Path = CARDS_CSV) -> dict[str, Card]:
    with open(path, newline="") as f:
        return {r["key"]: Card(r["key"], r["name"], float(r["memory_gb"]), float(r["bf16_dense_tflops"]),
                               float(r["tf32_dense_tflops"]), float(r["fp32_tflops"]), float(r["bandwidth_gbs"]),
                               float(r["host_link_gbs"]), r["source"], r["note"]) for r in csv.DictReader(f)}


CARDS = read_cards()


def _plain(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def find_card(text: str) -> Card | None:
    """The card whose key `text` is, ignoring case and punctuation ('rtx4090', 'RTX-4090',
    'a100_80gb'), or None. A bare number is never a card: it is a size in GB (`positive_size`)."""
    return next((card for key, card in CARDS.items() if _plain(text) == _plain(key)), None)


# the words of a CUDA device name that identify each card (torch.cuda.get_device_name)
_NAME_WORDS = {"rtx3090": {"3090"}, "rtx4090": {"4090"}, "rtx5090": {"5090"}, "rtxa6000": {"a6000"}, "l4": {"l4"},
               "l40s": {"l40s"}, "a100-40gb": {"a100", "40gb"}, "a100-80gb": {"a100", "80gb"}, "h100": {"h100"},
               "h200": {"h200"}}


def card_for_device(name: str) -> Card | None:
    """The card of the table that a CUDA device name ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB')
    is, or None: not in the table, or another variant of it (PCIe and NVL Hoppers run slower clocks)."""
    words = set("".join(c if c.isalnum() else " " for c in name.lower()).split())
    if words & {"pcie", "nvl", "ti", "super", "laptop", "mobile"}:
        return None
    return next((CARDS[key] for key, needed in _NAME_WORDS.items() if needed <= words and key in CARDS), None)


def usable_gib(memory_gb: float, context_gib: float) -> float:
    """GiB a training step may use on a card sold as `memory_gb`: the binary size, less what CUDA
    does not report (`DRIVER_SHARE`) and less the CUDA context."""
    return memory_gb * DRIVER_SHARE - context_gib


def positive_size(text: str) -> float | None:
    """`text` as a finite memory size above 0, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None
