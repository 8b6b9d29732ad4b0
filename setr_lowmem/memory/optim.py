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
import math

import torch
from torch import nn

from setr_lowmem.config import Config, OptimConfig
from setr_lowmem.memory.checkpointing import WRAPPER
from setr_lowmem.memory.registry import Accounting, Lever, PlanChoice, StepCost, Technique
from setr_lowmem.model.setr import is_head_parameter
from setr_lowmem.sizing.meters import GIB

log = logging.getLogger(__name__)

BNB_MIN = 4096  # bitsandbytes keeps smaller tensors' states in 32 bits (its `min_8bit_size`)
BNB_BLOCK = 256  # values per float32 scale of a blockwise 8-bit state
# bytes per value read and written by one optimizer step, weights and gradients float32: SGD with
# momentum reads weight, gradient, momentum and writes weight, momentum; AdamW also its second moment
STEP_BYTES = {("sgd", 32): 20, ("adamw", 32): 28, ("sgd", 8): 14, ("adamw", 8): 16}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Encoder/neck and head parameters; with AdamW, 1-D parameters (biases, norms) get no decay."""
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = is_head_parameter(name.replace(WRAPPER, ""))
        no_decay = cfg.name == "adamw" and p.ndim <= 1
        groups.setdefault((is_head, no_decay), []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        name = ("head" if is_head else "encoder") + ("_no_decay" if no_decay else "")
        out.append({"params": params, "name": name, **group_settings(name, cfg)})
    return out


def group_settings(name: str, cfg: OptimConfig) -> dict:
    """The lr and weight decay of the parameter group `name` (`param_groups`' names: encoder or head,
    `_no_decay` for AdamW's biases and norms): what building and a deliberate change on resume set."""
    return {"lr": cfg.lr * (cfg.head_lr_mult if name.startswith("head") else 1.0),
            "weight_decay": 0.0 if name.endswith("_no_decay") else cfg.weight_decay}


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


# ---- the registry's entry -------------------------------------------------------------------
# 8-bit states take effect where the optimizer is built (`build_optimizer`, after the model's
# techniques). The forecast runs torch's 32-bit optimizer on fake tensors and accounts the 8-bit
# states from bitsandbytes' documented layout; with ZeRO's optimizer offload the states live on
# the host and nothing is accounted here.

def _simulate(cfg: Config, cuda: bool) -> tuple[dict, str]:
    return {"optim.bits": 32}, ("8-bit states: accounted (1 byte per value + a float32 scale per 256, tensors >= "
                                "4096 values)" if cfg.optim.bits == 8 else "")


def _account(cfg: Config, sizes: list[int], categories: dict[str, float], computed: dict[str, float]) -> float:
    """The 8-bit states in place of the fake step's 32-bit ones: per state, a uint8 per value, a
    float32 scale per block and a 256-entry float32 code book (tensors under `BNB_MIN`: 32-bit)."""
    if cfg.optim.bits != 8 or cfg.memory.deepspeed.offload_optimizer:
        return 0.0
    per_value = {"sgd": 1, "adamw": 2}[cfg.optim.name]
    eight = sum((n + math.ceil(n / BNB_BLOCK) * 4 + 1024) * per_value if n >= BNB_MIN
                else n * 4 * per_value for n in sizes) / GIB
    delta = eight - categories.get("optimizer", 0.0)
    categories["optimizer"] = eight
    return delta


def _speed(cfg: Config, sizes: list[int], accumulation: int) -> StepCost | None:
    """bitsandbytes steps each parameter with its own kernel, launched from Python."""
    ds = cfg.memory.deepspeed
    if cfg.optim.bits != 8 or (ds.stage and ds.offload_optimizer):
        return None
    name = cfg.optim.name
    return StepCost(optimizer=[("none", 0, n * STEP_BYTES[(name, 8 if n >= BNB_MIN else 32)]) for n in sizes],
                    python_steps=len(sizes))


TECHNIQUES = [Technique(
    "8-bit optimizer states", keys=("optim.bits",), order=55, takes_effect="the optimizer (build_optimizer)",
    simulate=_simulate, accounting=(Accounting(10, _account),), speed=_speed,
    off={"optim.bits": 32},
    levers=(Lever(11, "8-bit SGD", {"optim.bits": 8}), Lever(12, "ZeRO-2 offload", {"optim.bits": 32})),
    plan=PlanChoice(2, ({"optim.bits": 32}, {"optim.bits": 8}), label=lambda cfg: f"{cfg.optim.bits}-bit"),
)]
