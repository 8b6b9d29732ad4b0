"""Exact rewrites of the decoder's full-resolution work, applied from outside the model.

SETR's time and memory go to the decoder's full-resolution tensors (bilinear upsampling and
its backward, 150 x 512 x 512 logits per head and their softmax), not to the encoder. Two
rewrites remove most of that without changing the result:

- **Classifier before the last upsample** (`apply_classifier_first`). A 1x1 classifier and
  bilinear upsampling are both linear and bilinear weights sum to one, so they commute:
  classify at the lower resolution and upsample `num_classes` channels instead of 256. The
  parameters are untouched (checkpoints load either way); logits agree to rounding.
- **Upsample fused into the cross-entropy** (`upsample_cross_entropy`). The loss reads the
  low-resolution logits, so full-resolution logits, their softmax and their gradient never
  exist for the whole image. Two implementations: Triton kernels (`fused_ce_triton`: per-pixel
  log-sum-exp in forward, a deterministic gather in backward) on CUDA, and bands of output rows
  in PyTorch elsewhere, each band interpolated as `A_h[rows] @ low @ A_w^T` with PyTorch's own
  bilinear weights (`bilinear_matrix`) and recomputed in backward.

A third, optional lever changes no memory but the backward of the heads' remaining bilinear
upsamples (`apply_matmul_upsample_backward`): two matrix products instead of PyTorch's
scatter with atomics, so their gradients no longer depend on the order atomics land in.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from setr_lowmem.compat import FakeTensor
from setr_lowmem.config import Config, LossConfig
from setr_lowmem.memory.registry import Lever, Technique
from setr_lowmem.model.heads import MLAHead, UpHead, Upsample, upsample
from setr_lowmem.model.loss import HeadLoss, seg_cross_entropy

log = logging.getLogger(__name__)


def apply_classifier_first(model: nn.Module) -> int:
    """Move each head's 1x1 classifier ahead of its last bilinear upsample; returns the heads changed."""
    n = 0
    for module in model.modules():
        if isinstance(module, (UpHead, MLAHead)):
            module.classify_before_last_upsample = True
            n += 1
    log.info("classifier before the last upsample in %d heads", n)
    return n


def fused_upsample_cross_entropy(logits: torch.Tensor, scale: int, labels: torch.Tensor, cfg: LossConfig,
                                 backend: str = "auto") -> torch.Tensor:
    """A `HeadLoss` criterion: the head's last upsample done inside the cross-entropy
    (`upsample_cross_entropy`), so its full-resolution logits never exist."""
    if scale > 1 and (logits.shape[-2] * scale, logits.shape[-1] * scale) != tuple(labels.shape[-2:]):
        # the head's own last upsample does not end at the label's size: keep it, fuse the resize after
        logits = upsample(logits, scale)
    return upsample_cross_entropy(logits, labels, cfg.ignore_index, cfg.avg_non_ignore, backend=backend)


def apply_fused_upsample_loss(train_module: nn.Module, backend: str = "auto") -> int:
    """Give every head's loss the fused criterion (`backend`: 'triton', 'torch' or 'auto', see
    `upsample_cross_entropy`); returns how many."""
    units = [m for unit in train_module.head_losses for m in unit.modules() if isinstance(m, HeadLoss)]
    for unit in units:
        unit.criterion = functools.partial(fused_upsample_cross_entropy, backend=backend)
    log.info("upsample fused into the cross-entropy for %d heads (backend %s)", len(units), backend)
    return len(units)


def apply_decoder_rewrites(train_module: nn.Module, cfg) -> None:
    """The rewrites `cfg` (a MemoryConfig) asks for; the model's evaluation path gets the classifier order too."""
    if cfg.classifier_first:
        apply_classifier_first(train_module.model)
    if cfg.fused_upsample_loss:
        apply_fused_upsample_loss(train_module, cfg.fused_upsample_backend)
    if cfg.upsample_backward == "matmul":
        apply_matmul_upsample_backward(train_module.model)


def _source_rows(out_size: int, in_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's bilinear source index (align_corners False): rows y0, y1 and the weight of y1."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
    y0 = src.floor().long().clamp_max(in_size - 1)
    y1 = (y0 + 1).clamp_max(in_size - 1)
    return y0, y1, src - y0


@functools.lru_cache(maxsize=32)
def bilinear_matrix(out_size: int, in_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(out_size, in_size) matrix A with `A @ x` = 1-D bilinear resize of x along its rows, as
    `F.interpolate(..., mode="bilinear", align_corners=False)` weighs them. Two entries per row."""
    y0, y1, w1 = _source_rows(out_size, in_size, device)
    rows = torch.arange(out_size, device=device)
    a = torch.zeros(out_size, in_size, device=device, dtype=torch.float64)
    a.index_put_((rows, y0), 1 - w1, accumulate=True)
    a.index_put_((rows, y1), w1, accumulate=True)
    return a.to(dtype)


class _MatmulBackwardUpsample(torch.autograd.Function):
    """Bilinear upsampling whose backward is two matrix products, `A_h^T @ dY @ A_w`: deterministic,
    unlike the stock backward, which scatters each output gradient into the input with atomics."""

    @staticmethod
    def forward(ctx, x, size):
        ctx.in_size = tuple(x.shape[-2:])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad):
        (h_out, w_out), (h_in, w_in) = grad.shape[-2:], ctx.in_size
        a_h = bilinear_matrix(h_out, h_in, grad.device, grad.dtype)
        a_w = bilinear_matrix(w_out, w_in, grad.device, grad.dtype)
        return a_h.t() @ (grad @ a_w), None


def upsample_matmul_backward(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` with a deterministic backward."""
    return _MatmulBackwardUpsample.apply(x, tuple(size))


def apply_matmul_upsample_backward(model: nn.Module) -> int:
    """Give every bilinear `Upsample` module of the heads the matrix-product backward; returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, Upsample):
            module.resize = upsample_matmul_backward
            n += 1
    log.info("deterministic (matrix-product) backward for %d bilinear upsamples", n)
    return n


def _bands(h_out: int, h_in: int, rows_per_band: int) -> list[tuple[slice, slice]]:
    """(output rows, the input rows they read) for each band: plain arithmetic on the host (no device
    sync, and no tensors: it runs under fake tensors too). Source rows only grow with the output
    row, so a band reads from its first row's y0 to its last row's y1."""
    def source(i: int) -> tuple[int, int]:  # as _source_rows, in the same float64 arithmetic
        y0 = min(math.floor(max((i + 0.5) * (h_in / h_out) - 0.5, 0.0)), h_in - 1)
        return y0, min(y0 + 1, h_in - 1)

    bands = []
    for start in range(0, h_out, rows_per_band):
        end = min(start + rows_per_band, h_out)
        bands.append((slice(start, end), slice(source(start)[0], source(end - 1)[1] + 1)))
    return bands


def _band_loss(band: torch.Tensor, a: torch.Tensor, a_w: torch.Tensor, labels: torch.Tensor,
               ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy of one band of output rows, whose logits are `a @ band @ A_w^T` (`a`: the
    band's rows of A_h, restricted to the input rows it reads). Matrix products are deterministic
    in both directions."""
    logits = (a @ band) @ a_w.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax of 150 classes in bf16 loses the small ones
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


class _UpsampleCrossEntropy(torch.autograd.Function):
    """Saves only the low-resolution logits; backward recomputes each band and its gradient."""

    @staticmethod
    def forward(ctx, low, labels, ignore_index, denom, rows_per_band):
        h_out, w_out = labels.shape[-2:]
        a_h = bilinear_matrix(h_out, low.shape[2], low.device, low.dtype)
        a_w = bilinear_matrix(w_out, low.shape[3], low.device, low.dtype)
        total = torch.zeros((), device=low.device, dtype=torch.promote_types(low.dtype, torch.float32))
        for rows, used in _bands(h_out, low.shape[2], rows_per_band):
            total += _band_loss(low[:, :, used], a_h[rows, used], a_w, labels[:, rows], ignore_index)
        ctx.save_for_backward(low, labels, denom)
        ctx.args = (ignore_index, rows_per_band)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        low, labels, denom = ctx.saved_tensors
        ignore_index, rows_per_band = ctx.args
        h_out, w_out = labels.shape[-2:]
        a_h = bilinear_matrix(h_out, low.shape[2], low.device, low.dtype)
        a_w = bilinear_matrix(w_out, low.shape[3], low.device, low.dtype)
        grad = torch.zeros_like(low, dtype=torch.promote_types(low.dtype, torch.float32))
        for rows, used in _bands(h_out, low.shape[2], rows_per_band):
            with torch.enable_grad():
                band = low[:, :, used].detach().requires_grad_()
                loss = _band_loss(band, a_h[rows, used], a_w, labels[:, rows], ignore_index)
                (g,) = torch.autograd.grad(loss, band, grad_out / denom)
            grad[:, :, used] += g
        return grad.to(low.dtype), None, None, None, None


# Output pixels per image in one band: 64 rows of a 512-wide crop. Smaller bands hold less at
# once; larger ones launch fewer kernels.
BAND_PIXELS = 2**15


def triton_usable(low: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter (TRITON_INTERPRET=1); a
    fake tensor (the memory forecast) runs the operators' fake implementations, Triton or not."""
    if isinstance(low, FakeTensor):
        return True
    if importlib.util.find_spec("triton") is None:
        return False
    return low.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def upsample_cross_entropy(low: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                           avg_non_ignore: bool = False, band_pixels: int | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """`F.cross_entropy(F.interpolate(low, labels.shape[-2:], bilinear), labels)` with mmseg's reduction,
    without materialising the full-resolution logits.

    backend 'triton': the fused kernels of `fused_ce_triton`; 'torch': bands of about `band_pixels`
    output pixels per image, interpolated by matrix products; 'auto': Triton on a CUDA tensor where
    Triton is installed, else torch.
    """
    denom = (labels != ignore_index).sum().clamp_min(1) if avg_non_ignore else labels.new_tensor(labels.numel())
    denom = denom.to(torch.promote_types(low.dtype, torch.float32))
    if backend == "triton" or (backend == "auto" and low.is_cuda and triton_usable(low)):
        if not triton_usable(low):
            raise RuntimeError("memory.fused_upsample_backend is 'triton', but Triton is not installed or the "
                               "logits are not on a CUDA device (on the CPU, set TRITON_INTERPRET=1)")
        from setr_lowmem.memory.fused_ce_op import triton_upsample_cross_entropy

        return triton_upsample_cross_entropy(low, labels, ignore_index, denom.float()).to(denom.dtype)
    rows = max(1, math.ceil((band_pixels or BAND_PIXELS) / labels.shape[-1]))
    if rows >= labels.shape[-2]:  # one band is the whole image: the plain ops are the same and cheaper
        return seg_cross_entropy(low, labels, ignore_index, avg_non_ignore)
    return _UpsampleCrossEntropy.apply(low, labels, ignore_index, denom, rows)


# ---- the registry's entries -----------------------------------------------------------------
# The decoder's rewrites come first in `build_for_training`: they choose which operations exist
# (the classifier's place, the loss's criterion), which the techniques after them then wrap.

def _apply_classifier_first(train_module: nn.Module, cfg: Config, world: int, device: torch.device | None) -> None:
    if cfg.memory.classifier_first:
        apply_classifier_first(train_module.model)


def _apply_fused_loss(train_module: nn.Module, cfg: Config, world: int, device: torch.device | None) -> None:
    if cfg.memory.fused_upsample_loss:
        apply_fused_upsample_loss(train_module, cfg.memory.fused_upsample_backend)


def _apply_matmul_backward(train_module: nn.Module, cfg: Config, world: int, device: torch.device | None) -> None:
    if cfg.memory.upsample_backward == "matmul":
        apply_matmul_upsample_backward(train_module.model)


def _simulate_fused_loss(cfg: Config, cuda: bool) -> tuple[dict, str]:
    """The fake step runs the backend a GPU (`cuda`) or the CPU would pick for 'auto': the Triton
    operators through their fake implementations (`fused_ce_op`), or the PyTorch bands."""
    m = cfg.memory
    if not m.fused_upsample_loss:
        return {}, ""
    triton = m.fused_upsample_backend == "triton" or (cuda and m.fused_upsample_backend == "auto")
    return {"memory.fused_upsample_backend": "triton" if triton else "torch"}, "fused loss: " + (
        "the Triton operators' fake kernels (same outputs and temporaries)" if triton else "PyTorch bands")


TECHNIQUES = [
    Technique("classifier before the last upsample", keys=("memory.classifier_first",), order=10,
              apply=_apply_classifier_first, off={"memory.classifier_first": False},
              levers=(Lever(5, "classifier first", {"memory.classifier_first": True}),),
              perf={"memory.classifier_first": (True, True)}),
    Technique("upsample fused into the loss", keys=("memory.fused_upsample_loss", "memory.fused_upsample_backend"),
              order=11, apply=_apply_fused_loss, simulate=_simulate_fused_loss,
              off={"memory.fused_upsample_loss": False},
              levers=(Lever(6, "fused upsample+CE", {"memory.fused_upsample_loss": True,
                                                     "memory.fused_upsample_backend": "torch"}),
                      Lever(7, "Triton fused loss", {"memory.fused_upsample_backend": "triton"}, gpu_only=True)),
              perf={"memory.fused_upsample_loss": (True, False), "memory.fused_upsample_backend": ("auto", None)}),
    Technique("matrix-product upsample backward", keys=("memory.upsample_backward",), order=12,
              apply=_apply_matmul_backward,
              levers=(Lever(8, "matmul upsample bwd", {"memory.upsample_backward": "matmul"}),),
              perf={"memory.upsample_backward": ("matmul", "stock")}),
]
