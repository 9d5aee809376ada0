"""The one primitive behind every merge and patch path, its torch reference, and backend choice.

``update_many_(updates)`` does, for each update, ``W[rows_j] += scale_j * (up_j @ down_j)`` for
every segment j in order and rounds the result into W's dtype once; ``lowrank_update_`` is the
one-segment form, ``Prepared`` the reusable one (patch handles re-run it with new scales).
The arithmetic, identical on every backend:

    v = W (widened to fp32, times the per-tensor scale of scaled fp8; or read from a backup)
    for each segment (up, down, scale, rows), scale != 0:
        t = up @ down (fp32 accumulation);  v[rows] = v[rows] + fp32(t * fp32(scale))
    W = round(v)                 (see ops.rounding)

The order of the k-sum inside ``up @ down`` is the one thing a backend chooses (BLAS, tensor
cores): the products of 16-bit factors are exact in fp32, the sums are not, so two backends
agree bit for bit wherever those sums are exact and otherwise differ only where a last-bit
difference of ``t`` crosses a rounding boundary of W's dtype (at most 1 ulp; measured in tests).

Backends are a table (``BACKENDS``): the Triton kernel on CUDA, the torch reference everywhere.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import BackendUnavailable
from .rounding import FP8, is_fp8, round_into, salt

__all__ = ["Segment", "Update", "Prepared", "update_many_", "lowrank_update_", "round_into", "is_fp8", "FP8",
           "as_matrix", "BACKENDS", "choose_backend"]

# elements per chunk of fp32 work when rounding whole tensors (bounds the temporaries)
ROUND_CHUNK_ELEMENTS = 1 << 22
# elements per step of the reference: the product, its scaling and the add stay in cache (2 MB;
# measured fastest of 128K..1M elements on the dev VM)
COMPUTE_CHUNK_ELEMENTS = 1 << 19
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
MIN_CAPABILITY = (8, 0)  # bf16 tensor-core dots; fp8 is decoded in registers, so no sm89 requirement


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] conv weights and [out, in] linears both as a 2-D [out, -1] view."""
    return w.reshape(w.shape[0], -1)


@dataclass
class Segment:
    """``W[rows] += scale * (up @ down)``: one LoRA on one weight (rows: a slice of a fused weight)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    rows: tuple[int, int] | None = None
    tag: object = field(default=None, compare=False)  # what produced it (the planner's op), for callers


@dataclass
class Update:
    """One weight's change: its segments apply in order to an fp32 copy, then one rounding."""

    w: torch.Tensor
    segments: list[Segment]
    key: str = ""  # names the tensor for the stochastic-rounding counter
    weight_scale: float | None = None
    source: torch.Tensor | None = None  # the original to patch from (a backup), when not ``w`` itself
    saturated: int = field(default=0, init=False)

    def matrices(self) -> list[tuple[torch.Tensor, torch.Tensor, float, tuple[int, int]]]:
        rows = self.w.shape[0] if self.w.dim() else 1
        return [(as_matrix(g.up), as_matrix(g.down), g.scale, g.rows or (0, rows)) for g in self.segments]


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


def _reference(u: Update, rounding: str, seed: int) -> None:
    view = as_matrix(u.w)
    if u.source is not None:
        view.copy_(as_matrix(u.source))
    rows, cols = view.shape
    dev = view.device
    # a segment whose fp32 scale is 0 is no update at all (adding 0 would turn -0.0 into +0.0)
    segs = [_prescaled(up, down, s32, dev) + (r,) for up, down, s, r in u.matrices()
            if (s32 := torch.tensor(s, dtype=torch.float32)) != 0]
    fp8 = is_fp8(view.dtype)
    in_place = view.dtype == torch.float32 and u.weight_scale is None
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
            v = v_buf[: (c1 - c0) * cols].view(c1 - c0, cols).copy_(part)
            if u.weight_scale is not None:
                v.mul_(u.weight_scale)
            orig = v.clone() if fp8 else v  # only fp8 rounding looks at the original again
        for up, down, s, (r0, r1) in segs:
            lo, hi = max(r0, c0), min(r1, c1)
            if lo < hi:
                t = t_buf[: (hi - lo) * cols].view(hi - lo, cols)
                torch.mm(up[lo - r0:hi - r0], down, out=t)
                v[lo - c0:hi - c0].add_(t if s is None else t.mul_(s))
        if not in_place:
            u.saturated += round_into(part, v, orig, rounding=rounding, seed=seed, key=u.key,
                                      index_offset=c0 * cols, scale=u.weight_scale)


class _TorchRun:
    def __init__(self, updates: list[Update], rounding: str, seed: int) -> None:
        self.updates, self.rounding, self.seed = updates, rounding, seed

    def run(self) -> None:
        for u in self.updates:
            _reference(u, self.rounding, self.seed)

    def rescaled(self) -> None:
        pass  # the reference reads the segments' scales on every run


class _TritonRun:
    def __init__(self, updates: list[Update], rounding: str, seed: int) -> None:
        from .. import kernels

        self.updates = updates
        jobs = [kernels.Job(as_matrix(u.w), u.matrices(), salt=salt(seed, u.key), weight_scale=u.weight_scale,
                            source=None if u.source is None else as_matrix(u.source)) for u in updates]
        self.launch = kernels.GroupedLaunch(jobs, stochastic=rounding == "stochastic")

    def run(self) -> None:
        for u, n in zip(self.updates, self.launch.run()):
            u.saturated += n

    def rescaled(self) -> None:
        self.launch.set_scales([[g.scale for g in u.segments] for u in self.updates])


@dataclass(frozen=True)
class Backend:
    name: str
    prepare: object  # (updates, rounding, seed) -> an object with run() and rescaled()
    why_not: object  # (w, explicit) -> the reason it cannot patch w, or None

    def unavailable(self, w: torch.Tensor, explicit: bool = False) -> str | None:
        """Why this backend cannot patch ``w`` (None: it can)."""
        return self.why_not(w, explicit)


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'lorakit[triton]'"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _why_not_triton(w: torch.Tensor, explicit: bool) -> str | None:
    # cheap checks first: a CPU merge should not pay for importing triton
    interpret = w.device.type == "cpu" and explicit and _interpreting()
    if w.device.type != "cuda" and not interpret:
        return f"the weight is on {w.device.type}, the kernel needs a CUDA tensor"
    if w.dtype not in KERNEL_DTYPES:
        return f"no kernel for {w.dtype}"
    if (err := _triton_import_error()) is not None:
        return err
    if interpret:
        return None  # TRITON_INTERPRET=1 and asked for by name: the kernel runs on CPU tensors (tests)
    cap = torch.cuda.get_device_capability(w.device)
    if cap < MIN_CAPABILITY:
        return f"GPU compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    return None


BACKENDS = [Backend("triton", _TritonRun, _why_not_triton), Backend("torch", _TorchRun, lambda w, explicit: None)]


def choose_backend(w: torch.Tensor, backend: str = "auto") -> Backend:
    """The first backend of the table that can patch ``w``; an explicit one that cannot raises."""
    if backend == "auto":
        return next(b for b in BACKENDS if b.unavailable(w) is None)
    chosen = next((b for b in BACKENDS if b.name == backend), None)
    if chosen is None:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose from auto, "
                                 + ", ".join(b.name for b in BACKENDS))
    if (why := chosen.unavailable(w, explicit=True)) is not None:
        reasons = "; ".join(f"{b.name}: {b.unavailable(w) or 'available'}" for b in BACKENDS)
        raise BackendUnavailable(f"backend {backend!r} cannot patch this {w.dtype} tensor on {w.device}: {why} "
                                 f"({reasons})")
    return chosen


class Prepared:
    """``update_many_`` made reusable: the backend's launch tables are built once; ``run()`` again
    after a restore (or from each update's ``source``), ``rescaled()`` after changing segment scales."""

    def __init__(self, updates: list[Update], *, rounding: str = "nearest", seed: int = 0,
                 backend: str = "auto") -> None:
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"unknown rounding mode {rounding!r}")
        # weights not laid out row-major (channels_last convs, transposed views) are patched in a
        # contiguous stand-in and copied back: reshaping them would silently patch a copy
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._work = []
        for u in updates:
            w = u.w
            if not w.is_contiguous():
                w = torch.empty(u.w.shape, dtype=u.w.dtype, device=u.w.device)
                self._staged.append((u.w, w))
            src = u.source if u.source is None or u.source.is_contiguous() else u.source.contiguous()
            self._work.append(u if w is u.w and src is u.source else Update(w, u.segments, u.key, u.weight_scale, src))
        by_backend: dict[str, tuple[Backend, list[Update]]] = {}
        for u in self._work:
            b = choose_backend(u.w, backend)
            by_backend.setdefault(b.name, (b, []))[1].append(u)
        self.updates = updates
        self.runs = [b.prepare(us, rounding, seed) for b, us in by_backend.values()]

    def run(self) -> None:
        for u in self._work:
            u.saturated = 0
        for original, stand_in in self._staged:
            stand_in.copy_(original)
        for r in self.runs:
            r.run()
        for original, stand_in in self._staged:
            original.copy_(stand_in)
        for u, w in zip(self.updates, self._work):
            u.saturated = w.saturated

    def rescaled(self) -> None:
        for r in self.runs:
            r.rescaled()


def update_many_(updates: list[Update], *, rounding: str = "nearest", seed: int = 0, backend: str = "auto") -> None:
    """Apply every update in place (grouped into one kernel launch per dtype on CUDA)."""
    Prepared(updates, rounding=rounding, seed=seed, backend=backend).run()


def lowrank_update_(
    W: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float,
    *,
    rows: tuple[int, int] | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    key: str = "",
    weight_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``W[rows] += scale * (up @ down)`` in place; returns W.

    Conv weights are treated as [out, in*kh*kw]; ``up``/``down`` may be 2-D or conv-shaped.
    ``weight_scale`` is the per-tensor scale of a scaled-fp8 W (effective weight W * s).
    """
    update_many_([Update(W, [Segment(up, down, scale, rows)], key, weight_scale)], rounding=rounding, seed=seed,
                 backend=backend)
    return W
