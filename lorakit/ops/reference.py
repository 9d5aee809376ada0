"""The torch reference of the primitive: the spec every backend matches (see ``lorakit.ops``)."""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..codecs import Codec
from ..codecs.rounding import count_nonfinite
from ..devices import cpu_workers
from .types import Update, as_matrix

# elements per step of the reference, each worker one step at a time (8 MB of fp32: with two
# workers on the dev VM 2M elements patched fp8 ~20 % and bf16 ~8 % faster than 512K, and 4M no faster)
COMPUTE_CHUNK_ELEMENTS = 1 << 21


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
    """``u`` in place, chunk by chunk: decode, add every segment, encode once. On the CPU the chunks
    run on ``cpu_workers()`` threads; each chunk's result depends on its rows only, so the result
    is the same bit for bit whatever the number of workers."""
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

    def chunk(c0: int) -> int:
        """Rows c0 .. c0 + step; returns the elements the storage could not hold."""
        c1 = min(rows, c0 + step)
        part = view[c0:c1]
        t_buf, v_buf = _buffers(n, dev)
        # the segments meeting this chunk: factors, scale, and the chunk rows they cover
        live = [(up[lo - r0:hi - r0], down, s, lo, hi) for up, down, s, (r0, r1) in segs
                if (lo := max(r0, c0)) < (hi := min(r1, c1))]
        if len(live) == 1 and live[0][3:] == (c0, c1) and codec.fuses(part, rounding):
            # one segment over the whole chunk, fp8 on the CPU: decode, add and round in one pass
            up, down, s, _, _ = live[0]
            t = torch.mm(up, down, out=t_buf[: (c1 - c0) * cols].view(c1 - c0, cols))
            return codec.add_encode_(part, t, None if s is None else float(s), rounding=rounding, seed=seed,
                                     key=u.key, index_offset=u.index_base + c0 * cols)
        v = part if in_place else codec.decode_into(v_buf[: (c1 - c0) * cols].view(c1 - c0, cols), part)
        for up, down, s, lo, hi in live:
            t = torch.mm(up, down, out=t_buf[: (hi - lo) * cols].view(hi - lo, cols))
            v[lo - c0:hi - c0].add_(t if s is None else t.mul_(s))
        if in_place:
            return count_nonfinite(part)
        # coarse formats compare with the stored values again: None re-reads them from ``part``
        return codec.encode_(part, v, None, rounding=rounding, seed=seed, key=u.key,
                             index_offset=u.index_base + c0 * cols)

    starts = range(0, rows, step)
    workers = cpu_workers() if dev.type == "cpu" else 1
    if workers > 1 and len(starts) > 1:
        u.out_of_range += sum(_pool(workers, torch.get_num_threads()).map(chunk, starts))
    else:
        u.out_of_range += sum(chunk(c0) for c0 in starts)


_local = threading.local()


def _buffers(n: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's two fp32 chunk buffers of at least ``n`` elements on ``dev``: reused, since
    fresh ones would be faulted in again for every chunk."""
    have = getattr(_local, "buffers", {}).get(dev)
    if have is None or have[0].numel() < n:
        have = (torch.empty(n, dtype=torch.float32, device=dev), torch.empty(n, dtype=torch.float32, device=dev))
        _local.buffers = {**getattr(_local, "buffers", {}), dev: have}
    return have


@functools.cache
def _pool(workers: int, torch_threads: int) -> ThreadPoolExecutor:
    # OpenMP and MKL keep their thread count per thread: a new thread would use every core in each
    # product, and two workers would oversubscribe the machine (measured: 40 % slower on 2 cores)
    return ThreadPoolExecutor(workers, "lorakit-compute", initializer=torch.set_num_threads,
                              initargs=(torch_threads,))


class TorchRun:
    """The reference as a backend run: it reads the segments' scales on every run."""

    def __init__(self, updates: list[Update], rounding: str, seed: int) -> None:
        self.updates, self.rounding, self.seed = updates, rounding, seed

    def run(self) -> None:
        for u in self.updates:
            reference_update(u, u.codec, self.rounding, self.seed)

    def rescaled(self) -> None:
        pass
