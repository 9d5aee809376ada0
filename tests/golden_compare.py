"""The zoo's comparison rules (../shared/zoo/README.md), written independently of lorakit's code."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

# (mantissa bits, smallest normal exponent) per float dtype
FLOAT_BITS = {torch.float16: (10, -14), torch.bfloat16: (7, -126), torch.float32: (23, -126),
              torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64)."""
    mant, emin = FLOAT_BITS[dtype]
    _, e = torch.frexp(x.abs().double())
    exp = torch.clamp(e - 1, min=emin)
    return torch.pow(2.0, (exp - mant).double())


def check_float(out: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    o, e = out.double(), expected.double()
    err = (o - e).abs()
    tol = ulp(e, out.dtype)
    bad = err > tol
    assert not bool(bad.any()), (f"{key}: {int(bad.sum())} elements off by more than 1 ulp of {out.dtype}; "
                                 f"max error {float(err.max()):.3e}")


def fp8_values(dtype: torch.dtype) -> torch.Tensor:
    """All finite values of an fp8 dtype, sorted (float64)."""
    v = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).double()
    v = v[torch.isfinite(v)]
    return torch.unique(v)


def fp8_neighbours(exact: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """lo <= exact <= hi among fp8 values, saturating at the largest finite value."""
    vals = fp8_values(dtype)
    m = FP8_MAX[dtype]
    x = exact.double().clamp(-m, m).reshape(-1)
    idx = torch.searchsorted(vals, x, right=True) - 1
    idx = idx.clamp(0, len(vals) - 1)
    lo = vals[idx]
    hi = torch.where(lo == x, lo, vals[(idx + 1).clamp(max=len(vals) - 1)])
    return lo.reshape(exact.shape), hi.reshape(exact.shape)


def check_fp8(out: torch.Tensor, base: torch.Tensor, exact: torch.Tensor, mode: str, key: str) -> dict:
    """Apply the fp8 rules; returns up/expected counts for the stochastic statistics."""
    same = exact.double() == base.double()
    ob, bb = out.view(torch.uint8), base.view(torch.uint8)
    assert bool((ob[same] == bb[same]).all()), f"{key}: untouched fp8 elements changed bits"
    ch = ~same
    o = out.double()[ch]
    x = exact.double()[ch]
    lo, hi = fp8_neighbours(x, out.dtype)
    assert bool(((o == lo) | (o == hi)).all()), f"{key}: fp8 element not one of its two neighbours"
    width = hi - lo
    if mode == "nearest":
        mid = (lo + hi) / 2
        tie = (x - mid).abs() <= 1e-3 * width
        want = torch.where(x - lo < hi - x, lo, hi)
        assert bool(((o == want) | tie | (width == 0)).all()), f"{key}: fp8 nearest rounding picked the far neighbour"
        return {}
    frac = torch.where(width > 0, (x - lo) / torch.where(width > 0, width, 1.0), torch.zeros_like(x))
    up = (o == hi) & (width > 0)
    stats = {}
    for sign_name, sign in (("pos", x > 0), ("neg", x < 0)):
        for half_name, half in (("low", frac < 0.5), ("high", frac >= 0.5)):
            sel = sign & half & (width > 0)
            stats[(sign_name, half_name)] = (int(up[sel].sum()), float(frac[sel].sum()),
                                             float((frac[sel] * (1 - frac[sel])).sum()))
    return stats


def check_stochastic_stats(stats: list[dict]) -> None:
    total: dict = {}
    for s in stats:
        for k, (u, f, v) in s.items():
            a = total.setdefault(k, [0, 0.0, 0.0])
            a[0] += u
            a[1] += f
            a[2] += v
    for k, (u, f, v) in total.items():
        sd = math.sqrt(v) if v > 0 else 0.0
        assert abs(u - f) <= 6 * sd + 1e-9, f"stochastic rounding biased in group {k}: {u} rounded up, expected {f:.1f} ± {sd:.1f}"


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def verify(case: dict, zoo: Path, out: Path) -> None:
    """A successful case's OUT against its expected file, by the README's rules."""
    base, base_meta = read(zoo / case["base"])
    got, meta = read(out)
    assert set(got) == set(base), "OUT must have exactly BASE's keys"
    assert "lorakit" in meta and {k: v for k, v in meta.items() if k != "lorakit"} == base_meta
    expected, _ = read(zoo / case["expect"]["output"])
    mode = case["flags"].get("rounding") or "stochastic"
    stats = []
    for key, b in base.items():
        o = got[key]
        assert o.shape == b.shape and o.dtype == b.dtype, key
        if key not in expected:
            assert torch.equal(_bits(o), _bits(b)), f"{key}: untouched tensor changed"
            continue
        e = expected[key]
        if o.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            stats.append(check_fp8(o, b, e, mode, key))
        else:
            check_float(o, e, key)
    if mode == "stochastic" and any(stats):
        check_stochastic_stats(stats)


def digests(path: Path) -> dict[str, str]:
    """sha256 of a file's tensors (names and bytes, in key order) and of its metadata without the
    ``lorakit`` provenance entry (which names the version)."""
    tensors, meta = read(path)
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(_bits(tensors[k]).numpy().tobytes())
    rest = {k: v for k, v in meta.items() if k != "lorakit"}
    return {"tensors": h.hexdigest(), "metadata": hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()}
