"""Compile kernel variants ahead of time for a GPU architecture, without a GPU (ptxas ships with
triton). Run as a script (the interpreter must be off): python tests/aot_compile.py 90 -> JSON."""

from __future__ import annotations

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorakit.kernels import launch_args
from lorakit.kernels.lowrank import grouped_lowrank_kernel

# (W kind, factor dtype, stochastic, scaled): every W kind, every factor path, both fp8 roundings
VARIANTS = [("fp16", torch.float16, False, False), ("bf16", torch.bfloat16, False, False),
            ("fp32", torch.float32, False, False), ("e4m3", torch.bfloat16, True, True),
            ("e5m2", torch.float16, False, False)]
POINTERS = {"tiles_ptr": "*i32", "layers_ptr": "*i64", "layer_scales_ptr": "*fp32", "segs_ptr": "*i64",
            "seg_scales_ptr": "*fp32", "out_of_range_ptr": "*i32"}
OPTIONS = ("num_warps", "enable_fp_fusion")


def compile_all(cc: int) -> list[dict]:
    names = list(grouped_lowrank_kernel.arg_names)
    out = []
    for kind, fdtype, stochastic, scaled in VARIANTS:
        args = launch_args(kind, fdtype, scaled=scaled, stochastic=stochastic, block=(64, 128), rank=32)
        const = {k: v for k, v in args.items() if k not in OPTIONS}
        sig = dict(POINTERS, **{k: "constexpr" for k in const})
        src = ASTSource(fn=grouped_lowrank_kernel, signature=sig,
                        constexprs={(names.index(k),): v for k, v in const.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                             options={k: args[k] for k in OPTIONS}).asm["ptx"]
        out.append({"kind": kind, "fdtype": str(fdtype), "fma_f32": "fma.rn.f32" in ptx, "mma": "mma" in ptx})
    return out


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]))))
