"""The torch reference of the primitive: the spec every backend matches (see ``lorakit.ops``)."""

from __future__ import annotations

import math

import torch

from ..codecs import Codec
from ..codecs.rounding import count_nonfinite
from .types import Update, as_matrix

# elements per step of the reference: the product, its scaling and the add stay in cache (2 MB;
# measured fastest of 128K..1M elements on the dev VM)
COMPUTE_CHUNK_ELEMENTS = 1 << 19


def _prescaled(up: torch.Tensor, down: torch.Tensor, s32: torch.Tensor,
               dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp32 factors, and the scale still to apply to ``t`` (None when folded in exactly).

    A scale of 1 needs no multiply. A power-of-two scale can go into fp16 factors exactly: their
    products are exact in fp32 and every nonzero partial sum is a multiple of 2**-48, so with
    2**-78 < |s| < 2**60 nothing scaled reaches the subnormal or overflow range and
    ``up @ (s*down)`` is ``s * (up @ down)`` bit for bit, whatever the summation order. Saves one
    pass over every chunk."""
    up32, down32 = up.to(dev, torch.float32), down.to(dev, torch.float32)
    scale = float(s32)
    if scale == 1.0:
        return up32, down32, None
    mantissa, _ = math.frexp(scale)
    if abs(mantissa) == 0.5 and up.dtype == down.dtype == torch.float16 and 2.0 ** -78 < abs(scale) < 2.0 ** 60:
        return up32, down32 * scale, None
    return up32, down32, s32.to(dev)


def reference_update(u: Update, codec: Codec, rounding: str, seed: int) -> None:
    """``u`` in place, chunk by chunk: decode, add every segment, encode once."""
    view = as_matrix(u.w)
    if u.source is not None:
        view.copy_(as_matrix(u.source))
    rows, cols = view.shape
    dev = view.device
    # a segment whose fp32 scale is 0 is no update at all (adding 0 would turn -0.0 into +0.0)
    segs = [_prescaled(as_matrix(g.up), as_matrix(g.down), s32, dev) + (g.span(rows),) for g in u.segments
            if (s32 := torch.tensor(g.scale, dtype=torch.float32)) != 0]
    in_place = view.dtype == torch.float32 and codec.scale is None
    step = max(1, COMPUTE_CHUNK_ELEMENTS // max(cols, 1))
    n = min(step, rows) * cols
    # reused chunk buffers: fresh ones would be faulted in again for every chunk
    t_buf = torch.empty(n, dtype=torch.float32, device=dev) if segs else None
    v_buf = None if in_place else torch.empty(n, dtype=torch.float32, device=dev)
    for c0 in range(0, rows, step):
        c1 = min(rows, c0 + step)
        part = view[c0:c1]
        if in_place:
            orig = v = part
        else:
            v = codec.scale_(v_buf[: (c1 - c0) * cols].view(c1 - c0, cols).copy_(part))
            orig = v.clone() if codec.coarse else v  # only coarse formats look at the original again
        for up, down, s, (r0, r1) in segs:
            lo, hi = max(r0, c0), min(r1, c1)
            if lo < hi:
                t = t_buf[: (hi - lo) * cols].view(hi - lo, cols)
                torch.mm(up[lo - r0:hi - r0], down, out=t)
                v[lo - c0:hi - c0].add_(t if s is None else t.mul_(s))
        if in_place:
            u.out_of_range += count_nonfinite(part)
        else:
            u.out_of_range += codec.encode_(part, v, orig, rounding=rounding, seed=seed, key=u.key,
                                            index_offset=c0 * cols)


class TorchRun:
    """The reference as a backend run: it reads the segments' scales on every run."""

    def __init__(self, updates: list[Update], rounding: str, seed: int) -> None:
        self.updates, self.rounding, self.seed = updates, rounding, seed

    def run(self) -> None:
        for u in self.updates:
            reference_update(u, u.codec, self.rounding, self.seed)

    def rescaled(self) -> None:
        pass
