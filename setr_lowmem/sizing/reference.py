"""What plain PyTorch SETR costs on a GPU, as measured: the reference the toolkit is checked against.

Source: `shared/reference-measurements.md` of this project (one NVIDIA H100 80GB, torch 2.11,
CUDA 13, 2026-11-24; plain PyTorch SETR-PUP with timm's ViT-L, SGD with momentum, random data;
peaks from `torch.cuda.max_memory_allocated/_reserved`). Each row is written as this toolkit's
configuration of the same step, so that the memory forecast can be compared with it
(`benchmarks/forecast_check.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from setr_lowmem.config import Config, benchmark_rows, load_config

# the reference's plain step in this toolkit's terms: the benchmark's baseline row, every lever off
PLAIN = benchmark_rows()[0][1]
BF16_SDPA = ["memory.precision=bf16", "memory.attention=sdpa"]
HEAD_LOSS = [*BF16_SDPA, "memory.checkpointing=full"]  # every block, and each head with its loss
CLASSIFIER = [*HEAD_LOSS, "memory.classifier_first=true"]
OFFLOAD = ["memory.deepspeed.stage=2", "memory.deepspeed.offload_optimizer=true"]


@dataclass(frozen=True)
class Row:
    label: str
    config: str  # "": no configuration of this toolkit runs the same step
    overrides: list[str]  # on top of PLAIN
    micro_batch: int
    allocated: float  # GiB, measured peak allocated
    reserved: float | None  # GiB, measured peak reserved (None: not given)
    expandable: bool = False  # measured with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    accumulation: int = 1

    def configured(self) -> Config:
        """This toolkit's configuration of the row's step (random initial weights)."""
        return load_config(self.config, [*PLAIN, *self.overrides, "model.pretrained=",
                                         f"train.micro_batch={self.micro_batch}",
                                         f"train.total_batch={self.micro_batch * self.accumulation}"])


ROWS = [
    Row("fp32, eager attention, no checkpointing", "pup_ade20k", [], 1, 8.42, 9.26),
    Row("fp32, eager attention, no checkpointing", "pup_ade20k", [], 2, 14.74, 15.91),
    Row("fp32, SDPA", "pup_ade20k", ["memory.attention=sdpa"], 2, 11.73, 12.87),
    Row("bf16 autocast, SDPA", "pup_ade20k", BF16_SDPA, 2, 8.50, 10.13),
    Row("bf16 autocast, SDPA", "pup_ade20k", BF16_SDPA, 8, 24.93, 31.44),
    Row("+ checkpoint every encoder block", "pup_ade20k", [*BF16_SDPA, "memory.checkpointing=blocks"], 8, 18.91, 25.11),
    Row("+ checkpoint every encoder block", "pup_ade20k", [*BF16_SDPA, "memory.checkpointing=blocks"], 16, 34.79, 45.94),
    # heads checkpointed apart from their loss: no such policy here (config ""), its ratio still counts
    Row("+ checkpoint blocks and heads", "", [], 16, 23.51, 34.18),
    Row("+ each head and its loss in one checkpoint", "pup_ade20k", HEAD_LOSS, 16, 16.39, 21.92),
    Row("same, expandable segments", "pup_ade20k", HEAD_LOSS, 16, 16.38, 18.23, expandable=True),
    Row("same + SGD8bit", "pup_ade20k", [*HEAD_LOSS, "optim.bits=8"], 16, 15.50, 17.33),
    Row("head-and-loss checkpointing + classifier first", "pup_ade20k", CLASSIFIER, 16, 13.22, 15.32),
    Row("classifier first, no checkpointing", "pup_ade20k", [*BF16_SDPA, "memory.classifier_first=true"], 16,
        43.50, 45.35),
    Row("head-and-loss + classifier first + SGD8bit", "pup_ade20k", [*CLASSIFIER, "optim.bits=8"], 8, 6.94, 8.15),
    Row("head-and-loss + classifier first + SGD8bit", "pup_ade20k", [*CLASSIFIER, "optim.bits=8"], 4, 4.33, 5.06),
    Row("head-and-loss + classifier first + SGD8bit", "pup_ade20k", [*CLASSIFIER, "optim.bits=8"], 2, 3.38, 4.24),
    Row("ZeRO-2, optimizer offloaded (torch SGD), bf16", "pup_ade20k", [*CLASSIFIER, *OFFLOAD], 16, 13.75, 13.77),
    Row("ZeRO-2 offload, CPU Adam, accumulation 2", "pup_ade20k",
        [*CLASSIFIER, *OFFLOAD, "optim.name=adamw", "optim.lr=0.0001"], 4, 3.94, 3.99, accumulation=2),
    Row("Cityscapes: fp32, eager, no checkpointing", "pup_cityscapes", [], 1, 17.74, None),
    Row("Cityscapes: bf16, SDPA, head-and-loss", "pup_cityscapes", HEAD_LOSS, 8, 13.64, 16.18),
    Row("Cityscapes: + classifier first", "pup_cityscapes", CLASSIFIER, 8, 7.78, 8.88),
]

# The ZeRO rows do not say which checkpointing they used; the rows above assume the reference's
# best plain configuration (head-and-loss checkpointing, classifier first).


def reserved_ratios(expandable: bool | None = None, deepspeed: bool = False) -> list[float]:
    """Measured peak reserved / peak allocated of the rows (DeepSpeed's or the others; with or
    without expandable segments, or both for None)."""
    return [r.reserved / r.allocated for r in ROWS if r.reserved is not None
            and (expandable is None or r.expandable == expandable)
            and any("deepspeed" in o for o in r.overrides) == deepspeed]
