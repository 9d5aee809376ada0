"""The data the model families are made of: targets, conventions, components, families.

* A ``Target`` is a base tensor a LoRA module writes to (a row slice of a fused weight, a fixed
  re-layout).
* A *module space* names a component's modules one way: ``native`` (the base file's own names),
  ``diffusers``, or a family-specific space (XLabs processors, HF CLIP's short names, ...). A
  component holds, per space, module name -> ``Target``.
* A ``Convention`` is one LoRA naming: which component, which prefix, ``_`` or ``.`` between path
  parts, which module space it spells, and how it writes factor roles and alpha. Every LoRA name a
  component answers to is ``(convention, module, target)`` (an ``Alias``), so the same table reads
  a file and could write one. Two conventions claiming one name for two targets is an error when
  the table is built.
* A ``Family`` is one record per architecture: the slots its components live in, the signature
  that tells its files apart from look-alikes, the LoRA-side signals, and its diffusers view.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import KeyMapError

Shapes = dict[str, tuple[int, ...]]


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
class Split:
    """One LoRA module over several base tensors: the module's output rows are ``parts`` in order
    (a LoRA trained on a fused ``to_qkv``, applied to a base that stores q, k and v apart). The
    inverse of a row-sliced ``Target``; the planner gives each part its rows of the change."""

    parts: tuple[Target, ...]

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)


@dataclass(frozen=True)
class Block:
    """Logical rows ``rows`` of a single-file tensor are rows ``offset ...`` of real tensor ``key``
    (a diffusers tensor in a diffusers layout; the tensor itself in a single-file layout)."""

    key: str
    rows: tuple[int, int]
    offset: int = 0


@dataclass(frozen=True)
class Kind:
    """A kind of component: its id, its words in reports, and which CLI strength drives it."""

    id: str
    label: str
    strength: str  # "model" or "clip"


DENOISER = Kind("denoiser", "diffusion model", "model")  # families name it: U-Net, transformer
CLIP_L = Kind("clip_l", "CLIP-L text encoder", "clip")
CLIP_G = Kind("clip_g", "OpenCLIP bigG text encoder", "clip")
T5XXL = Kind("t5xxl", "T5-XXL text encoder", "clip")
VAE = Kind("vae", "VAE", "none")  # LoRAs never change it; listed so reports show the whole file
KINDS = {k.id: k for k in (DENOISER, CLIP_L, CLIP_G, T5XXL, VAE)}


@dataclass(frozen=True)
class Convention:
    """One LoRA naming of one component (see the module docstring).

    ``roles`` names the factor spelling used when writing (``lorakit.formats.roles``); ``alpha`` is
    where the naming keeps alpha: ``tensor`` (``.alpha``), ``metadata`` (PEFT
    ``lora_adapter_metadata``) or ``none`` (scale 1). ``roots`` are the leading module names that
    identify a bare (prefix-less) naming when no table entry matches."""

    name: str
    kind: str
    prefix: str
    sep: str
    space: str
    roles: str = "kohya"
    alpha: str = "tensor"
    roots: tuple[str, ...] = ()

    def spell(self, module: str) -> str:
        return self.prefix + (module.replace(".", "_") if self.sep == "_" else module)

    def claims(self) -> tuple[str, ...]:
        """Name prefixes that put an unknown name into this convention's component."""
        return (self.prefix,) if self.prefix else self.roots


@dataclass(frozen=True)
class Alias:
    convention: Convention
    module: str  # in the convention's space
    target: Target | Split


@dataclass
class Component:
    """One component found in a base file: its module spaces and the names LoRAs give them."""

    kind: Kind
    prefix: str  # key prefix of this component inside the base file
    spaces: dict[str, dict[str, Target | Split]]
    conventions: tuple[Convention, ...]
    label: str = ""  # the family's word for it ("U-Net", "transformer"); the kind's otherwise
    aliases: dict[str, Alias] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.label = self.label or self.kind.label
        for conv in self.conventions:
            for module, target in self.spaces.get(conv.space, {}).items():
                name = conv.spell(module)
                seen = self.aliases.get(name)
                if seen is None:
                    self.aliases[name] = Alias(conv, module, target)
                elif seen.target != target:
                    raise KeyMapError(f"LoRA name {name!r} would address both {seen.target.describe()} "
                                      f"({seen.convention.name}) and {target.describe()} ({conv.name})")

    @property
    def id(self) -> str:
        return self.kind.id

    @property
    def strength_kind(self) -> str:
        return self.kind.strength


@dataclass(frozen=True)
class Slot:
    """Where a family's component lives in a single file and how its tables are built.

    ``prefixes`` are tried in order; the component is present when some key starts with
    ``prefix + probe``. ``build(shapes, prefix)`` returns the component's module spaces."""

    kind: Kind
    prefixes: tuple[str, ...]
    build: Callable[[Shapes, str], dict[str, dict[str, Target]]]
    conventions: tuple[Convention, ...]
    probe: str = ""
    claims: tuple[str, ...] = ()  # more name prefixes of this component no convention spells
    label: str = ""  # the family's word for the component; the kind's label otherwise

    @property
    def word(self) -> str:
        return self.label or self.kind.label

    def present(self, keys: list[str]) -> str | None:
        return next((p for p in self.prefixes if any(k.startswith(p + self.probe) for k in keys)), None)

    def component(self, shapes: Shapes, prefix: str) -> Component:
        return Component(self.kind, prefix, self.build(shapes, prefix), self.conventions, self.word)

    def name_claims(self) -> list[str]:
        return [c for conv in self.conventions for c in conv.claims()] + list(self.claims)


@dataclass(frozen=True)
class Signature:
    """Keys (relative to the main component's prefix; a trailing ``.`` means "any key under it")
    that a file of the family has. The family whose signature matches with the most keys wins,
    so a look-alike (SDXL vs SD1.5) needs only one more key, never an edit of the other record."""

    all_of: tuple[str, ...]

    def matches(self, keys: set[str], prefix: str) -> bool:
        return all(_has(keys, prefix + k) for k in self.all_of)


def _has(keys: set[str], key: str) -> bool:
    return any(k.startswith(key) for k in keys) if key.endswith(".") else key in keys


@dataclass(frozen=True)
class Family:
    """One architecture. ``slots[0]`` is the main component (the denoiser, or the text encoder of a
    stand-alone encoder file); the rest are optional single-file parts.

    ``lora_signals``: regexes whose matches among a LoRA's keys count for this family;
    ``metadata``: ``ss_base_model_version`` values, ``modelspec``: ``modelspec.architecture``
    prefixes that name it. ``own_loras``: LoRAs must be made for this family (stand-alone text
    encoders take any). ``details(shapes, prefix)``: sizes read from the file, for reports;
    ``variant(shapes, prefix)``: the precise architecture (``wan2.1-i2v-14b``) when a family has several.
    ``diffusers``: the diffusers view (``arch.diffusers.View``) when diffusers has a layout for it."""

    id: str
    name: str
    slots: tuple[Slot, ...]
    signature: Signature
    lora_signals: tuple[str, ...] = ()
    metadata: tuple[str, ...] = ()
    modelspec: tuple[str, ...] = ()
    own_loras: bool = True
    details: Callable[[Shapes, str], dict] | None = None
    variant: Callable[[Shapes, str], "tuple[str, str]"] | None = None  # (precise id, name) read from the file
    widths: dict[int, str] = field(default_factory=dict)  # model width -> the released models of it
    diffusers: object = None

    def signals(self) -> list[re.Pattern]:
        return [re.compile(s) for s in self.lora_signals]


@dataclass
class BaseSpec:
    """A base file as lorakit sees it: its family (and precise variant), the components present,
    sizes for reports."""

    family: Family
    components: list[Component]
    details: dict[str, object] = field(default_factory=dict)
    variant: tuple[str, str] | None = None  # (id, name), when the family tells variants apart

    @property
    def arch(self) -> str:
        """The precise architecture id (``sd15``, ``wan2.1-t2v-14b``)."""
        return self.variant[0] if self.variant else self.family.id

    @property
    def name(self) -> str:
        return self.variant[1] if self.variant else self.family.name

    def component(self, cid: str) -> Component | None:
        return next((c for c in self.components if c.id == cid), None)

    def lookup(self, module: str) -> tuple[Component, Alias] | None:
        for c in self.components:
            a = c.aliases.get(module)
            if a is not None:
                return c, a
        return None


def no_spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    """A component no LoRA addresses (the VAE): no module spaces."""
    return {}


def vae_slot(prefix: str) -> Slot:
    return Slot(VAE, (prefix,), no_spaces, ())
