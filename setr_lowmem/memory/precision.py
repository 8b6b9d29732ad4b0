"""Precision and attention kernel, applied from outside the model.

- ``fp32``: everything in float32.
- ``bf16``: `torch.autocast` to bfloat16 around forward (and the loss); weights, gradients
  and optimizer states stay float32. Matrix products and attention run in bf16; softmax
  cross-entropy and norms are autocast to float32 by PyTorch's own op lists.
- ``bf16_weights``: DeepSpeed keeps bf16 weights and gradients with float32 master copies
  in its optimizer partitions (configured in `memory.deepspeed`); inputs are cast to bf16.

The attention kernel is timm's switch: ``sdpa`` (PyTorch's fused scaled-dot-product
attention: flash or memory-efficient kernels that never store the N x N attention matrix)
or ``eager`` (the explicit softmax(QK^T)V of the original code).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from timm.layers import Attention
from torch import nn

from setr_lowmem.compat import BatchNormBase, SyncBatchNormFunction
from setr_lowmem.config import Config
from setr_lowmem.memory.registry import Accounting, Lever, Technique
from setr_lowmem.sizing.meters import GIB

log = logging.getLogger(__name__)


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A no-argument callable returning the forward context for `precision`."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def input_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16_weights" else torch.float32


def apply_attention_kernel(model: nn.Module, kind: str) -> int:
    """Switch every timm attention module to SDPA (`fused_attn=True`) or eager; returns the count."""
    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = kind == "sdpa"
            n += 1
    log.info("attention: %s in %d blocks", kind, n)
    return n


def _fp32_batch_norm(self: BatchNormBase, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm computed in float32 on a bf16 input with bf16 weights; the output keeps the input dtype."""
    weight, bias = self.weight.float(), self.bias.float()
    track = not self.training or self.track_running_stats  # as nn.BatchNorm: untracked stats stay untouched
    mean, var = (self.running_mean, self.running_var) if track else (None, None)
    momentum = self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(self.num_batches_tracked)
    momentum = 0.0 if momentum is None else momentum
    sync = (isinstance(self, nn.SyncBatchNorm) and self.training and torch.distributed.is_available()
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)
    if sync:
        group = self.process_group or torch.distributed.group.WORLD
        out = SyncBatchNormFunction.apply(x.float(), weight, bias, mean, var, self.eps, momentum,
                                    group, torch.distributed.get_world_size(group))
    else:
        out = torch.nn.functional.batch_norm(x.float(), mean, var, weight, bias, self.training or mean is None,
                                             momentum, self.eps)
    return out.to(x.dtype)


def apply_fp32_batchnorm(model: nn.Module) -> int:
    """Under bf16 weights (DeepSpeed casts every parameter, but keeps the fp32 running statistics),
    compute each BatchNorm in float32: bf16 statistics lose precision, and the kernels refuse a bf16
    weight next to fp32 running statistics. Returns the number of layers changed."""
    import types

    n = 0
    for module in model.modules():
        if isinstance(module, BatchNormBase) and module.affine and module.track_running_stats:
            module.forward = types.MethodType(_fp32_batch_norm, module)
            n += 1
    log.info("BatchNorm in float32 under bf16 weights: %d layers", n)
    return n


# ---- the registry's entries -----------------------------------------------------------------

def _apply_attention(train_module: nn.Module, cfg: Config, world: int, device: torch.device | None) -> None:
    apply_attention_kernel(train_module.model, cfg.memory.attention)


def _apply_precision(train_module: nn.Module, cfg: Config, world: int, device: torch.device | None) -> None:
    """bf16 autocast acts in the step (`autocast_factory`); bf16 weights are DeepSpeed's, with each
    BatchNorm kept in float32 here."""
    if cfg.memory.precision == "bf16_weights":
        apply_fp32_batchnorm(train_module.model)


def _simulate_precision(cfg: Config, cuda: bool) -> tuple[dict, str]:
    """bf16 weights need DeepSpeed, which the fake step does not run: it runs bf16 autocast."""
    if cfg.memory.precision != "bf16_weights":
        return {}, ""
    return {"memory.precision": "bf16"}, ("bf16 weights: run as bf16 autocast, weights and gradients accounted at "
                                          "2 bytes plus fp32 masters")


def _account_bf16_weights(cfg: Config, sizes: list[int], categories: dict[str, float],
                          computed: dict[str, float]) -> float:
    """Weights and gradients at 2 bytes a value, and (unless ZeRO offloads the optimizer) DeepSpeed's
    float32 master copies beside the optimizer states."""
    if cfg.memory.precision != "bf16_weights":
        return 0.0
    half = sum(sizes) * 2 / GIB
    masters = 0.0 if cfg.memory.deepspeed.offload_optimizer else 2 * half  # fp32 copies of the bf16 weights
    delta = (half - categories.get("params", 0.0)) + (half - categories.get("grads", 0.0)) + masters
    categories["params"], categories["grads"] = half, half
    categories["optimizer"] = categories.get("optimizer", 0.0) + masters
    return delta


# The attention kernel comes before activation checkpointing, so that recomputation replays the
# same kernel; it changes time and memory, not what is trained, so a run may resume with another.
# The BatchNorm precision of bf16 weights comes after checkpointing and SyncBN (it replaces the
# forward of the final BatchNorm modules); its accounting after ZeRO's offload (which decides
# where the master copies live) and before ZeRO-2's buffers (which are as wide as the weights).
TECHNIQUES = [
    Technique("attention kernel", keys=("memory.attention",), order=20, apply=_apply_attention,
              off={"memory.attention": "eager"}, levers=(Lever(2, "sdpa", {"memory.attention": "sdpa"}),),
              perf={"memory.attention": ("sdpa", "sdpa")}, resumable=("memory.attention",)),
    Technique("precision", keys=("memory.precision",), order=50, apply=_apply_precision,
              simulate=_simulate_precision, accounting=(Accounting(30, _account_bf16_weights),),
              off={"memory.precision": "fp32"}, levers=(Lever(1, "bf16", {"memory.precision": "bf16"}),),
              perf={"memory.precision": ("bf16", "bf16")}),
]
