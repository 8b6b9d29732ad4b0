"""The learning-rate schedule: mmseg's PolyLR per iteration, with an optional linear warmup.

    lr(t) = (base_lr - min_lr) * (1 - t / (T - 1)) ** power + min_lr,   t = 0 .. T - 1

for every parameter group with its own base lr (so heads decay from 10x the base lr to
the same floor). mmengine's PolyLR spans `end - begin - 1` steps, so the last iteration
(t = T - 1) is exactly at the floor; it computes the value recursively step by step
(`(lr - min) * (1 - 1 / (T - 1 - t + 1)) ** power + min`), whose product is this closed
form. Warmup multiplies by a factor rising linearly from `warmup_ratio` to 1.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from setr_lowmem.config import Config, ScheduleConfig
from setr_lowmem.memory.optim import group_settings


def poly_lr(t: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """The lr of a group with base `base_lr` at iteration `t`."""
    return _poly(t, base_lr, cfg.iters, cfg.power, cfg.min_lr, cfg.warmup_iters, cfg.warmup_ratio)


def _poly(t: int, base_lr: float, iters: int, power: float, min_lr: float, warmup_iters: int,
          warmup_ratio: float) -> float:
    span = iters - 1  # mmengine's total_iters: the decay ends on the last iteration
    t = min(t, span)
    lr = (base_lr - min_lr) * (1 - t / span) ** power + min_lr if span > 0 else base_lr
    if t < warmup_iters:
        lr *= warmup_ratio + (1 - warmup_ratio) * t / warmup_iters
    return lr


class _Factor:
    """lr factor of one group. Holds plain numbers only, so LambdaLR's state dict stays loadable
    with `torch.load(weights_only=True)`."""

    def __init__(self, base_lr: float, cfg: ScheduleConfig):
        self.args = (float(base_lr), int(cfg.iters), float(cfg.power), float(cfg.min_lr),
                     int(cfg.warmup_iters), float(cfg.warmup_ratio))

    def __call__(self, t: int) -> float:
        return _poly(t, *self.args) / self.args[0]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> LambdaLR:
    """A LambdaLR stepped once per iteration (after the optimizer step)."""
    return LambdaLR(optimizer, lr_lambda=[_Factor(g["lr"], cfg) for g in optimizer.param_groups])


def reapply_hyperparameters(scheduler: LambdaLR, cfg: Config) -> None:
    """Make a resumed run use `cfg`'s optimizer and schedule values (`--allow-change`): loading a
    checkpoint restores the saved ones into the optimizer's groups (lr, momentum, weight decay,
    betas) and into the schedule (each group's base lr and poly parameters). The lr of the current
    iteration is recomputed from the new values; the optimizer's state (momentum buffers) is kept."""
    o = cfg.optim
    for i, group in enumerate(scheduler.optimizer.param_groups):
        settings = group_settings(group.get("name", "encoder"), o)
        base = settings["lr"]
        group["weight_decay"] = settings["weight_decay"]
        if "momentum" in group:
            group["momentum"] = o.momentum
        if "betas" in group:
            group["betas"] = tuple(o.betas)
        factor = _Factor(base, cfg.schedule)
        scheduler.lr_lambdas[i] = factor
        scheduler.base_lrs[i] = group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
