"""Compile the fused-loss kernels for an H100 (sm_90) with Triton's own compiler, no GPU needed, and
print each kernel's resource usage from cuobjdump. Run by tests/test_decoder.py in a process
without TRITON_INTERPRET; exits 1 if a kernel spills registers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from setr_lowmem.memory import fused_ce_triton as kernels


def resource_usage(fn, signature: dict, launch: dict) -> str:
    constexprs = {k: v for k, v in launch.items() if k != "num_warps"}
    source = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch["num_warps"]})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return next(line.strip() for line in out.splitlines() if "REG:" in line)


# The loop bounds are compile-time constants: ADE20K's 150 classes (the most registers), and the window
# of PUP's and MLA's last upsample (x4: 128 -> 512)
CLASSES, WINDOW = 150, kernels._window(128 / 512)


def main() -> int:
    sizes = dict.fromkeys(["H_in", "W_in", "H_out", "W_out", "s_n", "s_c", "s_h", "s_w"], "i32")
    common = {**sizes, "scale_h": "fp32", "scale_w": "fp32", "ignore_index": "i32"}
    spilled = False
    for dtype in ("bf16", "fp32"):
        forward = {"low_ptr": f"*{dtype}", "label_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", **common}
        backward = {"low_ptr": f"*{dtype}", "label_ptr": "*i64", "lse_ptr": "*fp32", "gscale_ptr": "*fp32",
                    "grad_ptr": "*fp32", "C": "i32", **common}
        for fn, signature, launch in ((kernels._forward_kernel, forward, {**kernels.FORWARD, "C": CLASSES}),
                                      (kernels._backward_kernel, backward,
                                       {**kernels.BACKWARD, "WIN_H": WINDOW, "WIN_W": WINDOW})):
            usage = resource_usage(fn, signature, launch)
            spill = "STACK:0 " not in usage + " "
            spilled |= spill
            print(f"{fn.__name__} {dtype} {launch}: {usage}" + (" (spills)" if spill else ""))
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
