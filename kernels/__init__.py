"""Triton kernels, shipped as ``lorakit.kernels``; the torch reference they match is ``lorakit.ops``.

``grouped_update_(jobs, rounding=..., seed=...)`` is the launcher: it checks the jobs, builds the
layer / segment / tile tables and launches one kernel per (W dtype, factor dtype, scaled) group;
a whole model is usually one group, so one launch. No fallbacks here: ``lorakit.ops`` picks the
backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .lowrank import BF16, E4M3, E5M2, FP16, FP32, LAYER_COLS, SEG_COLS, grouped_lowrank_kernel

W_KINDS = {torch.float32: FP32, torch.float16: FP16, torch.bfloat16: BF16,
           torch.float8_e4m3fn: E4M3, torch.float8_e5m2: E5M2}
# dot operands: 16-bit factors go to the tensor cores as they are (their products are exact in the
# fp32 accumulator); fp32 factors use the three-pass TF32 split, close to fp32 products
F_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PRECISION = {torch.float16: "ieee", torch.bfloat16: "ieee", torch.float32: "tf32x3"}
BLOCK_M, BLOCK_N = 64, 128


@dataclass
class Job:
    """One weight, as a contiguous 2-D [rows, cols] tensor (conv weights flattened)."""

    w: torch.Tensor
    # (up [r1 - r0, rank], down [rank, cols], scale, (r0, r1)): one LoRA on rows r0..r1 of w
    segments: list[tuple[torch.Tensor, torch.Tensor, float, tuple[int, int]]]
    salt: int = 0  # mix32(seed ^ crc32(key)) for stochastic rounding
    weight_scale: float | None = None


def _factor_dtype(jobs: list[Job]) -> torch.dtype:
    dtypes = {t.dtype for j in jobs for up, down, _, _ in j.segments for t in (up, down)}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16) else torch.float32


def _check(job: Job) -> None:
    w = job.w
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"kernel jobs need a contiguous 2-D weight view, got shape {tuple(w.shape)}")
    if w.dtype not in W_KINDS:
        raise ValueError(f"no kernel for weight dtype {w.dtype}")
    for up, down, _, (r0, r1) in job.segments:
        if not (0 <= r0 <= r1 <= w.shape[0]) or up.shape[0] != r1 - r0 or down.shape[1] != w.shape[1] \
                or up.shape[1] != down.shape[0]:
            raise ValueError(f"factor shapes {tuple(up.shape)} @ {tuple(down.shape)} do not fit rows {r0}:{r1} of "
                             f"{tuple(w.shape)}")


def _block_k(jobs: list[Job]) -> int:
    rank = max(up.shape[1] for j in jobs for up, _, _, _ in j.segments)
    return max(16, min(64, triton.next_power_of_2(rank)))


def grouped_update_(jobs: list[Job], *, stochastic: bool, block: tuple[int, int] | None = None) -> list[int]:
    """Patch every job in place; returns the fp8 saturation count per job (0 for other dtypes)."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        _check(job)
        if job.segments and job.w.numel():
            groups.setdefault((job.w.dtype, job.weight_scale is not None), []).append(i)
    saturated = [0] * len(jobs)
    for (wdtype, scaled), idx in groups.items():
        counts = _launch([jobs[i] for i in idx], wdtype, scaled, stochastic, block or (BLOCK_M, BLOCK_N))
        for i, c in zip(idx, counts):
            saturated[i] = c
    return saturated


def _launch(jobs: list[Job], wdtype: torch.dtype, scaled: bool, stochastic: bool, block: tuple[int, int]) -> list[int]:
    device = jobs[0].w.device
    fdtype = _factor_dtype(jobs)
    bm, bn = block
    layers, segs, seg_scales, layer_scales, tiles = [], [], [], [], []
    keep = []  # the cast factors must outlive the launch
    for li, job in enumerate(jobs):
        rows, cols = job.w.shape
        first = len(segs)
        for up, down, scale, (r0, r1) in job.segments:
            u = up.to(device=device, dtype=fdtype).contiguous()
            d = down.to(device=device, dtype=fdtype).contiguous()
            keep += [u, d]
            segs.append([u.data_ptr(), d.data_ptr(), up.shape[1], r0, r1])
            seg_scales.append(scale)
        layers.append([job.w.data_ptr(), rows, cols, first, len(segs), job.salt])
        layer_scales.append(job.weight_scale or 1.0)
        nm, nn = math.ceil(rows / bm), math.ceil(cols / bn)
        tiles.append(torch.stack(torch.meshgrid(torch.tensor([li]), torch.arange(nm), torch.arange(nn),
                                                indexing="ij"), -1).reshape(-1, 3))
    t_tiles = torch.cat(tiles).to(device=device, dtype=torch.int32).contiguous()
    t_layers = torch.tensor(layers, dtype=torch.int64, device=device).reshape(-1, LAYER_COLS)
    t_segs = torch.tensor(segs, dtype=torch.int64, device=device).reshape(-1, SEG_COLS)
    # scales are rounded to fp32 here exactly as the reference rounds them
    t_seg_scales = torch.tensor(seg_scales, dtype=torch.float32, device=device)
    t_layer_scales = torch.tensor(layer_scales, dtype=torch.float32, device=device)
    t_sat = torch.zeros(len(jobs), dtype=torch.int32, device=device)
    block_k = _block_k(jobs)
    grid = (t_tiles.shape[0],)
    grouped_lowrank_kernel[grid](
        t_tiles, t_layers, t_layer_scales, t_segs, t_seg_scales, t_sat,
        W_KIND=W_KINDS[wdtype], F_DTYPE=F_DTYPES[fdtype],
        HAS_WSCALE=scaled, STOCHASTIC=stochastic, PRECISION=PRECISION[fdtype],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, num_warps=8 if bm * bn >= 8192 else 4,
        enable_fp_fusion=False,
    )
    return [int(c) for c in t_sat.tolist()]
