"""Whole-model LoRA patch on one GPU: lorakit's grouped kernel against the roofline and peer-style paths.

For full-size Flux.1-dev (304 block Linears) and SDXL (722 transformer Linears) shapes, random
data, one LoRA per weight, every (dtype, rank) asked for, this measures in the same run:

  copy      device-to-device copy of the weights' bytes (read + write): the roofline
  lorakit   the grouped kernel (one launch for the whole model; tables prepared once, as a patch
            handle re-runs them)
  addmm     per layer ``W.addmm_(B, A, alpha=s)`` (fp8 weights: through bf16, as addmm has no fp8)
  comfy     per key, ComfyUI's described math: fp32 copy, fp32 delta, add, round back (fp8: its
            fp16-then-stochastic rounding with a per-key generator); written here from the
            description in ../shared/docs/comfyui.md, not ComfyUI's code

and prints ms (median), GB/s, % of copy, speed-up of lorakit over each baseline, and the max error
in ulps of the stored dtype vs a float64 reference (on three sample layers per model). Then the hot
swap: ``PatchHandle.set_strengths`` on Flux.1-dev fp8 against a single patch.

    python benchmarks/patch_gpu.py [--models flux sdxl] [--ranks 16 64 128] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/patch_gpu.py --device cpu --shrink 32 --reps 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lorakit  # noqa: E402
from lorakit.io.safetensors import save_file  # noqa: E402
from lorakit.ops import Prepared, Segment, Update  # noqa: E402
from tests.golden_compare import ulp  # noqa: E402

DTYPES = {"fp16": (torch.float16, "nearest"), "bf16": (torch.bfloat16, "nearest"),
          "fp8": (torch.float8_e4m3fn, "nearest"), "fp8-stochastic": (torch.float8_e4m3fn, "stochastic")}
FP8_FORMAT = {torch.float8_e4m3fn: (4, 3, 7, 448.0), torch.float8_e5m2: (5, 2, 15, 57344.0)}


def model_shapes(name: str, manifests: Path, shrink: int) -> list[tuple[str, tuple[int, int]]]:
    """(key, [out, in]) of the benchmark's target set, from the real checkpoint's manifest."""
    if name == "flux":
        m = json.loads((manifests / "flux1-dev.json").read_text())
        keys = [k for k, (shape, _) in m.items() if k.startswith(("double_blocks.", "single_blocks."))
                and k.endswith(".weight") and len(shape) == 2]
        expect = 304
    else:
        m = json.loads((manifests / "sdxl_base_1.0.json").read_text())
        keys = [k for k, (shape, _) in m.items() if k.startswith("model.diffusion_model.") and k.endswith(".weight")
                and len(shape) == 2 and (".transformer_blocks." in k or k.endswith(("proj_in.weight", "proj_out.weight")))]
        expect = 722
    assert len(keys) == expect, f"{name}: {len(keys)} target weights, expected {expect}"
    return [(k, (max(1, m[k][0][0] // shrink), max(1, m[k][0][1] // shrink))) for k in sorted(keys)]


def timed(fn, reps: int, device: torch.device) -> float:
    """Median wall time in ms over ``reps`` runs after one warm-up."""
    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def comfy_like_fp8(x32: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The stochastic fp8 rounding ComfyUI's notes describe: fp16 first, then floor(mantissa + rand)."""
    ebits, mbits, bias, top = FP8_FORMAT[dtype]
    gen = torch.Generator(device=x32.device).manual_seed(seed)
    x = x32.half()
    sign, a = torch.sign(x), x.abs()
    e = torch.clamp(torch.floor(torch.log2(a)) + bias, 0, 2 ** ebits - 1)
    normal = e > 0
    m = torch.where(normal, (a / torch.exp2(e - bias) - 1.0) * 2 ** mbits, a / 2.0 ** (1 - bias - mbits))
    m = torch.floor(m + torch.rand(x.shape, dtype=torch.float16, device=x.device, generator=gen))
    v = torch.where(normal, torch.exp2(e - bias) * (1.0 + m / 2 ** mbits), m * 2.0 ** (1 - bias - mbits))
    return (sign * v.clamp(max=top)).to(dtype)


def comfy_style(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, s: float, rounding: str, seed: int) -> None:
    w32 = w.float()
    w32 += (s * (up.float() @ down.float()))
    if rounding == "stochastic":
        w.copy_(comfy_like_fp8(w32, w.dtype, seed))
    elif w.dtype in FP8_FORMAT:
        w.copy_(w32.clamp(-448.0, 448.0).to(w.dtype))
    else:
        w.copy_(w32.to(w.dtype))


def addmm_style(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, s: float) -> None:
    if w.dtype in FP8_FORMAT:
        w.copy_(w.to(torch.bfloat16).addmm_(up.bfloat16(), down.bfloat16(), alpha=s).clamp(-448.0, 448.0))
    else:
        w.addmm_(up.to(w.dtype), down.to(w.dtype), alpha=s)


def bench_model(name: str, args, device: torch.device, backend: str) -> list[dict]:
    shapes = model_shapes(name, args.manifests, args.shrink)
    rows = []
    bw = None
    for dname in args.dtypes:
        wdtype, rounding = DTYPES[dname]
        g = torch.Generator(device=device).manual_seed(0)
        weights = [(torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) * 0.02).to(wdtype)
                   for _, s in shapes]
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        if bw is None:  # the roofline: a copy of 2 GiB (or the model's bytes if smaller), read + write
            n = min(nbytes, 2 << 30)
            src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
            copy_ms = timed(lambda: dst.copy_(src), args.reps, device)
            bw = 2 * n / (copy_ms * 1e-3)
            del src, dst
        roof_ms = 2 * nbytes / bw * 1e3
        sample = sorted(range(len(shapes)), key=lambda i: weights[i].numel())
        sample = sorted({sample[0], sample[len(sample) // 2], sample[-1]})
        pristine = {i: weights[i].clone() for i in sample}
        fdtype = torch.float16 if wdtype == torch.float16 else torch.bfloat16
        for rank in args.ranks:
            factors = [((torch.randn(s[0], rank, generator=g, device=device) * 0.02).to(fdtype),
                        (torch.randn(rank, s[1], generator=g, device=device) * 0.02).to(fdtype)) for _, s in shapes]
            scale = 1.0
            updates = [Update(w, [Segment(u, d, scale)], key=k) for (k, _), w, (u, d) in zip(shapes, weights, factors)]
            t = time.perf_counter()
            prepared = Prepared(updates, rounding=rounding, seed=1, backend=backend)
            prep_ms = (time.perf_counter() - t) * 1e3
            methods = {
                "lorakit": prepared.run,
                "addmm": lambda: [addmm_style(w, u, d, scale) for w, (u, d) in zip(weights, factors)],
                "comfy": lambda: [comfy_style(w, u, d, scale, rounding, i)
                                  for i, (w, (u, d)) in enumerate(zip(weights, factors))],
            }
            ms = {m: timed(fn, args.reps, device) for m, fn in methods.items()}
            err = {}
            for m in methods:
                worst = 0.0
                for i in sample:
                    weights[i].copy_(pristine[i])
                    u, d = factors[i]
                    if m == "lorakit":
                        Prepared([Update(weights[i], [Segment(u, d, scale)], key=shapes[i][0])], rounding=rounding,
                                 seed=1, backend=backend).run()
                    elif m == "addmm":
                        addmm_style(weights[i], u, d, scale)
                    else:
                        comfy_style(weights[i], u, d, scale, rounding, i)
                    exact = pristine[i].double() + scale * (u.double() @ d.double())
                    worst = max(worst, float(((weights[i].double() - exact).abs() / ulp(exact, wdtype)).max()))
                err[m] = worst
            row = {"model": name, "dtype": dname, "rank": rank, "weights": len(shapes), "GB": nbytes / 1e9,
                   "copy_GBps": bw / 1e9, "roofline_ms": roof_ms, "prepare_ms": prep_ms,
                   **{f"{m}_ms": v for m, v in ms.items()}, **{f"{m}_max_ulp": v for m, v in err.items()}}
            rows.append(row)
            print(format_row(row), flush=True)
            factors.clear()  # free this rank's factors (and the tables pointing at them) before the next
            updates.clear()
            prepared = methods = None
        weights.clear()  # free this dtype's weights before the next
        pristine.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_row(r: dict) -> str:
    lk = r["lorakit_ms"]
    gbps = 2 * r["GB"] / (lk * 1e-3)
    return (f"| {r['model']} | {r['dtype']} | {r['rank']} | {r['roofline_ms']:.2f} | {lk:.2f} | {gbps:.0f} | "
            f"{100 * r['roofline_ms'] / lk:.0f} % | {r['addmm_ms']:.2f} ({r['addmm_ms'] / lk:.1f}x) | "
            f"{r['comfy_ms']:.1f} ({r['comfy_ms'] / lk:.1f}x) | {r['lorakit_max_ulp']:.2f} / "
            f"{r['addmm_max_ulp']:.1f} / {r['comfy_max_ulp']:.2f} |")


HEADER = ("| model | dtype | rank | roofline ms | lorakit ms | GB/s | % of copy | per-layer addmm ms (lorakit speed-up) | "
          "ComfyUI-style fp32 ms (speed-up) | max ulp lorakit / addmm / comfy |\n|---|---|---|---|---|---|---|---|---|---|")


def hot_swap(args, device: torch.device, backend: str) -> dict:
    """PatchHandle on Flux.1-dev fp8 (real API, a rank-16 LoRA file): single patch vs set_strengths."""
    shapes = model_shapes("flux", args.manifests, args.shrink)
    g = torch.Generator(device=device).manual_seed(2)
    sd = {k: (torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) * 0.02).to(torch.float8_e4m3fn)
          for k, s in shapes}
    lora = {}
    for k, (out, inn) in shapes:
        name = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        lora[f"{name}.lora_down.weight"] = (torch.randn(16, inn) * 0.02).to(torch.bfloat16)
        lora[f"{name}.lora_up.weight"] = (torch.randn(out, 16) * 0.02).to(torch.bfloat16)
        lora[f"{name}.alpha"] = torch.tensor(16.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lora.safetensors")
        save_file(lora, path, {})
        t = time.perf_counter()
        h = lorakit.patch(sd, [path], backend=backend, backup="beside" if device.type == "cuda" else "auto")
        first_ms = (time.perf_counter() - t) * 1e3

    def single() -> None:
        h.restore()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        h.apply()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)

    times: list[float] = []
    for _ in range(args.reps + 1):
        single()
    patch_ms = statistics.median(times[1:])
    strengths = iter([0.5, 1.0] * (args.reps + 1))
    swap_ms = timed(lambda: h.set_strengths([next(strengths)]), args.reps, device)
    h.close()
    return {"first_patch_ms_incl_load_and_plan": first_ms, "patch_ms": patch_ms, "set_strengths_ms": swap_ms,
            "ratio": swap_ms / patch_ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["flux", "sdxl"], choices=["flux", "sdxl"])
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 128])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shrink", type=int, default=1, help="divide every dimension (smoke tests only)")
    p.add_argument("--manifests", type=Path,
                   default=Path(os.environ.get("LORAKIT_MANIFESTS", ROOT.parent / "shared" / "manifests")))
    p.add_argument("--no-swap", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    backend = "auto" if device.type == "cuda" else ("triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {card}, torch {torch.__version__}, backend {backend}, {time.strftime('%Y-%m-%d')}", flush=True)
    print(HEADER, flush=True)
    rows = [r for m in args.models for r in bench_model(m, args, device, backend)]
    swap = None if args.no_swap else hot_swap(args, device, backend)
    if swap:
        print(f"\nhot swap, Flux.1-dev fp8 e4m3fn, rank 16 (PatchHandle, backup on the GPU): patch "
              f"{swap['patch_ms']:.2f} ms, set_strengths {swap['set_strengths_ms']:.2f} ms "
              f"({swap['ratio']:.2f}x); first patch incl. LoRA load + plan {swap['first_patch_ms_incl_load_and_plan']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps({"device": card, "torch": torch.__version__, "rows": rows, "hot_swap": swap},
                                        indent=1))


if __name__ == "__main__":
    main()
