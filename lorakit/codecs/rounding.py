"""Rounding an fp32 result back into the stored dtype: the spec every backend follows.

* fp32 / fp16 / bf16: round-to-nearest-even (a plain ``.to(dtype)``).
* fp8 ``nearest``: round-to-nearest-even, saturating at the format's largest finite value.
* fp8 ``stochastic``: each element becomes one of its two fp8 neighbours ``lo <= x <= hi``,
  ``hi`` with probability ``(x - lo) / (hi - lo)``. The random draw is a counter-based hash of
  (seed, tensor key, element index), so the result never depends on the device, on chunking,
  or on which elements were patched together: a GPU kernel can reproduce it bit for bit.
  The test ``u * (hi - lo) < (x - lo)`` is done in exact arithmetic (u has 24 bits, hi - lo is
  a power of two, x - lo is exact by Sterbenz), so no division rounding can differ either.

A NaN result is stored as the positive NaN pattern 0x7F in every mode.

fp8 elements whose fp32 value did not change keep their original bits (ComfyUI instead re-rounds
the whole tensor, moving about 0.1 % of untouched fp8 values).
"""

from __future__ import annotations

import zlib

import torch

# largest finite value of each fp8 format (results saturate there)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
MASK32 = 0xFFFFFFFF
NAN_BITS = 0x7F  # every NaN result is stored as this positive NaN pattern (both fp8 formats), in every mode


def key_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8")) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons): a full-avalanche 32-bit mixer; int64 holds the uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """``_mix32`` on one Python int (the per-tensor salt the kernel receives)."""
    return int(_mix32(torch.tensor([x & MASK32], dtype=torch.int64))[0])


def salt(seed: int, key: str) -> int:
    return mix32_int((seed & MASK32) ^ key_hash(key))


def uniform24(seed: int, key: str, index: torch.Tensor) -> torch.Tensor:
    """24-bit integers in [0, 2**24) from (seed, key, element index); int64 tensor."""
    salt_ = salt(seed, key)
    lo = index & MASK32
    hi = (index >> 32) & MASK32
    h = _mix32(lo ^ salt_)
    h = _mix32(h ^ ((hi + 0x9E3779B9) & MASK32))
    return h >> 8


def _nearest_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = FP8_MAX[dtype]
    return x.clamp(-m, m).to(dtype)


def _stochastic_fp8(x: torch.Tensor, dtype: torch.dtype, seed: int, key: str, index: torch.Tensor) -> torch.Tensor:
    m = FP8_MAX[dtype]
    a = x.abs().clamp(max=m)
    near = a.to(dtype)  # RTNE of the magnitude
    nf = near.float()
    bits = near.view(torch.uint8).to(torch.int16)
    # neighbours of a: the nearest value and the next one on the other side of a
    other = torch.where(nf < a, bits + 1, bits - 1).clamp(min=0).to(torch.uint8).view(dtype)
    of = other.float()
    lo = torch.minimum(nf, of)
    hi = torch.maximum(nf, of)
    exact = nf == a
    up = uniform24(seed, key, index).float() * (hi - lo) < (a - lo) * 16777216.0
    mag = torch.where(exact, nf, torch.where(up, hi, lo))
    return torch.where(x < 0, -mag, mag).to(dtype)


def clipped(target: torch.Tensor, changed: torch.Tensor, limit: float) -> int:
    """Changed elements whose exact (stored-space) value lies beyond the format's largest finite
    value: the one definition of "saturated"."""
    return int(((target.abs() > limit) & changed).sum())


def count_nonfinite(t: torch.Tensor) -> int:
    """inf / NaN elements of ``t``. A sum is finite exactly when no element is inf or NaN (or, rarely,
    when finite values overflow the sum: then the precise count runs and finds none), and costs a
    tenth of an element-wise test, so the common case pays only for the sum."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def round_into(
    dst: torch.Tensor,
    value: torch.Tensor,
    original: torch.Tensor | None,
    *,
    rounding: str = "nearest",
    seed: int = 0,
    key: str = "",
    index_offset: int = 0,
    scale: float | None = None,
) -> int:
    """Write fp32 ``value`` into ``dst`` (stored dtype), keeping the bits where value == original.

    ``original`` is the fp32 value before patching (None: ``dst``'s own value); ``scale`` is
    the per-tensor scale of a scaled-fp8 weight (stored = value / scale). ``index_offset`` is the flat index of
    ``dst``'s first element inside the whole tensor (for the stochastic counter).
    Returns how many elements fell outside the format: for fp8, changed elements that saturated
    at its limit; for wider formats, elements that are inf or NaN after the write.
    """
    if dst.dtype not in FP8_MAX:  # plain RTNE of every element (scaled weights are fp8 only)
        dst.copy_(value)
        return count_nonfinite(dst)
    if original is None:
        original = dst.float() * scale if scale is not None else dst.float()
    changed = value != original
    # divide by a tensor: CUDA turns division by a Python scalar into a reciprocal multiply, which
    # is not IEEE division and would make GPU results differ from the CPU's and the kernel's
    target = value / torch.tensor(scale, dtype=torch.float32, device=value.device) if scale is not None else value
    m = FP8_MAX[dst.dtype]
    saturated = clipped(target, changed, m)
    if rounding == "stochastic":
        index = torch.arange(index_offset, index_offset + dst.numel(), dtype=torch.int64, device=dst.device)
        index = index.reshape(dst.shape)
        new = _stochastic_fp8(target, dst.dtype, seed, key, index)
    elif rounding == "nearest":
        new = _nearest_fp8(target, dst.dtype)
    else:
        raise ValueError(f"unknown rounding mode {rounding!r}")
    new = torch.where(target != target, NAN_BITS, new.view(torch.uint8)).view(dst.dtype)
    # keep the old bits wherever the stored value does not move (also keeps the sign of zeros)
    moved = changed & (new.float() != dst.float())
    dst.view(torch.uint8).copy_(torch.where(moved, new.view(torch.uint8), dst.view(torch.uint8)))
    return saturated
