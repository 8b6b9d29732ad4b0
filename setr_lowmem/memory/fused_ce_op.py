"""The Triton fused upsample + cross-entropy as PyTorch operators (`torch.library.custom_op`).

As registered operators, the kernels get a fake implementation (the same output shapes and the
same temporaries, no arithmetic), which is what lets the memory forecast (`setr_lowmem.sizing.forecast`)
run a step that uses them on fake tensors, and they stay opaque to `torch.compile`. Triton is
imported when a kernel first runs, not here.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("setr_lowmem::upsample_ce_forward", mutates_args=())
def upsample_ce_forward(low: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of `low` bilinearly upsampled to `labels`' size, float32; log-sum-exp per pixel)."""
    from setr_lowmem.memory import fused_ce_triton

    return fused_ce_triton.forward(low, labels.contiguous(), ignore_index)


@upsample_ce_forward.register_fake
def _(low, labels, ignore_index):
    n, h_out, w_out = low.shape[0], *labels.shape[-2:]
    loss = low.new_empty((n, h_out * w_out), dtype=torch.float32)  # the per-pixel losses, summed and freed
    return loss.sum(), torch.empty_like(loss)


@torch.library.custom_op("setr_lowmem::upsample_ce_backward", mutates_args=())
def upsample_ce_backward(low: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, gscale: torch.Tensor,
                         ignore_index: int) -> torch.Tensor:
    """The float32 gradient of `gscale` x the summed loss with respect to `low`."""
    from setr_lowmem.memory import fused_ce_triton

    return fused_ce_triton.backward(low, labels.contiguous(), lse, gscale, ignore_index)


@upsample_ce_backward.register_fake
def _(low, labels, lse, gscale, ignore_index):
    return torch.empty(low.shape, dtype=torch.float32, device=low.device)


def _setup_context(ctx, inputs, output) -> None:
    low, labels, ignore_index = inputs
    ctx.save_for_backward(low, labels, output[1])  # the low-resolution logits and one float per pixel
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient of a float per pixel for the log-sum-exp


def _backward(ctx, grad_total, _grad_lse):
    low, labels, lse = ctx.saved_tensors
    grad = upsample_ce_backward(low, labels, lse, grad_total.float().reshape(1), ctx.ignore_index)
    return grad.to(low.dtype), None, None


upsample_ce_forward.register_autograd(_backward, setup_context=_setup_context)


def triton_upsample_cross_entropy(low: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                                  denom: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `low` upsampled to `labels`' size, divided by `denom` (float32)."""
    total, _ = upsample_ce_forward(low, labels, ignore_index)
    return total / denom
