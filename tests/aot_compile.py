"""Compile kernel variants ahead of time for a GPU architecture, without a GPU (ptxas ships with
triton). Run as a script (the interpreter must be off): python tests/aot_compile.py 90 -> JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.lowrank import BF16, E4M3, E5M2, FP8_FORMATS, FP16, FP32, grouped_lowrank_kernel  # noqa: E402

# (W kind, factor dtype, stochastic, scaled): every W kind, every factor path, both fp8 roundings
VARIANTS = [(FP16, tl.float16, False, False), (BF16, tl.bfloat16, False, False), (FP32, tl.float32, False, False),
            (E4M3, tl.bfloat16, True, True), (E5M2, tl.float16, False, False)]
POINTERS = {"tiles_ptr": "*i32", "layers_ptr": "*i64", "layer_scales_ptr": "*fp32", "segs_ptr": "*i64",
            "seg_scales_ptr": "*fp32", "saturated_ptr": "*i32"}


def compile_all(cc: int) -> list[dict]:
    names = list(grouped_lowrank_kernel.arg_names)
    out = []
    for kind, fdtype, stochastic, scaled in VARIANTS:
        bias, mbits, top = FP8_FORMATS.get(kind, (0, 0, 0.0))
        const = dict(W_KIND=kind, FP8_BIAS=bias, FP8_MBITS=mbits, FP8_MAX=top, F_DTYPE=fdtype, HAS_WSCALE=scaled,
                     STOCHASTIC=stochastic, PRECISION="tf32x3" if fdtype == tl.float32 else "tf32",
                     BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)
        sig = dict(POINTERS, **{k: "constexpr" for k in const})
        src = ASTSource(fn=grouped_lowrank_kernel, signature=sig,
                        constexprs={(names.index(k),): v for k, v in const.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                             options=dict(num_warps=8, enable_fp_fusion=False)).asm["ptx"]
        out.append({"kind": kind, "fdtype": str(fdtype), "fma_f32": "fma.rn.f32" in ptx, "mma": "mma" in ptx})
    return out


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]))))
