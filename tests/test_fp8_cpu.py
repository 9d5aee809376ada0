"""The compiled fp8 loops (lorakit.codecs.fp8_cpu) equal the torch rounding spec bit for bit."""

from __future__ import annotations

import pytest
import torch

from lorakit.codecs import CODECS, fp8_cpu
from lorakit.codecs.rounding import FP8_MAX, round_into, salt
from lorakit.ops import lowrank_update_
from lorakit.ops import reference

pytestmark = pytest.mark.skipif(not fp8_cpu.available(), reason="numba is not installed")

FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)
MODES = ("nearest", "stochastic")


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def _probe_values(dtype: torch.dtype, n_random: int = 1 << 18) -> torch.Tensor:
    """fp32 values that stress rounding: every fp8 value, the midpoints between neighbours (ties)
    and one fp32 step either side of them, beyond the limit, the specials, and random bit patterns."""
    vals = _all_values(dtype)
    finite = vals[torch.isfinite(vals)].unique()
    mids = (finite[:-1].double() + finite[1:].double()) / 2
    mids32 = mids.float()
    near_mids = torch.cat([mids32, torch.nextafter(mids32, torch.full_like(mids32, float("inf"))),
                           torch.nextafter(mids32, torch.full_like(mids32, -float("inf")))])
    m = FP8_MAX[dtype]
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), m, -m,
                            m * 1.03, -m * 1.07, m * 2, 1e30, -1e30, 1e-40, -1e-40, 1.4e-45, 2.0 ** -9, 2.0 ** -16,
                            2.0 ** -10, 2.0 ** -17, 2.0 ** -6, 2.0 ** -14])
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-(1 << 31), 1 << 31, (n_random,), generator=g, dtype=torch.int64).to(torch.int32)
    random_bits = bits.view(torch.float32)
    small = torch.randn(n_random, generator=g) * torch.logspace(-8, 3, n_random)[torch.randperm(n_random, generator=g)]
    return torch.cat([finite, near_mids, special, random_bits, small, -small]).contiguous()


def _stored(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored bits to patch: every pattern (NaNs and signed zeros included), cycled."""
    pats = torch.arange(256, dtype=torch.uint8)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 256, (values.numel(),), generator=g)
    return pats[idx].view(dtype).contiguous()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.uint8) != b.view(torch.uint8)).sum())


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [None, 0.0123, 3.5])
def test_encode_equals_the_spec(dtype: torch.dtype, mode: str, scale: float | None) -> None:
    values = _probe_values(dtype)
    stored = _stored(values, dtype)
    decoded = stored.float() * scale if scale is not None else stored.float()
    # half the elements unchanged (their bits must stay), half moved to the probe values
    value = torch.where(torch.arange(values.numel()) % 2 == 0, values, decoded)
    for original in (None, decoded):
        spec, fast = stored.clone(), stored.clone()
        want = round_into(spec, value, original, rounding=mode, seed=5, key="blocks.0.w", index_offset=77,
                          scale=scale)
        got = fp8_cpu.encode_(fast, value, original, stochastic=mode == "stochastic", salt=salt(5, "blocks.0.w"),
                              index_offset=77, scale=scale)
        assert _same_bits(spec, fast) == 0
        assert got == want


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", [None, 0.37])
@pytest.mark.parametrize("scale", [None, 0.0123])
def test_add_encode_equals_decode_add_encode(dtype: torch.dtype, mode: str, factor: float | None,
                                             scale: float | None) -> None:
    values = _probe_values(dtype, 1 << 16)
    stored = _stored(values, dtype)
    delta = values * 1e-2
    delta[::5] = 0.0
    spec, fast = stored.clone(), stored.clone()
    v = stored.float() * scale if scale is not None else stored.float()
    v = v + (delta * torch.tensor(factor, dtype=torch.float32) if factor is not None else delta)
    want = round_into(spec, v, None, rounding=mode, seed=1, key="k", index_offset=3, scale=scale)
    got = fp8_cpu.add_encode_(fast, delta, factor, stochastic=mode == "stochastic", salt=salt(1, "k"),
                              index_offset=3, scale=scale)
    assert _same_bits(spec, fast) == 0
    assert got == want


@pytest.mark.parametrize("mode", MODES)
def test_index_high_word_crossing_inside_a_chunk(mode: str) -> None:
    """The stochastic counter's high word changes inside the chunk: the loops split there."""
    dtype = torch.float8_e4m3fn
    stored = (torch.randn(4096) * 0.05).to(dtype)
    value = stored.float() + torch.randn(4096) * 1e-3
    offset = (1 << 32) - 1000
    spec, fast = stored.clone(), stored.clone()
    round_into(spec, value, None, rounding=mode, seed=2, key="x", index_offset=offset)
    fp8_cpu.encode_(fast, value, None, stochastic=mode == "stochastic", salt=salt(2, "x"), index_offset=offset,
                    scale=None)
    assert _same_bits(spec, fast) == 0


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("scale", [None, 0.0123])
def test_decode_equals_torch(dtype: torch.dtype, scale: float | None) -> None:
    stored = torch.arange(256, dtype=torch.uint8).repeat(5).view(dtype)
    want = stored.float() * scale if scale is not None else stored.float()
    got = fp8_cpu.decode_(torch.empty(stored.shape), stored, scale)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert torch.equal(got[ok].view(torch.int32), want[ok].view(torch.int32))


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("mode", MODES)
def test_merge_path_equals_the_torch_spec_path(dtype: torch.dtype, mode: str, monkeypatch) -> None:
    """A whole low-rank update (several chunks, two segments, one LoRA over all rows) is the same
    bit for bit with the compiled loops and with the torch spec alone, on any number of workers."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(300, 2048, generator=g) * 0.05).to(dtype)
    up = torch.randn(300, 8, generator=g, dtype=torch.float32).to(torch.bfloat16) * 0.05
    down = torch.randn(8, 2048, generator=g, dtype=torch.float32).to(torch.bfloat16) * 0.05
    monkeypatch.setattr(reference, "COMPUTE_CHUNK_ELEMENTS", 1 << 16)  # many chunks
    results = {}
    for fast in (True, False):
        for workers in (1, 3):
            monkeypatch.setattr(fp8_cpu, "available", lambda fast=fast: fast)
            monkeypatch.setattr(reference, "cpu_workers", lambda workers=workers: workers)
            whole = lowrank_update_(w.clone(), up, down, 0.7, rounding=mode, seed=4, key="k")
            rows = lowrank_update_(w.clone(), up[40:200], down, 0.7, rounding=mode, seed=4, key="k", rows=(40, 200))
            results[fast, workers] = (whole, rows)
    first = results[True, 1]
    for key, (whole, rows) in results.items():
        assert _same_bits(whole, first[0]) == 0, key
        assert _same_bits(rows, first[1]) == 0, key
    assert _same_bits(first[0], w) > 0


def test_codec_uses_the_loops_only_where_they_apply() -> None:
    e4m3 = CODECS[torch.float8_e4m3fn]
    w = torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    assert e4m3.fuses(w, "stochastic") and e4m3.fuses(w, "nearest")
    assert not e4m3.fuses(w.t(), "nearest")  # not contiguous: the torch spec runs
    assert not CODECS[torch.bfloat16].fuses(torch.zeros(4, 4, dtype=torch.bfloat16), "nearest")
