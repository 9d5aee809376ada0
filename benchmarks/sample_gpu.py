"""Denoising speed of lorakit's model code with random weights at full size (no weights can be
downloaded here, so this says nothing about image quality).

  SD1.5 U-Net (shapes from the real checkpoint's manifest), 512x512, Euler 20 steps, cfg 8 (cond +
  uncond in one batch of 2), fp16;  Flux.1-dev transformer, 1024x1024 (4096 image + 256 text
  tokens), 20 steps, cfg 1, guidance 3.5, bf16.  Reports it/s (median of the steps after a warm-up);
  with --diffusers and diffusers importable, diffusers' model with the same shapes and dtype in the
  same run.

    python benchmarks/sample_gpu.py [--models sd15 flux] [--steps 20] [--diffusers]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakit.models.flux import Flux, pack  # noqa: E402
from lorakit.sampler.schedule import FLUX_DEV, Discrete, sigmas  # noqa: E402
from lorakit.models.unet import UNet  # noqa: E402


def manifest(name: str, prefix: str, manifests: Path) -> dict[str, tuple[int, ...]]:
    m = json.loads((manifests / name).read_text())
    return {k[len(prefix):]: tuple(v[0]) for k, v in m.items() if k.startswith(prefix)}


def random_model(cls, shapes: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Built on the meta device, then filled with N(0, 0.02) directly in ``dtype`` on ``device``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(shapes)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def steps_per_second(step, n: int, device: str) -> tuple[float, list[float]]:
    times = []
    for _ in range(n + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times[1:]), times[1:]


def bench_sd15(args, device: str) -> dict:
    shapes = manifest("sd15_v1-5-pruned-emaonly.json", "model.diffusion_model.", args.manifests)
    unet = random_model(UNet, shapes, torch.float16, device)
    sig = sigmas(Discrete(), args.steps)
    x = torch.randn(2, 4, args.sd_size // 8, args.sd_size // 8, device=device, dtype=torch.float16)
    ctx = torch.randn(2, 77, unet.cfg.context_dim, device=device, dtype=torch.float16)
    t = torch.tensor([999.0, 999.0], device=device)
    with torch.no_grad():
        rate, _ = steps_per_second(lambda: unet(x, t, ctx), args.steps, device)
    out = {"model": "SD1.5 U-Net", "size": args.sd_size, "dtype": "fp16", "batch": 2, "lorakit_it_s": rate,
           "sigmas": len(sig) - 1}
    if args.diffusers:
        out["diffusers_it_s"] = _diffusers_sd15(args, device, x, t, ctx)
    unet = None  # free the GPU memory before the diffusers model
    return out


def _diffusers_sd15(args, device, x, t, ctx) -> float | str:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return "diffusers not installed"
    model = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                 attention_head_dim=8).to(device, torch.float16).eval()
    with torch.no_grad():
        rate, _ = steps_per_second(lambda: model(x, t, ctx), args.steps, device)
    return rate


def bench_flux(args, device: str) -> dict:
    shapes = manifest("flux1-dev.json", "", args.manifests)
    dit = random_model(Flux, shapes, torch.bfloat16, device)
    side = args.flux_size // 8
    img, ids = pack(torch.randn(1, 16, side, side, device=device, dtype=torch.bfloat16))
    txt = torch.randn(1, 256, dit.cfg.context, device=device, dtype=torch.bfloat16)
    txt_ids = torch.zeros(1, 256, 3, device=device)
    y = torch.randn(1, dit.cfg.vec, device=device, dtype=torch.bfloat16)
    t, g = torch.tensor([1.0], device=device), torch.tensor([3.5], device=device)
    with torch.no_grad():
        rate, _ = steps_per_second(lambda: dit(img, ids, txt, txt_ids, t, y, g), args.steps, device)
    out = {"model": "Flux.1-dev transformer", "size": args.flux_size, "dtype": "bf16", "batch": 1,
           "lorakit_it_s": rate, "sigmas": len(sigmas(FLUX_DEV, args.steps)) - 1}
    dit = None  # free the GPU memory before the diffusers model
    if args.diffusers:
        out["diffusers_it_s"] = _diffusers_flux(args, device, img, ids, txt, txt_ids, t, y, g)
    return out


def _diffusers_flux(args, device, img, ids, txt, txt_ids, t, y, g) -> float | str:
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError:
        return "diffusers not installed"
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        rate, _ = steps_per_second(lambda: model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y,
                                                 timestep=t, img_ids=ids[0], txt_ids=txt_ids[0], guidance=g),
                                   args.steps, device)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["sd15", "flux"], choices=["sd15", "flux"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sd-size", type=int, default=512)
    p.add_argument("--flux-size", type=int, default=1024)
    p.add_argument("--diffusers", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--manifests", type=Path,
                   default=Path(os.environ.get("LORAKIT_MANIFESTS", ROOT.parent / "shared" / "manifests")))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows = []
    for m in args.models:
        row = bench_sd15(args, args.device) if m == "sd15" else bench_flux(args, args.device)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"# {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    if args.json:
        args.json.write_text(json.dumps({"device": card, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
