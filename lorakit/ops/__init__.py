"""The one primitive behind every merge and patch path, and the choice of backend that runs it.

``update_many_(updates)`` does, for each update, ``W[rows_j] += scale_j * (up_j @ down_j)`` for
every segment j in order and encodes the result into W's storage once; ``lowrank_update_`` is the
one-segment form, ``Prepared`` the reusable one (patch handles re-run it with new scales).
The arithmetic, identical on every backend (the torch reference, ``ops.reference``, is the spec):

    v = decode(W)  (fp32; scaled fp8: times its scale; or read from a backup)
    for each segment (up, down, scale, rows), scale != 0:
        t = up @ down (fp32 accumulation);  v[rows] = v[rows] + fp32(t * fp32(scale))
    W = encode(v)  (the codec's rounding, see lorakit.codecs.rounding)

The order of the k-sum inside ``up @ down`` is the one thing a backend chooses (BLAS, tensor
cores): the products of 16-bit factors are exact in fp32, the sums are not, so two backends
agree bit for bit wherever those sums are exact and otherwise differ only where a last-bit
difference of ``t`` crosses a rounding boundary of W's dtype (at most 1 ulp; measured in tests).

Backends are a table (``BACKENDS``): the Triton kernel on CUDA, the torch reference everywhere.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..codecs import Codec, plain
from ..errors import BackendUnavailable, UsageError
from .reference import TorchRun
from .types import Segment, Update, as_matrix

__all__ = ["Segment", "Update", "Prepared", "update_many_", "lowrank_update_", "as_matrix", "BACKENDS",
           "choose_backend", "ROUNDINGS"]

ROUNDINGS = ("nearest", "stochastic")
MIN_CAPABILITY = (8, 0)  # bf16 tensor-core dots; fp8 is decoded in registers, so no sm89 requirement


class Run(Protocol):
    """A backend's prepared form of a list of updates."""

    def run(self) -> None: ...

    def rescaled(self) -> None: ...


@dataclass(frozen=True)
class Backend:
    name: str
    prepare: Callable[[list[Update], str, int], Run]
    why_not: Callable[[torch.Tensor, Codec, bool], "str | None"]

    def unavailable(self, w: torch.Tensor, codec: Codec, explicit: bool = False) -> str | None:
        """Why this backend cannot patch ``w`` stored as ``codec`` (None: it can)."""
        return self.why_not(w, codec, explicit)


class TritonRun:
    """The grouped kernel: launch tables built once, one launch per group on every ``run``."""

    def __init__(self, updates: list[Update], rounding: str, seed: int) -> None:
        from .. import kernels
        from ..codecs.rounding import salt

        self.updates = updates
        jobs = [kernels.Job(as_matrix(u.w), [(as_matrix(g.up), as_matrix(g.down), g.scale, g.span(u.w.shape[0]))
                                             for g in u.segments],
                            kind=u.codec.kernel, salt=salt(seed, u.key), weight_scale=u.codec.scale,
                            source=None if u.source is None else as_matrix(u.source), index_base=u.index_base)
                for u in updates]
        self.launch = kernels.GroupedLaunch(jobs, stochastic=rounding == "stochastic")

    def run(self) -> None:
        for u, n in zip(self.updates, self.launch.run()):
            u.out_of_range += n

    def rescaled(self) -> None:
        self.launch.set_scales([[g.scale for g in u.segments] for u in self.updates])


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'lorakit[triton]'"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _why_not_triton(w: torch.Tensor, codec: Codec, explicit: bool) -> str | None:
    # cheap checks first: a CPU merge should not pay for importing triton
    interpret = w.device.type == "cpu" and explicit and _interpreting()
    if w.device.type != "cuda" and not interpret:
        return f"the weight is on {w.device.type}, the kernel needs a CUDA tensor"
    if not codec.kernel:
        return f"no kernel for {codec.name} weights"
    if (err := _triton_import_error()) is not None:
        return err
    if interpret:
        return None  # TRITON_INTERPRET=1 and asked for by name: the kernel runs on CPU tensors (tests)
    cap = torch.cuda.get_device_capability(w.device)
    if cap < MIN_CAPABILITY:
        return f"GPU compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    return None


BACKENDS = [Backend("triton", TritonRun, _why_not_triton), Backend("torch", TorchRun, lambda w, codec, explicit: None)]


def choose_backend(w: torch.Tensor, backend: str = "auto", codec: Codec | None = None) -> Backend:
    """The first backend of the table that can patch ``w``; an explicit one that cannot raises."""
    codec = codec or plain(w.dtype)
    if backend == "auto":
        return next(b for b in BACKENDS if b.unavailable(w, codec) is None)
    chosen = next((b for b in BACKENDS if b.name == backend), None)
    if chosen is None:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose from auto, "
                                 + ", ".join(b.name for b in BACKENDS))
    if (why := chosen.unavailable(w, codec, explicit=True)) is not None:
        reasons = "; ".join(f"{b.name}: {b.unavailable(w, codec) or 'available'}" for b in BACKENDS)
        raise BackendUnavailable(f"backend {backend!r} cannot patch this {w.dtype} tensor on {w.device}: {why} "
                                 f"({reasons})")
    return chosen


class Prepared:
    """``update_many_`` made reusable: the backend's launch tables are built once; ``run()`` again
    after a restore (or from each update's ``source``), ``rescaled()`` after changing segment scales."""

    def __init__(self, updates: list[Update], *, rounding: str = "nearest", seed: int = 0,
                 backend: str = "auto") -> None:
        if rounding not in ROUNDINGS:
            raise UsageError(f"unknown rounding mode {rounding!r}; choose {' or '.join(ROUNDINGS)}")
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
            self._work.append(u if w is u.w and src is u.source else Update(w, u.segments, u.key, u.codec, src))
        by_backend: dict[str, tuple[Backend, list[Update]]] = {}
        for u in self._work:
            b = choose_backend(u.w, backend, u.codec)
            by_backend.setdefault(b.name, (b, []))[1].append(u)
        self.updates = updates
        self.runs = [b.prepare(us, rounding, seed) for b, us in by_backend.values()]

    def run(self) -> None:
        for u in self._work:
            u.out_of_range = 0
        for original, stand_in in self._staged:
            stand_in.copy_(original)
        for r in self.runs:
            r.run()
        for original, stand_in in self._staged:
            original.copy_(stand_in)
        for u, w in zip(self.updates, self._work):
            u.out_of_range = w.out_of_range

    def rescaled(self) -> None:
        for r in self.runs:
            r.rescaled()


def update_many_(updates: list[Update], *, rounding: str = "nearest", seed: int = 0, backend: str = "auto") -> None:
    """Apply every update in place (grouped into one kernel launch per storage kind on CUDA); each
    update's ``out_of_range`` counts what its storage could not hold."""
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
    codec: Codec | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``W[rows] += scale * (up @ down)`` in place; returns W.

    Conv weights are treated as [out, in*kh*kw]; ``up``/``down`` may be 2-D or conv-shaped.
    ``codec`` is how W is stored (default plain ``W.dtype``; ``lorakit.codecs.scaled`` for scaled fp8).
    """
    update_many_([Update(W, [Segment(up, down, scale, rows)], key, codec)], rounding=rounding, seed=seed,
                 backend=backend)
    return W
