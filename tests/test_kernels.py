"""The Triton kernel against the torch reference (lorakit.ops), on CPU under TRITON_INTERPRET=1.

conftest.py turns the interpreter on when no GPU is visible; tests/test_kernels_cuda.py repeats the
claims on a GPU, where bf16 factors and full-size shapes are covered too.

Exactness: with factors on a coarse grid every partial sum of ``up @ down`` is exact in fp32, so
any summation order gives the same ``t`` and the results must agree bit for bit (dtype handling,
scales, row slices, rounding, the stochastic counter, saturation counts). With random factors the
k-sum order differs between backends: both must be within 0.5 ulp of the stored dtype plus the fp32
accumulation bound of a float64 reference, and 16-bit / fp8 results may differ from each other in
at most 0.1 % of elements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is a Linux-only test extra (pip install 'lorakit[test]' on Linux)")

from lorakit.errors import BackendUnavailable  # noqa: E402
from lorakit.ops import Prepared, Segment, Update, choose_backend, update_many_  # noqa: E402
from tests.golden_compare import ulp  # noqa: E402
from tests.helpers import FP8, W_DTYPES, bits, float64_reference, grid  # noqa: E402
from tests.helpers import kernel_model as model  # noqa: E402

def run(updates: list[Update], backend: str, rounding: str, seed: int = 3) -> list[Update]:
    copies = [Update(u.w.clone(), u.segments, u.key, u.codec) for u in updates]
    update_many_(copies, rounding=rounding, seed=seed, backend=backend)
    return copies


@pytest.mark.parametrize("wdtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("fdtype", [torch.float16, torch.float32], ids=str)
def test_bit_exact_on_exact_sums(wdtype: torch.dtype, fdtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    updates = model(g, wdtype, fdtype)
    for rounding in ("nearest", "stochastic") if wdtype in FP8 else ("nearest",):
        ref, ker = run(updates, "torch", rounding), run(updates, "triton", rounding)
        for u, r, k in zip(updates, ref, ker):
            assert not torch.equal(bits(r.w), bits(u.w)), "the update must change the weight"
            assert torch.equal(bits(k.w), bits(r.w)), f"{u.key} {rounding}: kernel differs from the reference"
            assert k.out_of_range == r.out_of_range


@pytest.mark.parametrize("wdtype", FP8, ids=str)
def test_row_pieces_round_as_the_whole_tensor(wdtype: torch.dtype) -> None:
    """A streamed tensor's row pieces (``index_base``: their first element's index in the whole
    tensor) get the stochastic rounding of the whole, on both backends."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(96, 40, generator=g) * 0.3).to(wdtype)
    up, down = grid(g, 96, 8), grid(g, 8, 40)
    whole = Update(w.clone(), [Segment(up, down, 0.37)], key="w")
    update_many_([whole], rounding="stochastic", seed=5, backend="torch")
    for backend in ("torch", "triton"):
        out = w.clone()
        pieces = [Update(out[r0:r1], [Segment(up[r0:r1], down, 0.37)], key="w", index_base=r0 * 40)
                  for r0, r1 in ((0, 33), (33, 96))]
        update_many_(pieces, rounding="stochastic", seed=5, backend=backend)
        assert torch.equal(bits(out), bits(whole.w)), backend


@pytest.mark.parametrize("wdtype", FP8, ids=str)
def test_fp8_saturation_counts_and_subnormals(wdtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(64, 64, generator=g) * 0.004).to(wdtype)  # mostly fp8 subnormals
    up, down = grid(g, 64, 4), grid(g, 4, 64)
    huge = Update(w, [Segment(up, down, 4e4 if wdtype == torch.float8_e4m3fn else 4e6)], key="w")
    tiny = Update(w, [Segment(up, down, 1e-3)], key="w")
    for rounding in ("nearest", "stochastic"):
        ref, ker = run([huge, tiny], "torch", rounding), run([huge, tiny], "triton", rounding)
        assert ref[0].out_of_range > 0 and ker[0].out_of_range == ref[0].out_of_range
        for r, k in zip(ref, ker):
            assert torch.equal(bits(k.w), bits(r.w))


@pytest.mark.parametrize("wdtype", W_DTYPES, ids=str)
def test_random_factors_against_float64(wdtype: torch.dtype) -> None:
    """Both backends: |result - exact| <= 0.5 ulp of the stored dtype + (rank + 3) * 2**-24 * magnitude;
    and they differ from each other in at most 0.1 % of 16-bit / fp8 elements."""
    g = torch.Generator().manual_seed(4)
    normal = lambda g, *s, dtype: (torch.randn(s, generator=g) * 0.05).to(dtype)  # noqa: E731
    updates = model(g, wdtype, torch.float16, normal)
    ref, ker = run(updates, "torch", "nearest"), run(updates, "triton", "nearest")
    for u, r, k in zip(updates, ref, ker):
        exact, mag = float64_reference(u)
        ws = u.codec.scale or 1.0
        rank = sum(g.up.shape[1] for g in u.segments)
        bound = 0.5 * ulp(exact / ws, wdtype) * ws + (rank + 3) * 2.0 ** -24 * mag
        for out in (r, k):
            got = out.w.double().reshape(exact.shape) * ws
            assert bool(((got - exact).abs() <= bound).all()), f"{u.key}: outside 0.5 ulp + accumulation bound"
        if wdtype != torch.float32:
            assert float((bits(r.w) != bits(k.w)).double().mean()) <= 1e-3


def test_repatch_from_source_and_rescale() -> None:
    """A prepared launch re-run from a backup with new scales equals a fresh update (both backends)."""
    g = torch.Generator().manual_seed(6)
    for wdtype in (torch.float16, torch.float8_e4m3fn):
        original = model(g, wdtype, torch.float16)
        results = []
        for backend in ("torch", "triton"):
            live = [Update(u.w.clone(), [Segment(s.up, s.down, s.scale, s.rows) for s in u.segments], u.key,
                           u.codec, u.w.clone()) for u in original]
            prepared = Prepared(live, rounding="stochastic", seed=2, backend=backend)
            prepared.run()
            for u in live:
                for s in u.segments:
                    s.scale *= -0.5
            prepared.rescaled()
            prepared.run()
            results.append(live)
        fresh = [Update(u.w.clone(), [Segment(s.up, s.down, -0.5 * s.scale, s.rows) for s in u.segments], u.key,
                        u.codec) for u in original]
        update_many_(fresh, rounding="stochastic", seed=2, backend="torch")
        for f, r, k in zip(fresh, *results):
            assert torch.equal(bits(r.w), bits(f.w)) and torch.equal(bits(k.w), bits(f.w)), f.key


@pytest.mark.parametrize("cc", [80, 90])
def test_compiles_for_real_gpus(cc: int) -> None:
    """The compiled path (not the interpreter) builds for A100 (sm80) and H100 (sm90): every W kind
    and factor path, with tensor-core dots and without fused multiply-adds in fp32 (the spec rounds
    ``t * scale`` before the add)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py")), str(cc)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    variants = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(variants) == 5
    for v in variants:
        assert v["mma"] and not v["fma_f32"], v


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.zeros(4, 4, dtype=torch.float16)
    assert choose_backend(w).name == "torch", "auto never picks the interpreter"
    assert choose_backend(w, "triton").name == "triton"  # interpreter on, asked for by name
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match=r"triton.*CUDA tensor.*torch: available"):
        choose_backend(w, "triton")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        choose_backend(w, "cuda-magic")
