"""Storage codecs: how a stored tensor holds the fp32 values the math works on, and back.

A codec is one storage type: its element dtype, how stored elements decode to fp32 and how fp32
results encode back (with a rounding mode), the format's unit roundoff (``check``'s noise floor),
its largest finite value (where results saturate), the kernel's name for it, and the auxiliary
tensors its encoding reads. Plain floats (fp32, fp16, bf16, fp8 e4m3fn / e5m2) are the registry
``CODECS``; ComfyUI's scaled fp8 is an fp8 codec bound to a per-tensor scale read from the file
(``bind``). Nothing else in lorakit looks at dtypes or scale tensors to decide how to round.

Adding a storage type (block-scaled NVFP4 / MXFP8, GGUF blocks): a ``Codec`` subclass with its own
``decode`` / ``encode_`` and a ``Layout`` entry that recognises it in a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from . import fp8_cpu
from .rounding import FP8_MAX, clipped, round_into, salt

Getter = Callable[[str], "torch.Tensor | None"]


@dataclass(frozen=True)
class Codec:
    """One storage type. ``limit`` is the largest finite stored value (None: results never
    saturate in practice); ``coarse`` formats default to stochastic rounding."""

    name: str
    dtype: torch.dtype
    unit_roundoff: float
    kernel: str  # the kernel's W kind ("fp32", "fp16", "bf16", "e4m3", "e5m2")
    limit: float | None = None
    scale: float | None = None  # effective value = stored * scale (ComfyUI scaled fp8)
    aux: tuple[str, ...] = ()  # keys of the auxiliary tensors this encoding reads

    @property
    def coarse(self) -> bool:
        """Rounding to this format visibly loses small changes: stochastic rounding by default."""
        return self.limit is not None

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """fp32 values of ``stored`` (a new tensor)."""
        return self.decode_into(torch.empty(stored.shape, dtype=torch.float32, device=stored.device), stored)

    def decode_into(self, out: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """``out`` (fp32, ``stored``'s shape) = the values of ``stored``; returns ``out``."""
        if self.coarse and fp8_cpu.usable(out, stored):
            return fp8_cpu.decode_(out, stored, self.scale)
        return self.scale_(out.copy_(stored))

    def scale_(self, v: torch.Tensor) -> torch.Tensor:
        """Stored-to-effective scaling of an fp32 copy, in place."""
        return v.mul_(self.scale) if self.scale is not None else v

    def fuses(self, dst: torch.Tensor, rounding: str) -> bool:
        """Whether ``add_encode_`` can patch ``dst`` in one pass (fp8 on the CPU)."""
        return self.coarse and rounding in ("nearest", "stochastic") and fp8_cpu.usable(dst)

    def add_encode_(self, dst: torch.Tensor, delta: torch.Tensor, factor: float | None, *, rounding: str, seed: int,
                    key: str, index_offset: int = 0) -> int:
        """``encode_(dst, decode(dst) + delta * factor)`` in one pass, bit for bit (``fuses`` must hold)."""
        return fp8_cpu.add_encode_(dst, delta, factor, stochastic=rounding == "stochastic", salt=salt(seed, key),
                                   index_offset=index_offset, scale=self.scale)

    def encode_(self, dst: torch.Tensor, value: torch.Tensor, original: torch.Tensor | None, *, rounding: str,
                seed: int, key: str, index_offset: int = 0) -> int:
        """Write fp32 ``value`` (effective values) into the stored ``dst``; ``original`` is the fp32
        value before patching, None for ``dst``'s own values (coarse formats keep the old bits where
        nothing moved). Returns how many elements the format could not hold: saturated fp8 values,
        inf / NaN elsewhere."""
        if self.coarse and rounding in ("nearest", "stochastic") and fp8_cpu.usable(
                dst, value, *(() if original is None else (original,))):
            return fp8_cpu.encode_(dst, value, original, stochastic=rounding == "stochastic",
                                   salt=salt(seed, key), index_offset=index_offset, scale=self.scale)
        return round_into(dst, value, original, rounding=rounding, seed=seed, key=key, index_offset=index_offset,
                          scale=self.scale)


CODECS: dict[torch.dtype, Codec] = {c.dtype: c for c in (
    Codec("fp64", torch.float64, 2.0 ** -53, ""),  # torch reference only: the kernel has no float64 kind
    Codec("fp32", torch.float32, 2.0 ** -24, "fp32"),
    Codec("fp16", torch.float16, 2.0 ** -11, "fp16"),
    Codec("bf16", torch.bfloat16, 2.0 ** -8, "bf16"),
    Codec("fp8_e4m3fn", torch.float8_e4m3fn, 2.0 ** -4, "e4m3", limit=FP8_MAX[torch.float8_e4m3fn]),
    Codec("fp8_e5m2", torch.float8_e5m2, 2.0 ** -3, "e5m2", limit=FP8_MAX[torch.float8_e5m2]),
)}


def patchable(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` can take a LoRA (floats; never int / bool tensors)."""
    return dtype in CODECS


def plain(dtype: torch.dtype) -> Codec:
    """The codec of a tensor stored as plain ``dtype`` (``patchable(dtype)`` must hold)."""
    return CODECS[dtype]


def scaled(dtype: torch.dtype, scale: float, scale_key: str = "") -> Codec:
    """An fp8 codec bound to a per-tensor scale (ComfyUI scaled fp8)."""
    base = plain(dtype)
    return Codec(f"scaled_{base.name}", dtype, base.unit_roundoff, base.kernel, base.limit, float(scale),
                 (scale_key,) if scale_key else ())


@dataclass(frozen=True)
class Layout:
    """A file-level storage layout: the marker tensor that announces it and how it binds a codec
    to one tensor (reading auxiliary tensors through ``get``)."""

    name: str
    marker: str
    aux_suffix: str

    def aux_key(self, key: str) -> str | None:
        return key[: -len("weight")] + self.aux_suffix if key.endswith(".weight") else None

    def bind(self, key: str, dtype: torch.dtype, get: Getter) -> Codec | None:
        if plain(dtype).limit is None:
            return None  # only fp8 weights are scaled
        aux = self.aux_key(key)
        s = get(aux) if aux else None
        return None if s is None else scaled(dtype, float(s.float().reshape(-1)[0]), aux)

    def is_aux(self, key: str) -> bool:
        """The marker or a per-layer scale: bookkeeping of the layout, not a weight."""
        return key == self.marker or key.endswith("." + self.aux_suffix)


# ComfyUI "scaled fp8": each fp8 <layer>.weight stores W / s with s in <layer>.scale_weight (fp32, shape []);
# the file carries the empty marker tensor scaled_fp8
LAYOUTS = (Layout("comfyui scaled fp8", "scaled_fp8", "scale_weight"),)


def layouts_of(keys: Mapping[str, object] | set[str]) -> tuple[Layout, ...]:
    """The storage layouts a file (given by its keys) announces."""
    return tuple(lay for lay in LAYOUTS if lay.marker in keys)


def codec_of(key: str, dtype: torch.dtype, get: Getter, layouts: tuple[Layout, ...] = ()) -> Codec:
    """The codec of tensor ``key`` stored as ``dtype`` in a file with ``layouts``."""
    for lay in layouts:
        bound = lay.bind(key, dtype, get)
        if bound is not None:
            return bound
    return plain(dtype)


def is_aux(key: str, layouts: tuple[Layout, ...]) -> bool:
    return any(lay.is_aux(key) for lay in layouts)


def default_rounding(codecs: list[Codec], requested: str | None = None) -> str:
    """The rounding mode a merge / patch / check uses: as requested, else stochastic when any
    changed tensor is stored in a coarse format (fp8), else round-to-nearest-even."""
    if requested is not None:
        return requested
    return "stochastic" if any(c.coarse for c in codecs) else "nearest"


def saturated(codec: Codec, value: torch.Tensor, original: torch.Tensor) -> int:
    """Changed elements whose exact value lies beyond the format's largest finite value (the one
    definition merge, patch and check count by: see ``rounding.round_into``)."""
    if codec.limit is None:
        return 0
    target = value / torch.tensor(codec.scale, dtype=torch.float32) if codec.scale is not None else value
    return clipped(target, value != original, codec.limit)
