"""A minimal sampler that checks patched models: model code for the single-file layouts, tokenizers,
ComfyUI-exact schedules and Euler sampling, and ``sample()`` behind ``lorakit sample``."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from .._version import __version__
from ..errors import SampleError
from ..outputs import check_output
from ..planner import LoraSpec
from .pipeline import FluxPipeline, Options, SDPipeline, describe, load
from .png import save_png, to_rgb

__all__ = ["sample", "Options", "SampleError"]


MAX_STEPS = 10_000
MAX_SIDE = 16_384


def _check_options(opt: Options) -> None:
    """Every number one line when it is wrong, before any file is read."""
    if opt.sampler != "euler":
        raise SampleError(f"sampler {opt.sampler!r} is not implemented; lorakit samples with euler")
    if isinstance(opt.steps, bool) or not isinstance(opt.steps, int) or not 1 <= opt.steps <= MAX_STEPS:
        raise SampleError(f"--steps must be a whole number from 1 to {MAX_STEPS}, not {opt.steps!r}")
    for name, v in (("--cfg", opt.cfg), ("--guidance", opt.guidance)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and abs(v) <= 1e4):
            raise SampleError(f"{name} must be a finite number within +-1e4, not {v!r}")
    for name, v in (("--width", opt.width), ("--height", opt.height)):
        if v is not None and not (isinstance(v, int) and 16 <= v <= MAX_SIDE and v % 16 == 0):
            raise SampleError(f"{name} must be a multiple of 16 from 16 to {MAX_SIDE} pixels, not {v!r}")
    if not isinstance(opt.seed, int) or not -2 ** 63 <= opt.seed < 2 ** 64:
        raise SampleError(f"--seed must be a whole number that fits 64 bits, not {opt.seed!r}")


def sample(out: str | os.PathLike, opt: Options, *, ckpt: str | None = None, unet: str | None = None,
           clip_l: str | None = None, t5: str | None = None, vae: str | None = None,
           loras: list[LoraSpec] = (), force: bool = False) -> dict:
    """Generate one image and write it as PNG with its parameters; returns a report."""
    out_p = Path(out)
    inputs = [Path(p) for p in (ckpt, unet, clip_l, t5, vae) if p] + [Path(x.path) for x in loras]
    check_output(out_p, base=None, others=inputs, force=force, suffixes=(".png",))
    _check_options(opt)
    t0 = time.monotonic()
    if ckpt:
        if unet or clip_l or t5 or vae:
            raise SampleError("give a checkpoint, or --unet/--clip-l/--t5/--vae for Flux, not both")
        pipe = load(ckpt, list(loras), opt)
        files = {"checkpoint": ckpt}
        sd15 = isinstance(pipe, SDPipeline) and pipe.arch == "sd15"
        width = opt.width or (512 if sd15 else 1024)
        cfg = (8.0 if isinstance(pipe, SDPipeline) else 1.0) if opt.cfg is None else opt.cfg
    else:
        missing = [n for n, v in (("--unet", unet), ("--clip-l", clip_l), ("--t5", t5), ("--vae", vae)) if not v]
        if missing:
            raise SampleError(f"missing {', '.join(missing)}: Flux needs the transformer, CLIP-L, T5 and autoencoder files")
        pipe = FluxPipeline.from_files(unet, clip_l, t5, vae, list(loras), opt)
        files = {"unet": unet, "clip_l": clip_l, "t5": t5, "vae": vae}
        width = opt.width or 1024
        cfg = 1.0 if opt.cfg is None else opt.cfg
    height = opt.height or width
    if width % 16 or height % 16:
        raise SampleError(f"width and height must be multiples of 16, got {width}x{height}")
    opt.width, opt.height = width, height
    image = pipe.sample()
    if not bool(torch.isfinite(image).all()):
        raise SampleError("the decoded image holds NaN/inf: the model (or a LoRA) produced non-finite values")
    report = {"files": files, "loras": [{"file": Path(x.path).name, "model_strength": x.model_strength,
                                                            "clip_strength": x.clip} for x in loras],
              "prompt": opt.prompt, "negative": opt.negative, "steps": opt.steps, "cfg": cfg, "seed": opt.seed,
              "sampler": opt.sampler, "scheduler": opt.scheduler, "width": width, "height": height,
              "guidance": opt.guidance, "device": opt.device, "dtype": str(opt.dtype).replace("torch.", ""),
              "version": __version__}
    save_png(out_p, to_rgb(image), {"parameters": describe(opt, files, list(loras), width, height, cfg),
                                    "lorakit": json.dumps(report, separators=(",", ":"))})
    return {"out": str(out_p), **report, "seconds": round(time.monotonic() - t0, 2)}
