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
from torch import nn

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
        if hasattr(module, "fused_attn") and hasattr(module, "qkv"):
            module.fused_attn = kind == "sdpa"
            n += 1
    log.info("attention: %s in %d blocks", kind, n)
    return n
