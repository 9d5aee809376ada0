"""A PNG writer (RGB, 8 bit) with text chunks, so ``lorakit sample`` needs no imaging library."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import torch

from ..outputs import TEMP_SUFFIX, new_file_mode


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: torch.Tensor, text: dict[str, str]) -> bytes:
    """``rgb``: uint8 [H, W, 3]. ``text`` goes into tEXt chunks (Latin-1) or iTXt (anything else)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].contiguous().numpy().tobytes() for y in range(h))  # filter 0 per row
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    for k, v in text.items():
        try:
            out += _chunk(b"tEXt", k.encode("latin-1") + b"\x00" + v.encode("latin-1"))
        except UnicodeEncodeError:
            out += _chunk(b"iTXt", k.encode("latin-1") + b"\x00\x00\x00\x00\x00" + v.encode("utf-8"))
    return out + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """A decoded image [3, H, W] in about [-1, 1] -> uint8 [H, W, 3] (ComfyUI: clamp((x+1)/2, 0, 1))."""
    x = ((image.float() + 1.0) / 2.0).clamp(0, 1)
    return (x * 255.0).round().to(torch.uint8).permute(1, 2, 0)


def save_png(path: str | os.PathLike, rgb: torch.Tensor, text: dict[str, str]) -> None:
    """Write atomically: a temporary file beside ``path``, renamed when complete."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_png(rgb, text))
        os.chmod(tmp, new_file_mode(None))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
