"""Memory layout and kernel fusion for the decoder, applied from outside the model.

- **Channels-last** (`apply_channels_last`): the heads' and the neck's convolution weights in
  NHWC layout. The encoder's maps already arrive NHWC (timm reshapes tokens to N, H, W, C and
  permutes), so cuDNN runs the convolutions, BatchNorm and bilinear upsampling in NHWC without
  transposes, the layout its bf16 tensor-core kernels use. Under DeepSpeed ZeRO the weights are
  re-flattened by the engine and lose the layout; the activations keep it. With 8-bit optimizer
  states it is not applied (`_apply_channels_last`): bitsandbytes makes parameters contiguous at its
  first step, and a layout that changes after step 1 makes a resumed run convolve differently.
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
from setr_lowmem.config import Config
from setr_lowmem.memory.registry import Lever, Technique

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


# ---- the registry's entries -----------------------------------------------------------------
# Both come last in `build_for_training`: they act on the final modules' weights and code. The
# ZeRO rows of the benchmark turn both off (DeepSpeed refuses NHWC weights; its parameter hooks
# make Dynamo recompile the units).

def _apply_channels_last(train_module: nn.Module, cfg: Config, world: int, device: torch.device | None) -> None:
    if cfg.memory.channels_last and cfg.optim.bits == 8:
        # bitsandbytes makes every parameter contiguous at its first step: the weights would change
        # layout after step 1, and a resumed run (built channels-last) would convolve differently
        log.info("channels-last decoder weights: not applied with 8-bit optimizer states (bitsandbytes "
                 "keeps parameters contiguous); the convolutions' inputs stay channels-last")
    elif cfg.memory.channels_last:
        apply_channels_last(train_module.model)


def _apply_compiled_convs(train_module: nn.Module, cfg: Config, world: int, device: torch.device | None) -> None:
    if cfg.memory.compile_convs:
        apply_compiled_convs(train_module.model)


def _simulate_compiled_convs(cfg: Config, cuda: bool) -> tuple[dict, str]:
    """Fake tensors do not compile: the units run eagerly (fusion saves temporaries only)."""
    return {"memory.compile_convs": False}, ("compiled conv units: predicted as eager (fusion saves temporaries only)"
                                             if cfg.memory.compile_convs else "")


TECHNIQUES = [
    Technique("channels-last decoder", keys=("memory.channels_last",), order=60, apply=_apply_channels_last,
              levers=(Lever(9, "channels-last", {"memory.channels_last": True}),
                      Lever(12, "ZeRO-2 offload", {"memory.channels_last": False})),
              perf={"memory.channels_last": (True, False)}),
    Technique("compiled conv units", keys=("memory.compile_convs",), order=70, apply=_apply_compiled_convs,
              simulate=_simulate_compiled_convs,
              levers=(Lever(10, "compiled convs", {"memory.compile_convs": True}),
                      Lever(12, "ZeRO-2 offload", {"memory.compile_convs": False})),
              perf={"memory.compile_convs": (True, False)}),
]
