"""Memory layout and kernel fusion for the decoder, applied from outside the model.

- **Channels-last** (`apply_channels_last`): the heads' and the neck's convolution weights in
  NHWC layout. The encoder's maps already arrive NHWC (timm reshapes tokens to N, H, W, C and
  permutes), so cuDNN runs the convolutions, BatchNorm and bilinear upsampling in NHWC without
  transposes, the layout its bf16 tensor-core kernels use. Under DeepSpeed ZeRO the weights are
  re-flattened by the engine and lose the layout; the activations keep it. With 8-bit optimizer
  states it is not applied (`engine.step`): bitsandbytes makes parameters contiguous at its first
  step, and a layout that changes after step 1 makes a resumed run convolve differently.
- **Compiled conv units** (`apply_compiled_convs`): each conv + BatchNorm + ReLU unit compiled by
  `torch.compile`, which fuses BatchNorm's normalisation and the ReLU into one elementwise
  kernel in forward and in backward (in bf16 under autocast) instead of separate full-size passes.
  Parameter and state-dict names are unchanged (`nn.Module.compile` compiles in place).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from setr_lowmem.compat import raise_recompile_limit

log = logging.getLogger(__name__)


def _decoder_modules(model: nn.Module) -> list[nn.Module]:
    """The neck (MLA) and every head."""
    return [m for m in [model.neck, *model.heads] if m is not None]


def apply_channels_last(model: nn.Module) -> int:
    """Convert the decoder's 4-D weights to channels-last; returns how many tensors changed."""
    n = 0
    for part in _decoder_modules(model):
        for p in part.parameters():
            if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                p.data = p.data.contiguous(memory_format=torch.channels_last)
                n += 1
    log.info("channels-last decoder: %d convolution weights converted", n)
    return n


def apply_compiled_convs(model: nn.Module) -> int:
    """`torch.compile` every conv + BatchNorm + ReLU unit of the decoder; returns how many."""
    from setr_lowmem.model.heads import ConvModule

    # All units share one code object (ConvModule.forward); every shape and dtype they meet (fp32
    # after a LayerNorm, bf16 after an upsample, per head and stage) is a variant counted
    # against one limit, past which Dynamo silently runs the rest eagerly.
    limit = raise_recompile_limit(64)
    n = 0
    for part in _decoder_modules(model):
        for module in part.modules():
            if isinstance(module, ConvModule):
                module.compile()
                n += 1
    log.info("torch.compile: %d conv+BatchNorm+ReLU units of the decoder (recompile limit %d)", n, limit)
    return n
