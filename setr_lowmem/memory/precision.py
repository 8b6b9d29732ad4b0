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
