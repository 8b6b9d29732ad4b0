"""What a real DeepSpeed ZeRO-2 engine (CPU accelerator) holds at the end of a backward, printed as
JSON: its gradient bucket, the offload buffer or flat gradient partition, the fp32 master copy (bytes),
and the trained parameters' sizes. Run in its own process by tests/test_forecast.py: DeepSpeed's
process group and rendezvous variables outlive an engine, and would reach later tests.

    python tests/zero2_buffers.py          # with and without optimizer offload
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.cli import prepare_environment

prepare_environment()
from setr_lowmem.config import with_overrides
from setr_lowmem.sizing.measure import build_step
from tests.conftest import tiny_config


def held(offload: bool) -> dict:
    over = ["memory.deepspeed.stage=2"] + (["memory.deepspeed.offload_optimizer=true"] if offload else [])
    step = build_step(with_overrides(tiny_config("pup"), over), torch.device("cpu"))
    zero = step.optimizer
    while not type(zero).__name__.startswith("DeepSpeedZero"):
        zero = zero.optimizer
    seen: dict[str, int] = {}
    release = zero._release_ipg_buffers  # the backward's last act: observed, then done as it was

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    def observed():
        bucket = [t for b in zero.ipg_buckets.values() for t in b.buffer]
        gradients = zero.temp_grad_buffer_for_gpu_offload if offload else zero.grads_in_partition
        seen.update(bucket=nbytes(bucket), buckets=len(bucket), gradients=nbytes([gradients]),
                    masters=0 if offload else nbytes(zero.single_partition_of_fp32_groups))
        release()

    zero._release_ipg_buffers = observed
    step()
    step()
    seen["sizes"] = [p.numel() for p in step.module.parameters() if p.requires_grad]
    step.close()
    return seen


if __name__ == "__main__":
    print(json.dumps({"offload": held(True), "no-offload": held(False)}))
