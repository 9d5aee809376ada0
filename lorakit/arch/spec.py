"""The data every architecture module produces: components and their alias tables."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    """A base tensor a LoRA module writes to.

    ``rows`` is a ``(start, stop)`` row slice of a fused weight (Flux ``qkv`` / ``linear1``,
    OpenCLIP ``in_proj_weight``). ``transform`` names a fixed re-layout of the delta:
    ``"swap_halves"`` (diffusers ``norm_out`` -> BFL ``adaLN_modulation``: shift/scale
    halves swapped) or ``"transpose"`` (HF ``text_projection`` -> OpenCLIP orientation).
    """

    key: str
    rows: tuple[int, int] | None = None
    transform: str | None = None
    # row sizes of the parts of a fused weight (Flux qkv: h,h,h; linear1: h,h,h,mlp), for
    # recognising kohya's split_qkv files (block-diagonal up, rank stored as parts x r)
    splits: tuple[int, ...] | None = field(default=None, compare=False)

    def bias_key(self) -> str | None:
        if self.key.endswith(".weight"):
            return self.key[: -len("weight")] + "bias"
        if self.key.endswith("in_proj_weight"):
            return self.key[: -len("weight")] + "bias"
        return None

    def describe(self) -> str:
        s = self.key
        if self.rows:
            s += f"[{self.rows[0]}:{self.rows[1]}]"
        if self.transform:
            s += f" ({self.transform})"
        return s


@dataclass(frozen=True)
class Block:
    """Logical rows ``rows`` of a single-file tensor are rows ``offset ...`` of real tensor ``key``
    (a diffusers tensor in a diffusers layout; the tensor itself in a single-file layout)."""

    key: str
    rows: tuple[int, int]
    offset: int = 0


# component id -> (label used in reports, which CLI strength drives it)
COMPONENTS: dict[str, tuple[str, str]] = {
    "unet": ("diffusion model (UNet / Flux transformer)", "model"),
    "clip_l": ("text encoder 1 (CLIP-L)", "clip"),
    "clip_g": ("text encoder 2 (OpenCLIP bigG)", "clip"),
    "t5xxl": ("T5-XXL text encoder", "clip"),
}

ARCH_NAMES = {
    "sd15": "SD1.5",
    "sdxl": "SDXL",
    "flux": "Flux.1",
    "clip_l": "stand-alone CLIP-L text encoder",
    "t5xxl": "stand-alone T5-XXL text encoder",
}


@dataclass
class Component:
    id: str
    prefix: str  # key prefix of this component inside the base file
    aliases: dict[str, Target] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return COMPONENTS[self.id][0]

    @property
    def strength_kind(self) -> str:
        return COMPONENTS[self.id][1]

    def add(self, names: list[str], target: Target) -> None:
        for n in names:
            # first writer wins: tables list the canonical spelling first
            self.aliases.setdefault(n, target)


@dataclass
class BaseSpec:
    arch: str  # sd15 | sdxl | flux | clip_l | t5xxl
    components: list[Component]
    details: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return ARCH_NAMES[self.arch]

    def component(self, cid: str) -> Component | None:
        return next((c for c in self.components if c.id == cid), None)

    def lookup(self, module: str) -> tuple[Component, Target] | None:
        for c in self.components:
            t = c.aliases.get(module)
            if t is not None:
                return c, t
        return None


def underscored(path: str) -> str:
    return path.replace(".", "_")
