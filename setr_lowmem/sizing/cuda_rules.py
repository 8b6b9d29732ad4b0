"""CUDA's autocast rules, applied to CPU tensors: the casts a GPU makes, for a step simulated on the CPU.

Autocast decides per operator which dtype it runs in, and the CPU's lists differ from CUDA's.
In bf16, a GPU runs bilinear upsampling, softmax, log-softmax, LayerNorm and a few reductions in
float32 (the CPU keeps them in bf16), and computes a cross-entropy's log-softmax in the input's
dtype before casting for the NLL (the CPU casts the logits to float32 first); it leaves a
concatenation of mixed dtypes to type promotion where the CPU's inserts a copy. For the decoder's
full-resolution tensors these rules decide several GiB at the paper's batch, so the memory
forecast (`setr_lowmem.sizing.forecast`) runs its fake CPU step under `cuda_rules()`.

The rules below are the ones where the two lists differ for the operators a SETR step calls;
`tests/test_forecast.py` checks them against CUDA's own autocast on fake CUDA tensors (the
forward runs there without a GPU; the backward does not, which is why the step runs on the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from setr_lowmem.compat import destroy_library, nll_loss_nd, tree_map, without_cpu_autocast

_LOW = (torch.bfloat16, torch.float16)

# operators CUDA's autocast runs in float32 and the CPU's leaves in the input's dtype
FP32 = ("upsample_bilinear2d", "upsample_bilinear2d.vec", "upsample_nearest2d", "upsample_nearest2d.vec",
        "layer_norm", "exp", "pow.Tensor_Scalar", "pow.Tensor_Tensor")
# operators the CPU's autocast casts to their widest input's dtype and CUDA's leaves to the
# operator's own type promotion (the same result, without the copies)
NATIVE = ("cat", "stack")
# operators CUDA's autocast runs in float32 unless a dtype is given (`fp32_set_opt_dtype`)
FP32_UNLESS_DTYPE = ("softmax.int", "log_softmax.int", "sum", "sum.dim_IntList")


def _up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in _LOW else x


def _fp32(op):
    def kernel(*args, **kwargs):
        args, kwargs = tree_map(_up, args), tree_map(_up, kwargs)
        with without_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


def _native(op):
    def kernel(*args, **kwargs):
        with without_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


def _fp32_unless_dtype(op):
    def kernel(*args, **kwargs):
        low = any(isinstance(a, torch.Tensor) and a.dtype in _LOW for a in args)
        given = kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args)
        if low and not given:
            kwargs = {**kwargs, "dtype": torch.float32}
        with without_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


def _cross_entropy(op):
    """CUDA has no rule for cross_entropy_loss: its decomposition runs, a log-softmax in the input's
    dtype, then the NLL, which autocast runs in float32."""
    def kernel(logits, target, weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0):
        if label_smoothing or target.is_floating_point():  # not what SETR calls: the CPU's rule
            with without_cpu_autocast():
                return op(_up(logits), target, _up(weight), reduction, ignore_index, label_smoothing)
        log_p = torch.log_softmax(logits, 1 if logits.dim() > 1 else 0, logits.dtype)
        return nll_loss_nd(log_p, target, weight, reduction, ignore_index)
    return kernel


@contextlib.contextmanager
def cuda_rules() -> Iterator[None]:
    """Within: CPU autocast casts as CUDA autocast would (the rules above replace the CPU's, for every
    thread of the process while the context is open)."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for name, make in [*((n, _fp32) for n in FP32), *((n, _fp32_unless_dtype) for n in FP32_UNLESS_DTYPE),
                           *((n, _native) for n in NATIVE),
                           ("cross_entropy_loss", _cross_entropy)]:
            packet, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.aten, packet), overload or "default")
            lib.impl(name, make(op), "AutocastCPU")
        yield
    finally:
        destroy_library(lib)
