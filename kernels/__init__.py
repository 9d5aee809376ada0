"""Triton kernels, shipped as ``lorakit.kernels``; the torch reference they match is ``lorakit.ops``.

``GroupedLaunch(jobs, stochastic=...)`` is the launcher: it checks the jobs, builds the layer /
segment / tile tables once per (W kind, scaled) group and launches one kernel per group on every
``run()`` (a whole model is usually one group, so one launch); ``set_scales`` rewrites only the scale
table. The factors of a group share one dtype: fp16 or bf16 when all are, else fp32 (TF32x3).
``grouped_update_`` is the one-shot form. No fallbacks here: ``lorakit.ops`` picks the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .lowrank import FP8_FORMATS, KINDS, LAYER_COLS, SEG_COLS, TILE_COLS, grouped_lowrank_kernel

# the element dtype each W kind is stored in
STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn,
           "e5m2": torch.float8_e5m2}
# dot operands: 16-bit factors go to the tensor cores as they are (their products are exact in the
# fp32 accumulator); fp32 factors use the three-pass TF32 split, close to fp32 products
F_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PRECISION = {torch.float16: "tf32", torch.bfloat16: "tf32", torch.float32: "tf32x3"}  # 16-bit: unused
BLOCK_M, BLOCK_N = 64, 128


@dataclass
class Job:
    """One weight, as a contiguous 2-D [rows, cols] tensor (conv weights flattened), stored as
    ``kind`` (a key of ``KINDS``), with its per-tensor scale when scaled."""

    w: torch.Tensor
    # (up [r1 - r0, rank], down [rank, cols], scale, (r0, r1)): one LoRA on rows r0..r1 of w
    segments: list[tuple[torch.Tensor, torch.Tensor, float, tuple[int, int]]]
    kind: str = "fp32"
    salt: int = 0  # mix32(seed ^ crc32(key)) for stochastic rounding
    weight_scale: float | None = None
    source: torch.Tensor | None = None  # read the original from here instead of w (re-patch from a backup)
    index_base: int = 0  # flat index of w's first element in the whole tensor (stochastic counter)


def launch_args(kind: str, factor_dtype: torch.dtype, *, scaled: bool, stochastic: bool, block: tuple[int, int],
                rank: int) -> dict:
    """The kernel's constexpr arguments and launch options for one group (shared by the launcher
    and the ahead-of-time compile test, so both build the same variant)."""
    code = KINDS[kind]
    bias, mbits, top = FP8_FORMATS.get(code, (0, 0, 0.0))
    bm, bn = block
    return dict(W_KIND=code, FP8_BIAS=bias, FP8_MBITS=mbits, FP8_MAX=top, F_DTYPE=F_DTYPES[factor_dtype],
                HAS_WSCALE=scaled, STOCHASTIC=stochastic, PRECISION=PRECISION[factor_dtype], BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_K=max(16, min(64, triton.next_power_of_2(rank))),
                num_warps=8 if bm * bn >= 8192 else 4, enable_fp_fusion=False)


def _factor_dtype(jobs: list[Job]) -> torch.dtype:
    dtypes = {t.dtype for j in jobs for up, down, _, _ in j.segments for t in (up, down)}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16) else torch.float32


def _check(job: Job) -> None:
    w = job.w
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"kernel jobs need a contiguous 2-D weight view, got shape {tuple(w.shape)}")
    if STORAGE.get(job.kind) != w.dtype:
        raise ValueError(f"no kernel for {job.kind!r} weights stored as {w.dtype}")
    src = job.source
    if src is not None and (src.shape != w.shape or src.dtype != w.dtype or src.device != w.device
                            or not src.is_contiguous()):
        raise ValueError("the source of a job must be a contiguous tensor like its weight, on the same device")
    for up, down, _, (r0, r1) in job.segments:
        if not (0 <= r0 <= r1 <= w.shape[0]) or up.shape[0] != r1 - r0 or down.shape[1] != w.shape[1] \
                or up.shape[1] != down.shape[0]:
            raise ValueError(f"factor shapes {tuple(up.shape)} @ {tuple(down.shape)} do not fit rows {r0}:{r1} of "
                             f"{tuple(w.shape)}")


class _Group:
    """The tables and launch arguments of one (W kind, scaled) group: built once, launched any
    number of times (a strength change only rewrites the scale table)."""

    def __init__(self, jobs: list[Job], stochastic: bool, block: tuple[int, int]) -> None:
        device = jobs[0].w.device
        fdtype = _factor_dtype(jobs)
        bm, bn = block
        layers, segs, seg_scales, layer_scales, tiles = [], [], [], [], []
        self.factors = []  # the cast factors must live as long as the tables point at them
        for li, job in enumerate(jobs):
            rows, cols = job.w.shape
            first = len(segs)
            for up, down, scale, (r0, r1) in job.segments:
                u = up.to(device=device, dtype=fdtype).contiguous()
                d = down.to(device=device, dtype=fdtype).contiguous()
                self.factors += [u, d]
                segs.append([u.data_ptr(), d.data_ptr(), up.shape[1], r0, r1])
                seg_scales.append(scale)
            src = job.w if job.source is None else job.source
            layers.append([job.w.data_ptr(), src.data_ptr(), rows, cols, first, len(segs), job.salt, job.index_base])
            layer_scales.append(job.weight_scale or 1.0)
            tiles.append(_tiles(li, job, bm, bn))
        self.tiles = torch.cat(tiles).to(device=device, dtype=torch.int32).contiguous()
        self.layers = torch.tensor(layers, dtype=torch.int64, device=device).reshape(-1, LAYER_COLS.value)
        self.segs = torch.tensor(segs, dtype=torch.int64, device=device).reshape(-1, SEG_COLS.value)
        # scales are rounded to fp32 here exactly as the reference rounds them
        self.seg_scales = torch.tensor(seg_scales, dtype=torch.float32, device=device)
        self.layer_scales = torch.tensor(layer_scales, dtype=torch.float32, device=device)
        self.out_of_range = torch.zeros(len(jobs), dtype=torch.int32, device=device)
        rank = max([up.shape[1] for j in jobs for up, _, _, _ in j.segments] + [1])
        self.args = launch_args(jobs[0].kind, fdtype, scaled=jobs[0].weight_scale is not None, stochastic=stochastic,
                                block=block, rank=rank)

    def launch(self) -> None:
        self.out_of_range.zero_()
        grouped_lowrank_kernel[(self.tiles.shape[0],)](self.tiles, self.layers, self.layer_scales, self.segs,
                                                      self.seg_scales, self.out_of_range, **self.args)


def _tiles(layer: int, job: Job, bm: int, bn: int) -> torch.Tensor:
    """(layer, tile row, tile column) rows for one job: every tile when re-patching from a source
    (it copies the untouched rows too), else only the tile rows some segment touches."""
    rows, cols = job.w.shape
    need = torch.zeros(math.ceil(rows / bm), dtype=torch.bool)
    if job.source is not None:
        need[:] = True
    for _, _, _, (r0, r1) in job.segments:
        if r0 < r1:
            need[r0 // bm:(r1 - 1) // bm + 1] = True
    grid = torch.cartesian_prod(need.nonzero().reshape(-1), torch.arange(math.ceil(cols / bn))).reshape(-1, 2)
    return torch.cat([torch.full((grid.shape[0], 1), layer), grid], 1).reshape(-1, TILE_COLS.value)


class GroupedLaunch:
    """Every job in one launch per (W kind, scaled) group; reusable (``run`` again, ``set_scales``)."""

    def __init__(self, jobs: list[Job], *, stochastic: bool, block: tuple[int, int] | None = None) -> None:
        by_group: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            _check(job)
            if job.segments and job.w.numel():
                by_group.setdefault((job.kind, job.weight_scale is not None), []).append(i)
        self.n = len(jobs)
        self.groups = [(idx, _Group([jobs[i] for i in idx], stochastic, block or (BLOCK_M, BLOCK_N)))
                       for idx in by_group.values()]

    def run(self) -> list[int]:
        """Launch; returns per job how many elements its storage could not hold (fp8: saturated;
        wider formats: inf / NaN)."""
        for _, g in self.groups:
            g.launch()
        out = [0] * self.n
        for idx, g in self.groups:
            for i, c in zip(idx, g.out_of_range.tolist()):
                out[i] = int(c)
        return out

    def set_scales(self, scales: list[list[float]]) -> None:
        """New per-segment scales (one list per job, in segment order) for the next ``run``."""
        for idx, g in self.groups:
            flat = [s for i in idx for s in scales[i]]
            g.seg_scales.copy_(torch.tensor(flat, dtype=torch.float32))


def grouped_update_(jobs: list[Job], *, stochastic: bool, block: tuple[int, int] | None = None) -> list[int]:
    """Patch every job in place (one launch per group); returns the out-of-range count per job."""
    return GroupedLaunch(jobs, stochastic=stochastic, block=block).run()
