"""The container seam: what merge / check / inspect / patch need from a file of tensors (or a state
dict), whatever the file format. Safetensors is the one file format today (``lorakit.io.open_container``);
a GGUF reader would be another ``Container``.

A container names its tensors in data order, gives shapes and stored dtypes without reading data,
reads one stored tensor at a time, and says how each is stored (its ``Codec``, bound to any
auxiliary tensors of the file's storage layout)."""

from __future__ import annotations

from functools import cached_property

import torch

from .. import codecs
from ..codecs import Codec


class Container:
    """Subclasses provide ``name``, ``metadata``, ``keys()``, ``shapes()``, ``dtype(key)`` and
    ``get(key)``; the codec lookups are shared."""

    name: str
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self.shapes()

    @cached_property
    def layouts(self) -> tuple[codecs.Layout, ...]:
        return codecs.layouts_of(set(self.keys()))

    def codec(self, key: str) -> Codec:
        """How tensor ``key`` is stored."""
        return codecs.codec_of(key, self.dtype(key), lambda k: self.get(k) if k in self else None, self.layouts)

    def decode(self, key: str) -> tuple[torch.Tensor, Codec, torch.Tensor]:
        """(fp32 value, codec, stored tensor) of tensor ``key``."""
        stored = self.get(key)
        codec = self.codec(key)
        return codec.decode(stored), codec, stored

    def is_aux(self, key: str) -> bool:
        """Bookkeeping of the storage layout (scale tensors, markers), not a model tensor."""
        return codecs.is_aux(key, self.layouts)

    def close(self) -> None:
        """Release the file (nothing to release for a state dict)."""

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorDict(Container):
    """A state dict (name -> tensor) seen as a container; tensors are used in place."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "the state dict") -> None:
        self.tensors, self.name, self.metadata = tensors, name, {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

