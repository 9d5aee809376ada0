"""The model-level part of ``lorakit check``: the denoiser with merged weights against the base
plus runtime LoRA branches, in fp32, on fixed random inputs (see lorakit.check)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .engine import lowrank_segments, own_merge, reference
from .io.container import Container
from .models.flux import Flux, pack
from .models.layers import Conv2d, Linear, from_state_dict
from .models.unet import UNet
from .planner import Op, Plan

OTHER_COMPONENTS = ("cond_stage_model.", "conditioner.", "first_stage_model.", "text_encoders.", "vae.")
MEMORY_FRACTION = 0.5  # run when the fp32 denoiser fits in this share of RAM (CPU)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def _denoiser(src: Container, arch: str, prefix: str) -> tuple[nn.Module, dict[str, str]]:
    """The model (fp32, base weights) and {file key: parameter name} for its tensors."""
    all_shapes = src.shapes()
    names = {k: k[len(prefix):] for k in src.keys() if k.startswith(prefix) and not k.startswith(OTHER_COMPONENTS)}
    shapes = {n: all_shapes[k] for k, n in names.items()}
    cls = UNet if arch in ("sd15", "sdxl") else Flux
    with torch.device("meta"):
        wanted = set(cls(shapes).state_dict())
    state = {n: src.decode(k)[0] for k, n in names.items() if n in wanted}
    return from_state_dict(cls, state), {k: n for k, n in names.items() if n in state}


def _inputs(model: nn.Module, gen: torch.Generator) -> dict:
    if isinstance(model, UNet):
        downs = sum(1 for m in model.modules() if type(m).__name__ == "Downsample")
        side = 2 ** downs * 2
        args = {"x": torch.randn(2, model.cfg.in_channels, side, side, generator=gen),
                "t": torch.tensor([999.0, 500.0]), "context": torch.randn(2, 8, model.cfg.context_dim, generator=gen)}
        if model.cfg.adm_channels:
            args["y"] = torch.randn(2, model.cfg.adm_channels, generator=gen)
        return args
    cfg = model.cfg
    img, ids = pack(torch.randn(2, cfg.in_channels // 4, 8, 8, generator=gen))
    return {"img": img, "img_ids": ids, "txt": torch.randn(2, 8, cfg.context, generator=gen),
            "txt_ids": torch.zeros(2, 8, 3), "t": torch.tensor([0.9, 0.4]),
            "y": torch.randn(2, cfg.vec, generator=gen),
            "guidance": torch.tensor([3.5, 3.5]) if cfg.guidance else None}


def _branch(module: nn.Module, weight_ops: list[Op], d_weight: torch.Tensor | None,
            d_bias: torch.Tensor | None):
    """y -> y + LoRA(x) for one Linear / Conv2d: the factors when every op is plain low-rank
    (applied to x, never merged), else the reference full delta."""
    dev = module.weight.device
    segs = [((g.rows or (0,))[0], g.up.float().to(dev), g.down.float().to(dev), g.scale)
            for g in (lowrank_segments(weight_ops) or [])]
    conv = isinstance(module, nn.Conv2d)

    def place(out: torch.Tensor, part: torch.Tensor, r0: int) -> None:
        if conv:
            out[:, r0:r0 + part.shape[1]] += part
        else:
            out[..., r0:r0 + part.shape[-1]] += part

    def delta(x: torch.Tensor) -> torch.Tensor:
        rows = module.out_channels if conv else module.out_features
        shape = (x.shape[0], rows) if conv else (*x.shape[:-1], rows)
        out = None
        if segs:
            for r0, up, down, scale in segs:
                if conv:
                    z = F.conv2d(x, down.reshape(down.shape[0], *module.weight.shape[1:]), None,
                                 module.stride, module.padding)
                    part = F.conv2d(z, up.reshape(up.shape[0], -1, 1, 1)) * scale
                else:
                    part = F.linear(F.linear(x, down), up) * scale
                if out is None:
                    out = torch.zeros(shape + tuple(part.shape[2:]) if conv else shape, dtype=x.dtype,
                                      device=x.device)
                place(out, part, r0)
        elif d_weight is not None:
            out = (F.conv2d(x, d_weight, None, module.stride, module.padding) if conv
                   else F.linear(x, d_weight))
        if d_bias is not None:
            b = d_bias[None, :, None, None] if conv else d_bias
            out = b.expand(shape if not conv else out.shape) if out is None else out + b
        return out

    return delta


def model_level(src: Container, out: Container | None, the_plan: Plan, rounding: str, seed: int,
                device: torch.device) -> dict:
    """Denoiser outputs: base, base + runtime LoRA branches, lorakit's merge, the merge under test.
    Touched values are computed and loaded one tensor at a time, so memory stays at one fp32 model."""
    spec = the_plan.spec
    if spec.arch not in ("sd15", "sdxl", "flux"):
        return {"status": "skipped", "reason": f"no denoiser in a {spec.name} file"}
    prefix = spec.details.get("prefix", "")
    touched = {k: ops for k, ops in the_plan.ops.items() if k.startswith(prefix) and not k.startswith(OTHER_COMPONENTS)}
    if not touched:
        return {"status": "skipped", "reason": "the LoRAs change no tensor of the denoiser"}
    need = 4 * sum(math.prod(s) for k, s in src.shapes().items() if k.startswith(prefix))
    if device.type == "cpu" and need > MEMORY_FRACTION * _ram():
        return {"status": "skipped", "reason": f"the fp32 denoiser needs {need / 2**30:.1f} GiB; "
                                               "rerun with --no-model or on a larger machine"}
    try:
        model, names = _denoiser(src, spec.arch, prefix)
    except (KeyError, RuntimeError, ValueError) as e:
        return {"status": "skipped", "reason": f"lorakit's model code does not fit this file: {str(e)[:200]}"}
    model.to(device)
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in _inputs(model, torch.Generator().manual_seed(1234)).items()}

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).float().cpu()

    def load(key: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            params[names[key]].copy_(value.reshape(params[names[key]].shape))

    def ref_delta(key: str) -> torch.Tensor:
        w32 = src.decode(key)[0]
        return reference(w32, touched[key]) - w32

    base_out = run()
    # runtime: base weights + LoRA branches on Linear / Conv2d (the factors themselves when plain
    # low-rank); other touched parameters (norm scales, ...) take their reference values directly
    by_module: dict[str, dict[str, str]] = {}
    for key in touched:
        mod, _, leaf = names[key].rpartition(".")
        by_module.setdefault(mod, {})[leaf] = key
    for mod, leaves in by_module.items():
        m = modules[mod]
        if isinstance(m, (Linear, Conv2d)):
            wk, bk = leaves.get("weight"), leaves.get("bias")
            w_ops = touched[wk] if wk else []
            full = wk is not None and lowrank_segments(w_ops) is None
            m.delta = _branch(m, w_ops, ref_delta(wk).to(device) if full else None,
                              ref_delta(bk).to(device) if bk else None)
        else:
            for key in leaves.values():
                load(key, reference(src.decode(key)[0], touched[key]))
    runtime_out = run()
    for m in model.modules():
        if isinstance(m, (Linear, Conv2d)):
            m.delta = None
    for key, ops in touched.items():  # lorakit's own merge: the best a stored dtype allows
        _, codec, raw = src.decode(key)
        load(key, codec.decode(own_merge(key, raw, codec, ops, rounding, seed)))
    ideal_out = run()
    if out is None:
        merged_out = ideal_out
    else:
        for key in touched:
            load(key, out.decode(key)[0])
        merged_out = run()
    effect, floor, diff = _rel(runtime_out, base_out), _rel(ideal_out, runtime_out), _rel(merged_out, runtime_out)
    status = "FAIL" if diff > 2 * floor + 1e-5 else ("below-resolution" if effect < 3 * floor else "ok")
    return {"status": status, "model": type(model).__name__, "lora_effect": effect, "merged_vs_runtime": diff,
            "floor": floor, "rule": "merged_vs_runtime <= 2 * floor + 1e-5; effect >= 3 * floor to be visible",
            "inputs": {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}}
