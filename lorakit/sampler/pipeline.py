"""Text-to-image the way ComfyUI's KSampler does it, for SD1.5 / SDXL checkpoints and Flux.1 files.

SD (eps): noise = randn(latent, global generator seeded with the seed); x = noise * sqrt(1 + s0^2);
the U-Net sees x / sqrt(s^2 + 1) at the integer timestep nearest in log sigma; denoised = x - eps*s;
CFG in the denoised space; Euler steps x += (x - denoised)/s * (s_next - s). Latent / 0.18215
(SDXL 0.13025) into the VAE. Flux (flow): x = noise * s0 (empty latent); the transformer sees
(packed x, t = s, guidance); denoised = x - v*s; cfg 1 skips the negative pass; latent / 0.3611 +
0.1159 into the autoencoder. Conditioning follows ComfyUI's encoders (see lorakit.sampler.tokenize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch import detect, family_name
from ..errors import SampleError
from ..io.container import TensorDict
from ..io.safetensors import SafetensorsFile
from ..models.flux import Flux, pack, unpack
from ..models.layers import from_state_dict, timestep_embedding
from ..models.text import CLIPText, OpenCLIPText, T5Encoder
from ..models.unet import UNet
from ..models.vae import FLUX_LATENT, SD15_LATENT, SDXL_LATENT, AutoencoderKL, LatentFormat
from ..patching import patch
from ..planner import LoraSpec
from ..progress import Progress
from .schedule import Discrete, Flow, sigmas
from .tokenize import ClipTokenizer, T5Tokenizer, Tokens, clip_tokens, find, t5_tokens

# stored but not parameters: CLIP position ids (rebuilt; some merges hold bad floats there), OpenCLIP's
# logit scale, and T5's tied copy of shared.weight
DROP = ("embeddings.position_ids", "logit_scale", "encoder.embed_tokens.weight")


FLUX_EXTRAS = ("text_encoders.", "vae.", "first_stage_model.")  # not transformer weights
FLUX_VAE_PREFIXES = ("vae.", "first_stage_model.")


def peek(path: str) -> tuple[str, str]:
    """(architecture, denoiser key prefix) from the file's header alone: no tensor is read."""
    with SafetensorsFile(path) as f:
        spec = detect(f.shapes(), path)
    return spec.arch, spec.details.get("prefix", "")


def _resolve_dtype(opt: Options, arch: str) -> None:
    if opt.dtype is None:
        opt.dtype = torch.float32 if opt.device == "cpu" else (torch.bfloat16 if arch == "flux" else torch.float16)


def _tokenizers_first(opt: Options, *kinds: str) -> None:
    """Fail on missing tokenizer data before reading gigabytes of weights."""
    for kind in kinds:
        find(kind, opt.tokenizers)


def load(ckpt: str, loras: list[LoraSpec], opt: Options) -> SDPipeline | FluxPipeline:
    """The pipeline for one checkpoint file: SD1.5 / SDXL, or Flux.1 with its encoders and VAE inside."""
    arch, prefix = peek(ckpt)
    if arch not in ("sd15", "sdxl", "flux"):
        raise SampleError(f"{ckpt}: a {family_name(arch)} file is not a checkpoint to sample from")
    _tokenizers_first(opt, "clip", *(["t5"] if arch == "flux" else []))
    _resolve_dtype(opt, arch)
    sd = _read(ckpt, loras, opt.dtype)
    if arch == "flux":
        return FluxPipeline.from_checkpoint(ckpt, sd, prefix, opt)
    return SDPipeline(ckpt, sd, arch, prefix, opt)


@dataclass
class Options:
    prompt: str
    negative: str = ""
    steps: int = 20
    cfg: float | None = None  # default: 8 for SD, 1 for Flux
    seed: int = 0
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int | None = None  # default: 512 (SD1.5), 1024 (SDXL, Flux)
    height: int | None = None
    guidance: float = 3.5  # Flux.1-dev FluxGuidance
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: fp32 on the CPU; on a GPU fp16 for SD, bf16 for Flux
    tokenizers: str | None = None
    progress: bool | None = None
    notes: list[str] = field(default_factory=list)


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _compute_weights(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8 weights (scaled fp8: times their scale) in the compute dtype; everything else as is."""
    out, files = {}, TensorDict(sd)
    for k, v in sd.items():
        if files.is_aux(k):
            continue
        if v.is_floating_point():
            codec = files.codec(k)
            v = codec.decode(v) if codec.coarse else v  # fp8 is computed in the compute dtype
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _build(cls, sd: dict[str, torch.Tensor], device: str, dtype: torch.dtype, **kw):
    model = from_state_dict(cls, {k: v for k, v in sd.items() if not k.endswith(DROP)}, **kw)
    return model.to(device=device, dtype=dtype)


def _tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a file, each read once into its own memory (no whole-file buffer: peak
    memory stays at the file's size, not twice that)."""
    with SafetensorsFile(path) as f:
        return {k: f.get(k) for k in f.order}


def _read(path: str, loras: list[LoraSpec], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A whole file, with the LoRAs patched in (nothing is written), in the compute dtype."""
    tensors = _tensors(path)
    if loras:
        patch(tensors, loras, backup="none")
    return _compute_weights(tensors, dtype)


def _encode_clip(model, tokens: Tokens, empty: Tokens | None, penultimate: bool,
                 device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence [1, 77 * chunks, width], pooled [1, width]) of a prompt. ComfyUI's weighting:
    z = z_empty + w * (z - z_empty), per token, against the encoding of an empty prompt."""
    ids = torch.tensor(tokens.ids, device=device)
    with torch.no_grad():
        out = model(ids)
        seq = out.penultimate if penultimate else out.last
        w = torch.tensor(tokens.weights, device=device, dtype=seq.dtype)[..., None]
        if empty is not None and bool((w != 1).any()):
            e = model(torch.tensor(empty.ids[:1], device=device))
            z0 = e.penultimate if penultimate else e.last
            seq = z0 + w * (seq - z0)
    return seq.reshape(1, -1, seq.shape[-1]), out.pooled[:1]


def _euler(model_fn, x: torch.Tensor, sig: torch.Tensor, bar: Progress) -> torch.Tensor:
    for i in range(len(sig) - 1):
        denoised = model_fn(x, sig[i])
        d = (x - denoised) / sig[i]
        x = x + d * (sig[i + 1] - sig[i])
        bar.advance(1)
    return x


def _sample(denoise, cond: tuple, uncond: tuple | None, cfg: float, x: torch.Tensor, sig: torch.Tensor,
            opt: Options) -> torch.Tensor:
    """Euler over ``sig`` with CFG in denoised space (no negative pass when ``uncond`` is None)."""

    def model_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        d_cond = denoise(x, s, cond)
        if uncond is None:
            return d_cond
        d_uncond = denoise(x, s, uncond)
        return d_uncond + (d_cond - d_uncond) * cfg

    bar = Progress(opt.steps, "sampling", opt.progress, unit="steps")
    try:
        return _euler(model_fn, x, sig, bar)
    finally:
        bar.close()


def _vocab_fits(embedding: torch.Tensor | None, tokenizer_size: int, what: str, source: str) -> None:
    """A text encoder must embed every id its tokenizer produces (tiny test models often do not)."""
    rows = 0 if embedding is None else embedding.shape[0]
    if rows < tokenizer_size:
        raise SampleError(f"{source}: the {what} text encoder has {rows} token embeddings, the {what} tokenizer needs "
                          f"{tokenizer_size}; this file cannot encode prompts")


class SDPipeline:
    def __init__(self, ckpt: str, sd: dict[str, torch.Tensor], arch: str, prefix: str, opt: Options) -> None:
        self.arch, self.opt = arch, opt
        self.tok = ClipTokenizer(find("clip", opt.tokenizers))
        te = "cond_stage_model.transformer." if arch == "sd15" else "conditioner.embedders.0.transformer."
        _vocab_fits(sd.get(te + "text_model.embeddings.token_embedding.weight"), self.tok.size, "CLIP-L", ckpt)
        if arch == "sdxl":
            _vocab_fits(sd.get("conditioner.embedders.1.model.token_embedding.weight"), self.tok.size,
                        "OpenCLIP bigG", ckpt)
        dev, dt = opt.device, opt.dtype
        self.unet = _build(UNet, _sub(sd, prefix), dev, dt)
        vae = _sub(sd, "first_stage_model.")
        if not vae:
            raise SampleError(f"{ckpt}: no VAE (first_stage_model.*) in this checkpoint")
        self.vae = _build(AutoencoderKL, vae, dev, torch.float32)
        if self.arch == "sd15":
            self.clip_l = _build(CLIPText, _sub(sd, "cond_stage_model.transformer.text_model."), dev, dt,
                                 eos_id=self.tok.eos)
            self.latent = SD15_LATENT
        else:
            self.clip_l = _build(CLIPText, _sub(sd, "conditioner.embedders.0.transformer.text_model."), dev, dt,
                                 eos_id=self.tok.eos)
            self.clip_g = _build(OpenCLIPText, _sub(sd, "conditioner.embedders.1.model."), dev, dt)
            self.latent = SDXL_LATENT

    def condition(self, prompt: str, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = self.opt.device
        if self.arch == "sd15":  # CLIP-L's last layer, after the final LayerNorm
            return _encode_clip(self.clip_l, clip_tokens(self.tok, prompt), clip_tokens(self.tok, ""), False, dev)[0], None
        # SDXL: both encoders' penultimate layers side by side; y = bigG pooled + size embeddings
        seq_l, _ = _encode_clip(self.clip_l, clip_tokens(self.tok, prompt), clip_tokens(self.tok, ""), True, dev)
        seq_g, pooled = _encode_clip(self.clip_g, clip_tokens(self.tok, prompt, pad=0), clip_tokens(self.tok, "", pad=0),
                                     True, dev)
        context = torch.cat([seq_l, seq_g], dim=-1)
        phi = (self.unet.cfg.adm_channels - pooled.shape[-1]) // 6
        sizes = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=dev)
        y = torch.cat([pooled.float(), timestep_embedding(sizes, phi).reshape(1, -1)], dim=1)
        return context, y

    def sample(self) -> torch.Tensor:
        o = self.opt
        width = o.width or (512 if self.arch == "sd15" else 1024)
        height = o.height or width
        cfg = 8.0 if o.cfg is None else o.cfg
        cond = self.condition(o.prompt, width, height)
        uncond = self.condition(o.negative, width, height) if cfg != 1.0 else None
        sched = Discrete()
        sig = sigmas(sched, o.steps, o.scheduler)
        gen = torch.manual_seed(o.seed)  # ComfyUI: the global CPU generator, float32 noise
        noise = torch.randn((1, self.unet.cfg.in_channels, height // 8, width // 8), generator=gen, dtype=torch.float32)
        x = noise * math.sqrt(1.0 + float(sig[0]) ** 2)

        def eps_denoise(x: torch.Tensor, s: torch.Tensor, c: tuple) -> torch.Tensor:
            t = sched.timestep(s.reshape(1))
            inp = (x / torch.sqrt(s ** 2 + 1.0)).to(o.device, o.dtype)
            with torch.no_grad():
                eps = self.unet(inp, t.to(o.device), c[0], None if c[1] is None else c[1].to(o.dtype)).float().cpu()
            return x - eps * s

        return _decode(self.vae, _sample(eps_denoise, cond, uncond, cfg, x, sig, o), self.latent, o.device)


class FluxPipeline:
    """``parts``: the transformer (BFL names), CLIP-L (``text_model.*``), T5 (``encoder.*``, ``shared``)
    and autoencoder (``encoder.*`` / ``decoder.*``) state dicts, in the compute dtype."""

    def __init__(self, parts: dict[str, dict[str, torch.Tensor]], opt: Options,
                 sources: dict[str, str] | None = None) -> None:
        self.opt = opt
        dev, dt = opt.device, opt.dtype
        self.tok = ClipTokenizer(find("clip", opt.tokenizers))
        self.t5tok = T5Tokenizer(find("t5", opt.tokenizers))
        sources = sources or {}
        _vocab_fits(parts["clip_l"].get("text_model.embeddings.token_embedding.weight"), self.tok.size, "CLIP-L",
                    sources.get("clip_l", "the CLIP-L file"))
        _vocab_fits(parts["t5"].get("shared.weight"), self.t5tok.size, "T5-XXL", sources.get("t5", "the T5 file"))
        self.dit = _build(Flux, parts["unet"], dev, dt)
        self.clip_l = _build(CLIPText, _sub(parts["clip_l"], "text_model."), dev, dt, eos_id=self.tok.eos)
        self.t5 = _build(T5Encoder, parts["t5"], dev, dt)
        self.vae = _build(AutoencoderKL, {k: v.float() for k, v in parts["vae"].items()}, dev, torch.float32)
        self.schedule = Flow(1.15) if self.dit.cfg.guidance else Flow(None, 1000)

    @classmethod
    def from_files(cls, unet: str, clip_l: str, t5: str, vae: str, loras: list[LoraSpec], opt: Options) -> FluxPipeline:
        """The UNETLoader / DualCLIPLoader / VAELoader layout: one file each."""
        _tokenizers_first(opt, "clip", "t5")
        arch, prefix = peek(unet)
        if arch != "flux":
            raise SampleError(f"{unet}: --unet must be a Flux.1 transformer, this is {family_name(arch)}")
        _resolve_dtype(opt, arch)
        sd = _read(unet, loras, opt.dtype)
        parts = {"unet": {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)
                          and not k.startswith(FLUX_EXTRAS)},
                 "clip_l": _read(clip_l, loras, opt.dtype), "t5": _read(t5, loras, opt.dtype),
                 "vae": _compute_weights(_tensors(vae), torch.float32)}
        return cls(parts, opt, {"clip_l": clip_l, "t5": t5})

    @classmethod
    def from_checkpoint(cls, ckpt: str, sd: dict[str, torch.Tensor], prefix: str, opt: Options) -> FluxPipeline:
        """One file with everything (ComfyUI's Flux checkpoints): text encoders and VAE under their prefixes."""
        parts = {"unet": {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)
                          and not k.startswith(FLUX_EXTRAS)},
                 "clip_l": _sub(sd, "text_encoders.clip_l.transformer."),
                 "t5": _sub(sd, "text_encoders.t5xxl.transformer."),
                 "vae": next((v for p in FLUX_VAE_PREFIXES if (v := _sub(sd, p))), {})}
        missing = [n for n, d in parts.items() if not d]
        if missing:
            raise SampleError(f"{ckpt}: a Flux.1 file without {', '.join(missing)}; give --unet, --clip-l, --t5 "
                              "and --vae instead")
        return cls(parts, opt, {"clip_l": ckpt, "t5": ckpt})

    def condition(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.opt.device
        pooled = _encode_clip(self.clip_l, clip_tokens(self.tok, prompt), None, False, dev)[1]
        tokens = t5_tokens(self.t5tok, prompt)
        ids = torch.tensor(tokens.ids, device=dev)
        with torch.no_grad():
            txt = self.t5(ids)
            w = torch.tensor(tokens.weights, device=dev, dtype=txt.dtype)[..., None]
            if bool((w != 1).any()):
                empty = self.t5(torch.tensor(t5_tokens(self.t5tok, "", min_length=ids.shape[1]).ids, device=dev))
                txt = empty + w * (txt - empty)
        return txt, pooled

    def sample(self) -> torch.Tensor:
        o = self.opt
        width = o.width or 1024
        height = o.height or width
        cfg = 1.0 if o.cfg is None else o.cfg
        cond = self.condition(o.prompt)
        uncond = self.condition(o.negative) if cfg != 1.0 else None
        sig = sigmas(self.schedule, o.steps, o.scheduler)
        gen = torch.manual_seed(o.seed)
        noise = torch.randn((1, self.dit.cfg.in_channels // 4, height // 8, width // 8), generator=gen,
                            dtype=torch.float32)
        x = noise * float(sig[0])  # CONST noise scaling on an empty latent
        guidance = torch.tensor([o.guidance], device=o.device) if self.dit.cfg.guidance else None

        def v_denoise(x: torch.Tensor, s: torch.Tensor, c: tuple) -> torch.Tensor:
            img, ids = pack(x.to(o.device, o.dtype))
            txt_ids = torch.zeros(1, c[0].shape[1], 3, device=o.device)
            with torch.no_grad():
                v = self.dit(img, ids, c[0], txt_ids, s.reshape(1).to(o.device), c[1], guidance)
            return x - unpack(v.float().cpu(), x.shape[2], x.shape[3]) * s

        return _decode(self.vae, _sample(v_denoise, cond, uncond, cfg, x, sig, o), FLUX_LATENT, o.device)


def _decode(vae: AutoencoderKL, latent: torch.Tensor, fmt: LatentFormat, device: str) -> torch.Tensor:
    z = latent / fmt.scale + fmt.shift
    with torch.no_grad():
        return vae.decode(z.to(device)).float().cpu()[0]


def describe(opt: Options, files: dict[str, str], loras: list[LoraSpec], width: int, height: int, cfg: float) -> str:
    """The A1111-style ``parameters`` text most image viewers and UIs read."""
    lines = [opt.prompt]
    if opt.negative:
        lines.append(f"Negative prompt: {opt.negative}")
    fields = [f"Steps: {opt.steps}", f"Sampler: {opt.sampler}", f"Schedule type: {opt.scheduler}", f"CFG scale: {cfg}",
              f"Seed: {opt.seed}", f"Size: {width}x{height}",
              "Model: " + ", ".join(Path(p).name for p in files.values() if p)]
    if loras:
        fields.append("LoRAs: " + ", ".join(f"{Path(x.path).name}:{x.model_strength}:{x.clip}" for x in loras))
    return "\n".join(lines + [", ".join(fields)])
