"""The families lorakit knows, in one table. Adding a family: a record in its own module, listed here."""

from __future__ import annotations

from .chroma import CHROMA
from .flux import FLUX1
from .flux2 import FLUX2
from .qwen import QWEN_IMAGE
from .sd import SD15, SDXL
from .spec import Family
from .text import CLIP_L_FILE, T5XXL_FILE
from .wan import WAN
from .zimage import Z_IMAGE

FAMILIES: tuple[Family, ...] = (SD15, SDXL, FLUX1, FLUX2, CHROMA, WAN, QWEN_IMAGE, Z_IMAGE, CLIP_L_FILE, T5XXL_FILE)
BY_ID = {f.id: f for f in FAMILIES}
