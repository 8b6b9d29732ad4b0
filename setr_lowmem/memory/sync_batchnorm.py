"""BatchNorm statistics over the whole batch when several processes train (`train.sync_bn`).

Not a memory technique, but a change to the plain model that `build_for_training` makes among
them, so it has its place in the same order: after activation checkpointing (it replaces the
BatchNorm modules, and must reach those inside the checkpoint wrappers), before the BatchNorm
precision of bf16 weights (which acts on the modules it leaves). The paper's batch statistics are
over the whole batch of 16, so with several GPUs the BatchNorm layers are synchronised; on a CPU
(gloo) PyTorch's SyncBatchNorm does not run and each process keeps its own statistics.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from setr_lowmem.config import Config
from setr_lowmem.memory.registry import Technique

log = logging.getLogger(__name__)


def apply_sync_batchnorm(train_module: nn.Module, cfg: Config, world: int, device: torch.device | None) -> None:
    """Convert the model's BatchNorm layers to SyncBatchNorm when `world` > 1 processes train on GPUs."""
    if world <= 1 or not cfg.train.sync_bn:
        return
    if device is not None and device.type == "cuda":
        train_module.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(train_module.model)
        log.info("BatchNorm synchronised across %d processes", world)
    else:
        log.warning("train.sync_bn: SyncBatchNorm needs GPUs; BatchNorm statistics stay per process")


TECHNIQUES = [Technique("SyncBatchNorm across processes", keys=("train.sync_bn",), order=40,
                        apply=apply_sync_batchnorm)]
