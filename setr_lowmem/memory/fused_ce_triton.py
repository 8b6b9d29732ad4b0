"""Triton kernels for bilinear upsampling fused into the cross-entropy.

Forward reads the low-resolution logits, interpolates each output pixel's class scores on the
fly (PyTorch's bilinear weights, align_corners False), and keeps per pixel only the loss and
the log-sum-exp: full-resolution logits never exist. Backward writes the low-resolution
gradient directly and deterministically: each program owns a block of low-resolution pixels
and gathers the gradient of every output pixel that reads them (no atomics), recomputing the
interpolated scores and taking the softmax from the saved log-sum-exp.

This module imports Triton; `memory.decoder` imports it only when the Triton backend is used.
On a machine without a GPU, `TRITON_INTERPRET=1` (set before the first import) runs the same
kernels on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _source(o, scale, size_in):
    """PyTorch's bilinear source of output index `o`: (i0, i1, weight of i1)."""
    src = tl.maximum((o.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), size_in - 1)
    i1 = tl.minimum(i0 + 1, size_in - 1)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _reader(o, size_out, scale, size_in, i):
    """Output index `o` (possibly outside 0..size_out-1) as seen from input index `i`: the index
    clamped into range, its sources (i0, i1, weight of i1), and the weight it gives `i` (0 outside)."""
    inside = (o >= 0) & (o < size_out)
    o = tl.minimum(tl.maximum(o, 0), size_out - 1)
    i0, i1, frac = _source(o, scale, size_in)
    w = tl.where(i0 == i, 1.0 - frac, 0.0) + tl.where(i1 == i, frac, 0.0)
    return o, i0, i1, frac, tl.where(inside, w, 0.0)


@triton.jit
def _interpolate(base, c_off, mask, y0, y1, ly, x0, x1, lx, s_h, s_w):
    """Bilinear value of the classes at `c_off` for the pixels whose sources are (y0, y1, x0, x1)."""
    v00 = tl.load(base + (y0 * s_h + x0 * s_w)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + (y0 * s_h + x1 * s_w)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + (y1 * s_h + x0 * s_w)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + (y1 * s_h + x1 * s_w)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
    wy, wx = ly[:, None], lx[:, None]
    return (1.0 - wy) * ((1.0 - wx) * v00 + wx * v01) + wy * ((1.0 - wx) * v10 + wx * v11)


# The loop bounds (the class count in forward, the window in backward) are compile-time constants:
# Triton 3.6's interpreter, the one torch 2.11 pins, turns a runtime integer argument into a
# one-element array, and `range()` over it fails under numpy >= 2.4 ("only 0-dimensional arrays can
# be converted to Python scalars": triton-lang/triton#9171, fixed in 3.8). On a GPU each distinct
# value compiles once: one class count per run, one window per upsample scale.
@triton.jit
def _forward_kernel(low_ptr, label_ptr, loss_ptr, lse_ptr, C: tl.constexpr, H_in, W_in, H_out, W_out,
                    s_n, s_c, s_h, s_w, scale_h, scale_w, ignore_index,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H_out * W_out
    y0, y1, ly = _source(p // W_out, scale_h, H_in)
    x0, x1, lx = _source(p % W_out, scale_w, W_in)
    target = tl.load(label_ptr + n * H_out * W_out + p, mask=p_mask, other=ignore_index).to(tl.int32)
    base = low_ptr + n * s_n
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_P], tl.float32)
    picked = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        z = _interpolate(base, (c * s_c)[None, :], p_mask[:, None] & c_mask[None, :], y0, y1, ly, x0, x1, lx,
                         s_h, s_w)
        z = tl.where(c_mask[None, :], z, float("-inf"))  # padded classes add nothing to the softmax
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        picked += tl.sum(tl.where(c[None, :] == target[:, None], z, 0.0), axis=1)
    lse = m + tl.log(s)
    valid = p_mask & (target != ignore_index)
    tl.store(loss_ptr + n * H_out * W_out + p, tl.where(valid, lse - picked, 0.0), mask=p_mask)
    tl.store(lse_ptr + n * H_out * W_out + p, lse, mask=p_mask)


@triton.jit
def _backward_kernel(low_ptr, label_ptr, lse_ptr, gscale_ptr, grad_ptr, C, H_in, W_in, H_out, W_out,
                     s_n, s_c, s_h, s_w, scale_h, scale_w, ignore_index, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_mask = q < H_in * W_in
    c_mask = c < C
    iy, ix = q // W_in, q % W_in
    # the first output row/column that may read input row iy/column ix (one to spare for rounding)
    oy_first = tl.floor((iy.to(tl.float32) - 0.5) / scale_h - 0.5).to(tl.int32) - 1
    ox_first = tl.floor((ix.to(tl.float32) - 0.5) / scale_w - 0.5).to(tl.int32) - 1
    base = low_ptr + n * s_n
    c_off = (c * s_c)[None, :]
    g = tl.load(gscale_ptr)
    acc = tl.zeros([BLOCK_Q, BLOCK_C], tl.float32)
    for dy in range(WIN_H):
        oy, y0, y1, ly, wy = _reader(oy_first + dy, H_out, scale_h, H_in, iy)
        # The window has margins: rows (and below, columns) that no pixel of the block reads are skipped.
        if tl.max(wy, axis=0) > 0.0:
            for dx in range(WIN_W):
                ox, x0, x1, lx, wx = _reader(ox_first + dx, W_out, scale_w, W_in, ix)
                if tl.max(wx, axis=0) > 0.0:
                    acc += _gather_gradient(base, c_off, c, c_mask, q_mask, label_ptr, lse_ptr, g,
                                            n * H_out * W_out + oy * W_out + ox, wy * wx, ignore_index,
                                            y0, y1, ly, x0, x1, lx, s_h, s_w)
    out = grad_ptr + n * C * H_in * W_in + c[None, :] * H_in * W_in + q[:, None]
    tl.store(out, acc, mask=q_mask[:, None] & c_mask[None, :])


@triton.jit
def _gather_gradient(base, c_off, c, c_mask, q_mask, label_ptr, lse_ptr, g, p, w, ignore_index,
                     y0, y1, ly, x0, x1, lx, s_h, s_w):
    """Each block pixel's share `w` of the gradient at output pixel `p`: w * g * (softmax - one-hot)."""
    active = q_mask & (w != 0.0)
    target = tl.load(label_ptr + p, mask=active, other=ignore_index).to(tl.int32)
    valid = active & (target != ignore_index)
    lse = tl.load(lse_ptr + p, mask=valid, other=0.0)
    mask = valid[:, None] & c_mask[None, :]
    z = _interpolate(base, c_off, mask, y0, y1, ly, x0, x1, lx, s_h, s_w)
    d = tl.exp(z - lse[:, None]) - tl.where(c[None, :] == target[:, None], 1.0, 0.0)
    return tl.where(mask, d * (w * g)[:, None], 0.0)


# Tiles and warps: the largest that compile for sm_90 without spilling registers (checked by
# tests/test_decoder.py with Triton's own compiler and cuobjdump); not yet tuned by timing.
FORWARD = {"BLOCK_P": 128, "BLOCK_C": 16, "num_warps": 8}
BACKWARD = {"BLOCK_Q": 64, "BLOCK_C": 32, "num_warps": 8}
if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter's cost is per operation, not per element: fewer, larger programs run the
    # same code (every access is masked) in a fraction of the time.
    FORWARD = {**FORWARD, "BLOCK_P": 1024}
    BACKWARD = {**BACKWARD, "BLOCK_Q": 512}


def _window(scale: float) -> int:
    """Output rows that can read one input row, with the margins `oy_first` leaves: enough for any scale."""
    return math.ceil(2.0 / scale) + 3


def forward(low: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss of `low` upsampled to `labels`' size, as float32; log-sum-exp per output pixel)."""
    n, c, h_in, w_in = low.shape
    h_out, w_out = labels.shape[-2:]
    loss = torch.empty((n, h_out * w_out), device=low.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    grid = (n, triton.cdiv(h_out * w_out, FORWARD["BLOCK_P"]))
    _forward_kernel[grid](low, labels, loss, lse, c, h_in, w_in, h_out, w_out, *low.stride(), h_in / h_out,
                          w_in / w_out, ignore_index, **FORWARD)
    return loss.sum(), lse


def backward(low: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, gscale: torch.Tensor,
             ignore_index: int) -> torch.Tensor:
    """The float32 gradient of `gscale` x the summed loss with respect to `low`."""
    n, c, h_in, w_in = low.shape
    h_out, w_out = labels.shape[-2:]
    scale_h, scale_w = h_in / h_out, w_in / w_out
    grad = torch.empty((n, c, h_in, w_in), device=low.device, dtype=torch.float32)
    grid = (n, triton.cdiv(h_in * w_in, BACKWARD["BLOCK_Q"]), triton.cdiv(c, BACKWARD["BLOCK_C"]))
    _backward_kernel[grid](low, labels, lse, gscale, grad, c, h_in, w_in, h_out, w_out, *low.stride(),
                           scale_h, scale_w, ignore_index, _window(scale_h), _window(scale_w), **BACKWARD)
    return grad
