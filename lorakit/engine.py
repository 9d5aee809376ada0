"""Apply planned ops to one logical base tensor, for the merge, patch and check paths alike.

A logical tensor is what the key maps address: a tensor of the single-file layout. In a merge or
a single-file state dict it is one real tensor; in a diffusers layout it can be several (Flux
``to_q`` / ``to_k`` / ``to_v`` are the row blocks of BFL ``qkv``; ``norm_out.linear`` is
``adaLN_modulation.1`` with its halves swapped). A ``Part`` is one real tensor holding a ``Block``
of the logical rows, with the codec it is stored in.

Plain low-rank ops become ``ops.Update`` segments (one per LoRA and part, grouped into one kernel
launch on CUDA); every other adapter runs on an fp32 copy of the logical tensor, encoded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters.base import Adapter
from .arch.spec import Block
from .codecs import Codec
from .ops import Segment, Update, as_matrix
from .planner import Op

# elements per chunk of fp32 work when encoding whole tensors (bounds the temporaries)
ROUND_CHUNK_ELEMENTS = 1 << 22


@dataclass
class Part:
    """Real tensor ``tensor`` (stored as ``codec``) holds logical rows ``block.rows``."""

    block: Block
    tensor: torch.Tensor
    codec: Codec
    # the row of the real tensor ``tensor`` starts at, when it is a row piece of a streamed tensor
    # (the stochastic counter counts from there)
    first_row: int = 0

    @property
    def key(self) -> str:
        return self.block.key


def whole(key: str, tensor: torch.Tensor, codec: Codec) -> list[Part]:
    return [Part(Block(key, (0, tensor.shape[0] if tensor.dim() else 1)), tensor, codec)]


def piece(key: str, tensor: torch.Tensor, codec: Codec, first_row: int) -> list[Part]:
    """Rows ``first_row ...`` of a tensor, held by ``tensor`` (its rows alone): a piece of a streamed
    tensor, patched as the whole tensor would be (plain low-rank ops only)."""
    return [Part(Block(key, (first_row, first_row + tensor.shape[0])), tensor, codec, first_row)]


def lowrank_segments(ops: list[Op]) -> list[Segment] | None:
    """One segment per op (rows: logical rows, None for the whole tensor) when every op is a plain
    low-rank weight update; else None."""
    out = []
    for op in ops:
        a = op.adapter
        lr = a.lowrank() if op.part == "weight" and op.target.transform is None and a.dora_scale is None else None
        if lr is None or type(a).apply_ is not Adapter.apply_:
            return None
        out.append(Segment(as_matrix(lr[0]), as_matrix(lr[1]), op.scale, op.target.rows))
    return out


def updates(parts: list[Part], ops: list[Op]) -> list[tuple[Update, list[Op]]] | None:
    """The ops as one ``Update`` per real tensor, each with the op behind each of its segments; or
    None when some op is not plain low-rank.

    Ops at strength 0 stay as segments of scale 0 (skipped by the primitive), so a patch handle
    can raise their strength later."""
    segs = lowrank_segments(ops)
    if segs is None:
        return None
    by_key: dict[str, tuple[Update, list[Op]]] = {}
    for p in parts:
        lo_p, hi_p = p.block.rows
        for seg, op in zip(segs, ops):
            a, b = seg.rows or (0, seg.up.shape[0])
            lo, hi = max(a, lo_p), min(b, hi_p)
            if lo >= hi:
                continue
            cols = as_matrix(p.tensor).shape[1] if p.tensor.dim() else 1
            u, tags = by_key.setdefault(p.key, (Update(p.tensor, [], p.key, p.codec, index_base=p.first_row * cols),
                                                []))
            shift = p.block.offset - lo_p
            u.segments.append(Segment(seg.up[lo - a:hi - a], seg.down, seg.scale, (lo + shift, hi + shift)))
            tags.append(op)
    return list(by_key.values())


def apply_ops(w32: torch.Tensor, ops: list[Op]) -> None:
    """Every op in order on the fp32 logical tensor ``w32`` (in place, unrounded)."""
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


def reference(w32: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """base + the LoRAs' change, fp32, unrounded: lorakit's reference for one tensor."""
    ref = w32.clone()
    apply_ops(ref, ops)
    return ref


def patch_generic_(parts: list[Part], ops: list[Op], *, rounding: str, seed: int, device: torch.device) -> int:
    """fp32 copy of the logical tensor on ``device``, every op, one encoding back into each part.

    Returns the number of elements the storage could not hold (``Update.out_of_range``)."""
    first = parts[0].tensor
    n = max(p.block.rows[1] for p in parts)
    w32 = torch.empty((n,) + tuple(first.shape[1:]), dtype=torch.float32, device=device)
    for p in parts:
        r0, r1 = p.block.rows
        w32[r0:r1] = p.codec.decode(p.tensor[p.block.offset:p.block.offset + r1 - r0].to(device))
    orig = w32.clone() if any(p.codec.coarse for p in parts) else w32  # only coarse formats look at it again
    apply_ops(w32, ops)
    out_of_range = 0
    for p in parts:
        cols = as_matrix(p.tensor).shape[1] if p.tensor.dim() else 1
        step = max(1, ROUND_CHUNK_ELEMENTS // max(cols, 1))  # bounds the encoding temporaries
        lo, hi = p.block.rows
        for r0 in range(lo, hi, step):
            r1 = min(hi, r0 + step)
            real = p.block.offset + r0 - lo
            dst = p.tensor[real:real + r1 - r0]
            out_of_range += p.codec.encode_(dst, w32[r0:r1].to(dst.device), orig[r0:r1].to(dst.device),
                                         rounding=rounding, seed=seed, key=p.key, index_offset=real * cols)
    return out_of_range


def own_merge(key: str, stored: torch.Tensor, codec: Codec, ops: list[Op], rounding: str, seed: int) -> torch.Tensor:
    """lorakit's merge of one stored tensor, in its storage (what ``lorakit merge`` writes)."""
    t = stored.clone()
    patch_generic_(whole(key, t, codec), ops, rounding=rounding, seed=seed, device=torch.device("cpu"))
    return t
