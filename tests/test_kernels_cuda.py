"""The kernel on a real GPU: the claims the interpreter cannot prove (bf16 factors, hardware
conversions, full-size shapes), `merge --device cuda` on every golden case, and the patch API on
CUDA tensors. Skipped, with the reason, where no GPU is visible (benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import codecs
from lorakit.ops import Segment, Update, choose_backend, update_many_
from tests.golden_compare import ulp, verify
from tests.helpers import FP8, W_DTYPES, bits, case_command, cli, float64_reference, load_cases
from tests.helpers import differing as same
from tests.helpers import kernel_model as model

CASES = load_cases("cases.json")

pytestmark = pytest.mark.cuda
SUCCESS = [c for c in CASES if c["expect"]["exit"] == "success"]


def on(updates: list[Update], device: str) -> list[Update]:
    return [Update(u.w.to(device, copy=True), [Segment(s.up.to(device), s.down.to(device), s.scale, s.rows)
                                                for s in u.segments], u.key, u.codec) for u in updates]


@pytest.mark.parametrize("wdtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("fdtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_bit_exact_on_exact_sums_gpu(wdtype: torch.dtype, fdtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    updates = model(g, wdtype, fdtype)
    for rounding in ("nearest", "stochastic") if wdtype in FP8 else ("nearest",):
        ref, ker = on(updates, "cpu"), on(updates, "cuda")
        update_many_(ref, rounding=rounding, seed=3, backend="torch")
        update_many_(ker, rounding=rounding, seed=3, backend="triton")
        for r, k in zip(ref, ker):
            assert torch.equal(bits(k.w.cpu()), bits(r.w)), f"{r.key} {rounding}"
            assert k.out_of_range == r.out_of_range


@pytest.mark.parametrize("wdtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("fdtype", [torch.float16, torch.bfloat16], ids=str)
def test_full_size_random_against_float64(wdtype: torch.dtype, fdtype: torch.dtype) -> None:
    """Flux single-block linear1 (21504 x 3072) with a rank-64 LoRA on all rows and one on the q rows."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(21504, 3072, generator=g) * 0.02).to(wdtype)
    f = lambda *s: (torch.randn(s, generator=g) * 0.02).to(fdtype)  # noqa: E731
    u = Update(w, [Segment(f(21504, 64), f(64, 3072), 0.8), Segment(f(3072, 16), f(16, 3072), 1.5, (0, 3072))],
               key="single_blocks.0.linear1.weight", codec=codecs.scaled(wdtype, 0.01) if wdtype in FP8 else None)
    for rounding in ("nearest", "stochastic") if wdtype in FP8 else ("nearest",):
        ref, ker = on([u], "cpu"), on([u], "cuda")
        update_many_(ref, rounding=rounding, seed=1, backend="torch")
        update_many_(ker, rounding=rounding, seed=1, backend="triton")
        k = ker[0].w.cpu()
        assert float((bits(k) != bits(ref[0].w)).double().mean()) <= 1e-3
        if rounding == "nearest":
            exact, mag = float64_reference(u)
            ws = u.codec.scale or 1.0
            bound = 0.5 * ulp(exact / ws, wdtype) * ws + 83 * 2.0 ** -24 * mag
            assert bool(((k.double().reshape(exact.shape) * ws - exact).abs() <= bound).all())


def test_auto_picks_the_kernel_on_cuda() -> None:
    assert choose_backend(torch.zeros(2, 2, device="cuda", dtype=torch.float16)).name == "triton"


@pytest.mark.parametrize("case", SUCCESS, ids=[c["id"] for c in SUCCESS])
def test_merge_device_cuda(case: dict, zoo: Path, tmp_path: Path) -> None:
    needed = [case["base"], case["expect"]["output"]] + [lo["path"] for lo in case["loras"]]
    missing = [p for p in needed if not (zoo / p).is_file()]
    if missing:  # the device machine gets a zoo without SDXL (benchmarks/prepare_gpu_carry.sh)
        pytest.skip(f"zoo files not carried to this machine: {', '.join(missing)}")
    out = tmp_path / "merged.safetensors"
    res = cli(*case_command(case, zoo, out, extra=("--device", "cuda")))
    assert res.exit_code == 0, res.output
    verify(case, zoo, out)


def test_patch_on_cuda_tensors(zoo: Path) -> None:
    base = zoo / "base/flux/flux1_tiny_dev_fp8_e4m3fn_scaled.safetensors"
    lora = f"{zoo / 'flux/flux_aitoolkit_lora.safetensors'}:0.8"
    cpu = load_file(base)
    gpu = {k: v.cuda() for k, v in load_file(base).items()}
    original = {k: v.clone() for k, v in gpu.items()}
    lorakit.patch(cpu, [lora], seed=4)
    fresh = {k: v.clone() for k, v in original.items()}
    lorakit.patch(fresh, [lora.replace(":0.8", ":0.3")], seed=4)
    with lorakit.patch(gpu, [lora], seed=4) as h:
        assert h.backup_policy == "beside"
        differing = sum(int((bits(gpu[k].cpu()) != bits(cpu[k])).sum()) for k in cpu)
        assert differing <= 1e-3 * sum(v.numel() for v in cpu.values())
        h.set_strengths([0.3])
        assert same(gpu, fresh) == []
    assert same(gpu, original) == []
