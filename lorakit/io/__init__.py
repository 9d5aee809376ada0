"""File I/O: the container seam (``container``), safetensors reading and writing (``safetensors``) and
the page-cache-bypassing byte streams of a merge (``stream``)."""

from __future__ import annotations

import os

from .container import Container
from .safetensors import SafetensorsFile


def open_container(path: str | os.PathLike) -> Container:
    """The container for a model file (safetensors; the file is validated on opening)."""
    return SafetensorsFile(path)
