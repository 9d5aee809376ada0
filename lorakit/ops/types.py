"""The primitive's data: a segment (one LoRA on rows of one weight) and an update (one weight)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..codecs import Codec, plain


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] conv weights and [out, in] linears both as a 2-D [out, -1] view."""
    return w.reshape(w.shape[0], -1)


@dataclass
class Segment:
    """``W[rows] += scale * (up @ down)``: one LoRA on one weight (rows: a slice of a fused weight)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    rows: tuple[int, int] | None = None

    def span(self, n_rows: int) -> tuple[int, int]:
        return self.rows or (0, n_rows)


@dataclass
class Update:
    """One weight's change: its segments apply in order to an fp32 copy, then one rounding.

    ``codec`` is how ``w`` is stored (default: plain ``w.dtype``); ``source`` is the original to
    patch from (a backup), when not ``w`` itself."""

    w: torch.Tensor
    segments: list[Segment]
    key: str = ""  # names the tensor for the stochastic-rounding counter
    codec: Codec | None = None
    source: torch.Tensor | None = None
    # the flat index of w's first element in the whole tensor (w is a row piece of a streamed tensor):
    # the stochastic-rounding counter counts from there, so pieces round as the whole would
    index_base: int = 0
    # elements the encoding could not hold: fp8 values clipped at the limit; inf / NaN in wider formats
    out_of_range: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.codec is None:
            self.codec = plain(self.w.dtype)
