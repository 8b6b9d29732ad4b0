"""The optimizer: the paper's SGD or AdamW, 32-bit (torch) or 8-bit (bitsandbytes), head lr x10.

Parameter groups follow mmseg's `paramwise_cfg=dict(custom_keys={'head': lr_mult=10})`:
decode and aux head parameters get `lr * head_lr_mult`; the encoder (and MLA's neck, whose
names do not contain 'head') keep the base lr. With AdamW and weight decay, biases and
norm weights get no decay.

8-bit states (bitsandbytes' SGD8bit / AdamW8bit) keep momentum (and the second moment)
block-wise quantised to one byte per value instead of four. bitsandbytes itself keeps
tensors under `min_8bit_size` (4096 values: every bias and norm weight here) in 32-bit.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from setr_lowmem.config import OptimConfig
from setr_lowmem.memory.checkpointing import WRAPPER
from setr_lowmem.model.setr import is_head_parameter

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Encoder/neck and head parameters; with AdamW, 1-D parameters (biases, norms) get no decay."""
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = is_head_parameter(name.replace(WRAPPER, ""))
        no_decay = cfg.name == "adamw" and p.ndim <= 1
        groups.setdefault((is_head, no_decay), []).append(p)
    return [{"params": params, "lr": cfg.lr * (cfg.head_lr_mult if is_head else 1.0),
             "weight_decay": 0.0 if no_decay else cfg.weight_decay,
             "name": ("head" if is_head else "encoder") + ("_no_decay" if no_decay else "")}
            for (is_head, no_decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    extra = {"momentum": cfg.momentum} if cfg.name == "sgd" else {"betas": cfg.betas}
    opt = expected_optimizer_class(cfg)(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    sizes = ", ".join(f"{g['name']} {sum(p.numel() for p in g['params']) / 1e6:.2f}M at lr {g['lr']:g}"
                      for g in groups)
    log.info("optimizer %s (%d-bit states): %s", type(opt).__name__, cfg.bits, sizes)
    return opt


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held in optimizer state, split into 8-bit (uint8) and other tensors."""
    out = {"8bit": 0, "other": 0}
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                out["8bit" if v.dtype == torch.uint8 else "other"] += v.numel() * v.element_size()
    return out


def expected_optimizer_class(cfg: OptimConfig) -> type:
    """The optimizer class `cfg` names: torch's SGD/AdamW or bitsandbytes' 8-bit ones."""
    if cfg.bits == 8:
        import bitsandbytes as bnb

        return bnb.optim.SGD8bit if cfg.name == "sgd" else bnb.optim.AdamW8bit
    return torch.optim.SGD if cfg.name == "sgd" else torch.optim.AdamW
