"""Activation checkpointing, applied from outside the model.

Checkpointing a module keeps only its inputs during forward and recomputes its inside
during backward: memory for compute. The policies, from cheapest to most thorough:

- ``blocks``: every k-th encoder block is wrapped in PyTorch's non-reentrant checkpoint
  wrapper; its attention matrix, MLP hidden activations and norms are recomputed.
- ``selective``: every block is wrapped, but through `torch.utils.checkpoint`'s selective
  policy the outputs of matrix products and attention are saved and only the cheap
  element-wise ops (norms, GELU, residual adds) are recomputed: most of the saving of
  ``blocks`` for a small part of its recompute.
- ``full``: every block, the MLA neck, and each decoder head *together with its loss*.
  A head's full-resolution tensors (its upsampled features, 150 x 512 x 512 logits and
  their softmax) then never stay alive between forward and backward: what this alone saved
  on an H100 is measured in docs/reference/h100_plain_pytorch.csv (the rows "checkpoint blocks
  and heads" and "each head and its loss in one checkpoint", SETR-PUP at batch 16).
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from setr_lowmem.compat import BatchNormBase, CheckpointImpl, checkpoint_wrapper
from setr_lowmem.config import Config, MemoryConfig
from setr_lowmem.memory.registry import Lever, PlanChoice, Technique
from setr_lowmem.model.loss import SegmentationLoss

log = logging.getLogger(__name__)

# What the checkpoint wrapper puts into parameter names (state dicts strip it again).
WRAPPER = "_checkpoint_wrapped_module."

_aten = torch.ops.aten
# Outputs worth keeping: the expensive ops of a transformer block.
SAVE_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: torch.nn.Module):
    """During recomputation BatchNorm must normalise exactly as before (the same ops, the same
    saved tensors) but not update its running statistics a second time: momentum 0 makes the
    update `running * 1 + batch * 0`, and the batch counter is put back afterwards."""
    norms = [m for m in module.modules() if isinstance(m, BatchNormBase)
             and m.track_running_stats and m.momentum is not None]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def _recomputing(selective_context, module: torch.nn.Module):
    with selective_context, _frozen_batchnorm_stats(module):
        yield


def _contexts(module: torch.nn.Module, selective: bool):
    """(forward context, recomputation context) for torch.utils.checkpoint's `context_fn`."""
    if selective:
        forward, recompute = create_selective_checkpoint_contexts(_save_matmuls)
    else:
        forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
    return forward, _recomputing(recompute, module)


def _wrap(module: torch.nn.Module, selective: bool = False) -> torch.nn.Module:
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                              context_fn=partial(_contexts, module, selective))


def apply_activation_checkpointing(train_module: SegmentationLoss, cfg: MemoryConfig) -> dict[str, int]:
    """Wrap blocks / neck / head-with-loss units of `train_module` per `cfg.checkpointing`.

    Returns and logs what was wrapped. Parameter names gain `_checkpoint_wrapped_module.`;
    state dicts do not (the wrapper strips it), so checkpoints load either way.
    """
    policy = cfg.checkpointing
    done = {"blocks": 0, "neck": 0, "heads": 0}
    if policy == "none":
        log.info("activation checkpointing: none")
        return done
    model = train_module.model
    blocks = model.encoder.blocks
    every = cfg.every_k if policy == "blocks" else 1
    for i in range(len(blocks)):
        if i % every == every - 1:
            blocks[i] = _wrap(blocks[i], selective=policy == "selective")
            done["blocks"] += 1
    if policy == "full":
        if model.neck is not None:
            model.neck = _wrap(model.neck)
            done["neck"] = 1
        train_module.head_losses = [_wrap(unit) for unit in train_module.head_losses]
        done["heads"] = len(train_module.head_losses)
    what = {"blocks": f"every {every}th encoder block" if every > 1 else "every encoder block",
            "selective": "every encoder block, saving matmul and attention outputs",
            "full": "every encoder block, the neck and each head with its loss"}[policy]
    log.info("activation checkpointing %s: wrapped %s (%d blocks, %d neck, %d head+loss units)",
             policy, what, done["blocks"], done["neck"], done["heads"])
    return done



# The policies from the fastest (nothing recomputed) to the most frugal: the planner's order.
POLICIES = ("none", "selective", "blocks", "full")


def _apply(train_module: SegmentationLoss, cfg: Config, world: int, device: torch.device | None) -> None:
    apply_activation_checkpointing(train_module, cfg.memory)


# After the attention kernel (recomputation replays the kernel chosen), before SyncBN and the
# BatchNorm precision (they replace modules or their forward, and must reach inside the wrappers).
# The forecast computes it: its fake step recomputes as training does. Changing it on resume
# changes memory and time, not what is trained.
TECHNIQUES = [Technique(
    "activation checkpointing", keys=("memory.checkpointing", "memory.every_k"), order=30, apply=_apply,
    off={"memory.checkpointing": "none"},
    levers=(Lever(3, "blocks", {"memory.checkpointing": "blocks", "memory.every_k": 1}),
            Lever(4, "head+loss", {"memory.checkpointing": "full"})),
    plan=PlanChoice(1, tuple({"memory.checkpointing": p, "memory.every_k": 1} for p in POLICIES),
                    label=lambda cfg: f"checkpointing {cfg.memory.checkpointing}"),
    resumable=("memory.checkpointing", "memory.every_k"),
)]
