"""A module's change as the factors a file stores, cut to rows or stacked with others: what
``lorakit convert`` writes when the target naming splits a fused module (Flux ``qkv`` -> q, k, v)
or fuses split ones (q, k, v -> ``qkv``). Every operation is exact (no SVD, no approximation):
rows of a product are products of rows, and modules on disjoint rows stack into one module of the
summed rank with a block-diagonal up. An algorithm that cannot express a cut or a stack exactly
gets ``None``, and the caller says so."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .base import Adapter
from .full import Full
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA

Factors = dict[str, torch.Tensor]

# roles whose first dimension is the module's output rows, per algorithm
ROW_ROLES = {LoRA: ("up", "up_bias"), LoHa: ("hada_w1_a", "hada_w2_a"), Full: ("diff",)}
ROW_COMMON = ("diff_b",)  # a bias change: one value per output row, whatever the algorithm
LOWRANK = {LoRA: (("up", "down"),), LoHa: (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"))}


@dataclass(frozen=True)
class Change:
    """One module's change over ``rows`` output rows: the algorithm, its factors (as a file stores
    them, alpha excluded), its alpha (None: the algorithm's default) and its rank. The change is
    ``alpha / rank x product(factors)`` exactly as the adapter computes it."""

    algo: type[Adapter]
    factors: Factors
    alpha: float | None
    rank: int | None
    rows: int

    @property
    def scale(self) -> float:
        if self.alpha is None or self.rank is None or self.alpha == 0:
            return 1.0
        return self.alpha / self.rank


def algo_name(algo: type[Adapter]) -> str:
    """An algorithm's name for messages (LoRA's own name depends on its factors)."""
    return algo.algo if isinstance(algo.algo, str) else algo.__name__.lower()


def of(adapter: Adapter, rows: int) -> Change:
    """The adapter's change as written in its file (a kohya split_qkv LoRA keeps its fused form:
    its rank is the stored one, and alpha is rescaled so alpha / rank is the scale it applies)."""
    factors = {r: t for r, t in adapter.factors.items() if r != "alpha"}
    rank = None if isinstance(adapter, LoKr) and adapter.rank is None else _stored_rank(adapter)
    alpha = adapter.alpha()
    if isinstance(adapter, LoRA) and adapter.split_parts > 1:
        alpha = _alpha_for(adapter.scale, rank)
    return Change(type(adapter), factors, alpha, rank, rows)


def _stored_rank(adapter: Adapter) -> int | None:
    if isinstance(adapter, LoRA):
        return int(adapter.factors["down"].shape[0])
    return adapter.rank


def _alpha_for(scale: float, rank: int | None) -> float | None:
    """An alpha whose alpha / rank is ``scale`` exactly (None when no float is)."""
    if rank is None:
        return None if scale == 1.0 else math.nan
    alpha = scale * rank
    for candidate in (alpha, math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)):
        if candidate / rank == scale:
            return candidate
    return math.nan


def _dora_rows(m: torch.Tensor, rows: int) -> bool:
    return m.numel() == rows and (m.dim() == 1 or m.shape[0] == rows)


def cut(c: Change, a: int, b: int) -> Change | None:
    """Rows ``a:b`` of the change, exactly (None: the algorithm cannot express them)."""
    if (a, b) == (0, c.rows):
        return c
    if c.algo is LoKr:
        return _cut_lokr(c, a, b)
    if c.algo not in ROW_ROLES or "mid" in c.factors or "hada_t1" in c.factors or "hada_t2" in c.factors:
        return None
    out: Factors = {}
    for role, t in c.factors.items():
        if role in ROW_ROLES[c.algo] or role in ROW_COMMON:
            out[role] = t[a:b]
        elif role == "dora_scale":
            if not _dora_rows(t, c.rows):
                return None
            out[role] = t[a:b]
        else:
            out[role] = t
    if c.algo is LoRA:
        out, rank = _drop_zero_rank(out, c.rank)
        if rank != c.rank:  # a kohya split_qkv part: its own block of the rank
            return Change(c.algo, out, _alpha_for(c.scale, rank), rank, b - a)
    return replace(c, factors=out, rows=b - a)


def _drop_zero_rank(f: Factors, rank: int | None) -> tuple[Factors, int | None]:
    """Leave out the rank columns whose up column is zero on these rows, when they are all but one
    contiguous block (kohya split_qkv parts): the same product, of the part's own rank."""
    up = f["up"].reshape(f["up"].shape[0], f["up"].shape[1], -1)
    live = up.abs().amax(dim=(0, 2)) != 0
    idx = torch.nonzero(live).flatten()
    if len(idx) == 0 or len(idx) == live.numel() or int(idx[-1] - idx[0]) + 1 != len(idx):
        return f, rank
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    out = dict(f)
    out["up"], out["down"] = f["up"][:, lo:hi], f["down"][lo:hi]
    return out, hi - lo


def _cut_lokr(c: Change, a: int, b: int) -> Change | None:
    """kron(w1, w2)'s rows a:b are kron(w1[a/n:b/n], w2) when both ends are multiples of w2's rows n."""
    f = c.factors
    if "lokr_t2" in f or "dora_scale" in f:
        return None
    n = int(f["lokr_w2"].shape[0] if "lokr_w2" in f else f["lokr_w2_a"].shape[0])
    if a % n or b % n:
        return None
    out = dict(f)
    key = "lokr_w1" if "lokr_w1" in f else "lokr_w1_a"
    out[key] = f[key][a // n:b // n]
    if "diff_b" in f:
        out["diff_b"] = f["diff_b"][a:b]
    return replace(c, factors=out, rows=b - a)


def permute(c: Change, order: torch.Tensor) -> Change | None:
    """The change with its output rows in ``order`` (a fixed re-layout: diffusers' swapped halves)."""
    if c.algo not in ROW_ROLES or "mid" in c.factors:
        return None
    out: Factors = {}
    for role, t in c.factors.items():
        if role in ROW_ROLES[c.algo] or role in ROW_COMMON or (role == "dora_scale" and _dora_rows(t, c.rows)):
            out[role] = t[order]
        elif role == "dora_scale":
            return None
        else:
            out[role] = t
    return replace(c, factors=out)


def transpose(c: Change) -> Change | None:
    """The change of the transposed weight (HF vs OpenCLIP text projection): a 2-D LoRA swaps and
    transposes its factors."""
    f = c.factors
    if c.algo is not LoRA or set(f) - {"up", "down"} or f["up"].dim() != 2:
        return None
    return replace(c, factors={"up": f["down"].t().contiguous(), "down": f["up"].t().contiguous()},
                   rows=int(f["down"].shape[1]))


def stack(parts: list[tuple[int, Change]], rows: int) -> tuple[Change | None, str]:
    """One change over ``rows`` rows made of ``parts`` (first row, change) on disjoint rows; rows
    no part covers get no change. Returns (change, note); (None, reason) when no exact form exists."""
    algos = {c.algo for _, c in parts}
    if len(algos) != 1:
        return None, "its parts use different algorithms (" + ", ".join(sorted(algo_name(a) for a in algos)) + ")"
    algo = algos.pop()
    if algo not in ROW_ROLES:
        return None, f"{algo_name(algo)} changes cannot be stacked into one module exactly"
    roles = {frozenset(c.factors) for _, c in parts}
    if len(roles) != 1:
        return None, "its parts carry different factors"
    sample = parts[0][1].factors
    if "mid" in sample or "hada_t1" in sample or "hada_t2" in sample or "up_bias" in sample:
        return None, "Tucker or bias factors do not stack"
    covered = sum(c.rows for _, c in parts)
    if "dora_scale" in sample and (covered != rows or not all(_dora_rows(c.factors["dora_scale"], c.rows)
                                                              for _, c in parts)):
        return None, "DoRA magnitudes stack only when every row is covered and normed per row"
    scales = {c.scale for _, c in parts}
    fold = len(scales) > 1
    dtype = torch.float32 if fold else _common_dtype([t for _, c in parts for t in c.factors.values()])
    out: Factors = {}
    if algo is Full:
        out["diff"] = _rows_of(parts, "diff", rows, dtype)
        if "diff_b" in sample:
            out["diff_b"] = _rows_of(parts, "diff_b", rows, dtype)
        return Change(Full, out, None, None, rows), ""
    rank = sum(c.rank for _, c in parts)
    for i, (row_role, col_role) in enumerate(LOWRANK[algo]):
        ups, downs, col = [], [], 0
        full = torch.zeros((rows, rank) + tuple(sample[row_role].shape[2:]), dtype=dtype)
        for first, c in parts:
            u = c.factors[row_role].to(dtype)
            if fold and i == 0:  # each part's own scale carried by its up (fp32: exact products)
                u = (c.factors[row_role].float() * c.scale).to(dtype)
            full[first:first + c.rows, col:col + c.rank] = u
            downs.append(c.factors[col_role].to(dtype))
            col += c.rank
        out[row_role] = full
        out[col_role] = torch.cat(downs)
    if "diff_b" in sample:
        out["diff_b"] = _rows_of(parts, "diff_b", rows, dtype)
    if "dora_scale" in sample:
        out["dora_scale"] = torch.cat([c.factors["dora_scale"] for _, c in sorted(parts, key=lambda p: p[0])])
    if fold:
        return Change(algo, out, float(rank), rank, rows), "parts with different alpha / rank: each scale folded " \
                                                           "into its up factor in fp32"
    alpha = _alpha_for(scales.pop(), rank)
    if alpha is not None and math.isnan(alpha):
        return None, "no alpha gives the stacked module its parts' scale exactly"
    return Change(algo, out, alpha, rank, rows), ""


def _rows_of(parts: list[tuple[int, Change]], role: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
    t0 = parts[0][1].factors[role]
    full = torch.zeros((rows,) + tuple(t0.shape[1:]), dtype=dtype)
    for first, c in parts:
        full[first:first + c.rows] = c.factors[role].to(dtype)
    return full


def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    kinds = {t.dtype for t in tensors if t.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def delta_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape of the weight a module's factors (role -> shape) change, read from the factors
    alone (None: these roles do not say)."""
    s = shapes
    if "up" in s and "down" in s:
        inner = s["mid"][2:] if "mid" in s else s["down"][2:]
        return (s["up"][0], s["down"][1]) + tuple(inner)
    if "hada_w1_a" in s and "hada_w1_b" in s:
        return s["hada_w1_a"][0], s["hada_w1_b"][1]
    if "diff" in s:
        return s["diff"]
    w1 = s.get("lokr_w1") or (s["lokr_w1_a"][0], s["lokr_w1_b"][1]) if ("lokr_w1" in s or "lokr_w1_a" in s) else None
    w2 = s.get("lokr_w2") or (s["lokr_w2_a"][0], s["lokr_w2_b"][1]) if ("lokr_w2" in s or "lokr_w2_a" in s) else None
    if w1 is not None and w2 is not None and len(w1) == len(w2) == 2:
        return w1[0] * w2[0], w1[1] * w2[1]
    return None
