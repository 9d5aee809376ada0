"""The primitive and its rounding spec, against float64 references.

Tolerances: fp32 results within 1e-6 relative of float64 (rank-r fp32 accumulation);
fp16 / bf16 results within 0.5 ulp + the fp32 accumulation error (checked as <= 1 ulp, with
at most 0.1 % of elements above 0.5 ulp); fp8: rules of tests/golden_compare.py.
"""

from __future__ import annotations

import pytest
import torch

from lorakit import codecs
from lorakit.codecs.rounding import round_into, uniform24
from lorakit.ops import lowrank_update_
from tests.golden_compare import check_fp8, check_stochastic_stats, fp8_neighbours, ulp


def _factors(out: int, inn: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    up = torch.randn(out, r, generator=g) * 0.05
    down = torch.randn(r, inn, generator=g) * 0.05
    return w, up, down


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_within_one_ulp_of_float64(dtype: torch.dtype) -> None:
    w, up, down = _factors(96, 80, 16)
    W = w.to(dtype)
    ref = W.double() + 0.7 * (up.double() @ down.double())
    lowrank_update_(W, up, down, 0.7)
    err = (W.double() - ref).abs() / ulp(ref, dtype)
    assert float(err.max()) <= 1.0
    assert float((err > 0.5 + 1e-3).float().mean()) <= 1e-3


def test_fp32_and_rows_and_conv() -> None:
    w, up, down = _factors(48, 27, 4)
    W = w.clone()
    lowrank_update_(W, up[:16], down, 2.0, rows=(16, 32))
    ref = w.double().clone()
    ref[16:32] += 2.0 * (up[:16].double() @ down.double())
    assert torch.allclose(W.double(), ref, rtol=1e-6, atol=1e-9)
    assert torch.equal(W[:16], w[:16]) and torch.equal(W[32:], w[32:])
    conv = w.reshape(48, 3, 3, 3).clone()
    lowrank_update_(conv, up.reshape(48, 4, 1, 1), down.reshape(4, 3, 3, 3), 1.0)
    ref = (w.double() + up.double() @ down.double()).reshape(48, 3, 3, 3)
    assert torch.allclose(conv.double(), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_nearest_matches_independent_neighbours(dtype: torch.dtype) -> None:
    w, up, down = _factors(64, 64, 8)
    W = w.to(dtype)
    base = W.clone()
    exact = W.float() + 3.0 * (up @ down)
    lowrank_update_(W, up, down, 3.0, rounding="nearest")
    check_fp8(W, base, exact, "nearest", "t")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_stochastic_unbiased_and_deterministic(dtype: torch.dtype) -> None:
    w, up, down = _factors(256, 256, 8, seed=3)
    W = w.to(dtype)
    base = W.clone()
    exact = W.float() + 0.5 * (up @ down)
    a = lowrank_update_(W.clone(), up, down, 0.5, rounding="stochastic", seed=1, key="k")
    b = lowrank_update_(W.clone(), up, down, 0.5, rounding="stochastic", seed=1, key="k")
    c = lowrank_update_(W.clone(), up, down, 0.5, rounding="stochastic", seed=2, key="k")
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not torch.equal(a.view(torch.uint8), c.view(torch.uint8))
    check_stochastic_stats([check_fp8(a, base, exact, "stochastic", "t")])
    lo, hi = fp8_neighbours(exact, dtype)
    mean_err = float((a.double() - exact.double()).mean())
    assert abs(mean_err) < 0.05 * float((hi - lo).mean()), "stochastic rounding must be unbiased on average"


def test_stochastic_independent_of_chunking_and_rows() -> None:
    """The draw depends only on (seed, key, flat index): patching a row slice gives the same bits."""
    w, up, down = _factors(64, 32, 4, seed=5)
    W = w.to(torch.float8_e4m3fn)
    whole_up = torch.zeros(64, 4)
    whole_up[16:48] = up[16:48]
    full = lowrank_update_(W.clone(), whole_up, down, 1.0, rounding="stochastic", seed=9, key="x")
    part = lowrank_update_(W.clone(), up[16:48], down, 1.0, rounding="stochastic", seed=9, key="x", rows=(16, 48))
    assert torch.equal(full.view(torch.uint8), part.view(torch.uint8))


def test_untouched_fp8_bits_and_saturation() -> None:
    W = torch.tensor([1.0, 2.0, 400.0, -3.0]).to(torch.float8_e4m3fn)
    orig = W.float()
    value = orig + torch.tensor([0.0, 0.0, 100.0, 0.0])
    dst = W.clone()
    sat = round_into(dst, value, orig, rounding="nearest")
    assert sat == 1 and float(dst[2].float()) == 448.0
    assert torch.equal(dst.view(torch.uint8)[[0, 1, 3]], W.view(torch.uint8)[[0, 1, 3]])


def test_uniform24_range_and_spread() -> None:
    u = uniform24(0, "key", torch.arange(1 << 16))
    assert int(u.min()) >= 0 and int(u.max()) < (1 << 24)
    hist = torch.histc(u.float(), bins=16, min=0, max=1 << 24)
    assert float(hist.min()) > 0.9 * (1 << 12) and float(hist.max()) < 1.1 * (1 << 12)
    assert not torch.equal(u, uniform24(0, "other", torch.arange(1 << 16)))


def test_scaled_fp8_requantises_with_the_same_scale() -> None:
    w, up, down = _factors(32, 32, 4, seed=7)
    s = float(w.abs().max()) / 448.0
    W8 = (w / s).to(torch.float8_e4m3fn)
    base = W8.clone()
    exact = (W8.float() * s + 0.3 * (up @ down)) / s
    lowrank_update_(W8, up, down, 0.3, rounding="nearest", codec=codecs.scaled(W8.dtype, s))
    check_fp8(W8, base, exact, "nearest", "scaled")
