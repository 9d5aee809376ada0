"""Apply planned ops to one logical base tensor, for the merge and the patch paths alike.

A logical tensor is what the key maps address: a tensor of the single-file layout. In a merge or
a single-file state dict it is one real tensor; in a diffusers layout it can be several (Flux
``to_q`` / ``to_k`` / ``to_v`` are the row blocks of BFL ``qkv``; ``norm_out.linear`` is
``adaLN_modulation.1`` with its halves swapped). ``Part`` says which logical rows live where.

Plain low-rank ops become ``ops.Update`` segments (one per LoRA and part, grouped into one kernel
launch on CUDA); every other adapter runs on an fp32 copy of the logical tensor, rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters.base import Adapter
from .ops import ROUND_CHUNK_ELEMENTS, Segment, Update, as_matrix, is_fp8, round_into
from .plan import Op


@dataclass
class Part:
    """Logical rows ``rows`` of a logical tensor are real rows ``offset ...`` of ``tensor``."""

    key: str
    tensor: torch.Tensor
    rows: tuple[int, int]
    offset: int = 0


def whole(key: str, tensor: torch.Tensor) -> list[Part]:
    return [Part(key, tensor, (0, tensor.shape[0] if tensor.dim() else 1))]


def lowrank_segments(ops: list[Op]) -> list[tuple[int, int, torch.Tensor, torch.Tensor, float, Op]] | None:
    """(first row, end row, up, down, scale, op) for each op when all are plain low-rank weight updates."""
    out = []
    for op in ops:
        a = op.adapter
        lr = a.lowrank() if op.part == "weight" and op.target.transform is None and a.dora_scale is None else None
        if lr is None or type(a).apply_ is not Adapter.apply_:
            return None
        rows = op.target.rows or (0, lr[0].shape[0])
        out.append((rows[0], rows[1], as_matrix(lr[0]), as_matrix(lr[1]), op.strength * a.scale, op))
    return out


def updates(parts: list[Part], ops: list[Op], weight_scale: float | None = None) -> list[Update] | None:
    """The ops as one ``Update`` per real tensor, or None when some op is not plain low-rank.

    Ops at strength 0 stay as segments of scale 0 (skipped by the primitive), so a patch handle
    can raise their strength later; each segment is tagged with its op."""
    segs = lowrank_segments(ops)
    if segs is None:
        return None
    by_key: dict[str, Update] = {}
    for p in parts:
        for a, b, up, down, scale, op in segs:
            lo, hi = max(a, p.rows[0]), min(b, p.rows[1])
            if lo >= hi:
                continue
            u = by_key.setdefault(p.key, Update(p.tensor, [], p.key, weight_scale))
            shift = p.offset - p.rows[0]
            u.segments.append(Segment(up[lo - a:hi - a], down, scale, (lo + shift, hi + shift), op))
    return list(by_key.values())


def apply_ops(w32: torch.Tensor, ops: list[Op]) -> None:
    """Every op in order on the fp32 logical tensor ``w32`` (in place)."""
    for op in ops:
        if op.strength == 0.0:
            continue
        t = op.target
        view = w32 if t.rows is None else w32.narrow(0, t.rows[0], t.rows[1] - t.rows[0])
        if t.transform == "transpose":
            view = view.t()
        work = view
        if t.transform == "swap_halves":  # apply to the re-laid-out rows, then lay them back
            half = view.shape[0] // 2
            work = torch.cat([view[half:], view[:half]])
        if op.part == "weight":
            op.adapter.apply_(work, op.strength)
        else:
            work.add_(op.adapter.bias_delta().to(work.device).reshape(work.shape), alpha=op.strength)
        if work is not view:
            half = view.shape[0] // 2
            view[:half] = work[half:]
            view[half:] = work[:half]


def patch_generic_(parts: list[Part], ops: list[Op], *, weight_scale: float | None, rounding: str, seed: int,
                   device: torch.device) -> int:
    """fp32 copy of the logical tensor on ``device``, every op, one rounding back into each part.

    Returns the number of fp8 elements that saturated."""
    first = parts[0].tensor
    n = max(p.rows[1] for p in parts)
    w32 = torch.empty((n,) + tuple(first.shape[1:]), dtype=torch.float32, device=device)
    for p in parts:
        w32[p.rows[0]:p.rows[1]] = p.tensor[p.offset:p.offset + p.rows[1] - p.rows[0]].to(device)
    if weight_scale is not None:
        w32.mul_(weight_scale)
    orig = w32.clone() if is_fp8(first.dtype) else w32  # only fp8 rounding looks at the original
    apply_ops(w32, ops)
    saturated = 0
    for p in parts:
        cols = as_matrix(p.tensor).shape[1] if p.tensor.dim() else 1
        step = max(1, ROUND_CHUNK_ELEMENTS // max(cols, 1))  # bounds the rounding temporaries
        for r0 in range(p.rows[0], p.rows[1], step):
            r1 = min(p.rows[1], r0 + step)
            real = p.offset + r0 - p.rows[0]
            dst = p.tensor[real:real + r1 - r0]
            saturated += round_into(dst, w32[r0:r1].to(dst.device), orig[r0:r1].to(dst.device), rounding=rounding,
                                    seed=seed, key=p.key, index_offset=real * cols, scale=weight_scale)
    return saturated
