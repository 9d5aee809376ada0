"""The one validating parser for the headers lorakit reads (safetensors today; a GGUF reader would
reuse its checks of types and byte spans). It needs no torch.

Nothing in a header is trusted before it is checked: the JSON is bounded in size and nesting,
every field has exactly its type (a shape is a list of non-negative ints whose product fits, not
bools or nested lists), every tensor's byte span lies inside the data section, holds exactly what
its dtype and shape need and overlaps no other, names are unique, and ``__metadata__`` is a flat
string -> string map. Every violation is one ``FileFormatError`` naming the file, the key and the
reason."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import FileFormatError

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
MAX_ELEMENTS = 1 << 50  # a product of dimensions beyond this is a lie (and would overflow int64 bytes)
FIELDS = ("dtype", "shape", "data_offsets")

# safetensors dtype spelling -> (torch dtype name, bytes per element)
DTYPE_NAMES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
               "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "I64": ("int64", 8),
               "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1)}
ITEM_BYTES = {k: v[1] for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]
    begin: int  # offset inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self):
        import torch  # only where a tensor is made

        return getattr(torch, DTYPE_NAMES[self.dtype][0])


def bad(name: str, reason: str) -> FileFormatError:
    return FileFormatError(f"{name}: not a valid safetensors file: {reason}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _int(v: object) -> bool:
    return type(v) is int  # bool is an int subclass; true is no dimension


def parse_json(raw: bytes, name: str) -> dict:
    """The header object, refusing non-UTF-8, non-JSON, duplicate keys and absurd nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad(name, "header is not UTF-8 text") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise bad(name, "header JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError is a ValueError, as is a duplicate key
        raise bad(name, f"header is not JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict):
        raise bad(name, "header is not a JSON object")
    return doc


def metadata_of(doc: dict, name: str) -> dict[str, str]:
    meta = doc.pop("__metadata__", None)
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad(name, "__metadata__ must map strings to strings")
    return meta


def span_of(name: str, key: str, entry: object, data_size: int) -> TensorInfo:
    if not key:
        raise bad(name, "a tensor has an empty name")
    if not isinstance(entry, dict):
        raise bad(name, f"entry {key!r} is not an object")
    missing = [f for f in FIELDS if f not in entry]
    if missing:
        raise bad(name, f"tensor {key!r} lacks {', '.join(missing)}")
    dtype, shape, offs = (entry[f] for f in FIELDS)
    if not isinstance(dtype, str) or dtype not in ITEM_BYTES:
        raise bad(name, f"tensor {key!r} has unsupported dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise bad(name, f"tensor {key!r} has an invalid shape {str(shape)[:80]} (a list of non-negative integers)")
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_ELEMENTS:
            raise bad(name, f"tensor {key!r} has an impossible shape {str(shape)[:80]}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_int(o) for o in offs)):
        raise bad(name, f"tensor {key!r} has invalid data_offsets {str(offs)[:80]} (two integers)")
    begin, end = offs
    expect = numel * ITEM_BYTES[dtype]
    if begin < 0 or end < begin or end - begin != expect:
        raise bad(name, f"tensor {key!r}: data_offsets {offs} hold {end - begin} bytes, shape {shape} {dtype} "
                        f"needs {expect}")
    if end > data_size:
        raise bad(name, f"tensor {key!r} ends at byte {end} but the data section has {data_size} bytes (truncated file?)")
    return TensorInfo(key, dtype, tuple(shape), begin, end)


def parse_safetensors(raw: bytes, name: str, data_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensor spans by name, metadata) of a safetensors header whose data section has ``data_size`` bytes."""
    doc = parse_json(raw, name)
    meta = metadata_of(doc, name)
    spans = {key: span_of(name, key, entry, data_size) for key, entry in doc.items()}
    ordered = sorted((s.begin, s.end, s.key) for s in spans.values() if s.end > s.begin)
    for (_, e0, k0), (b1, _, k1) in zip(ordered, ordered[1:]):
        if b1 < e0:
            raise bad(name, f"tensors {k0!r} and {k1!r} overlap")
    return spans, meta


# what a file is when it is not safetensors: (magic bytes at the start, what to tell the user)
NOT_SAFETENSORS = (
    (b"PK\x03\x04", "this is a zip archive (a PyTorch .ckpt / .pt / .bin?): lorakit reads .safetensors only "
                    "(convert it first, e.g. with safetensors' convert script or ComfyUI's save nodes)"),
    (b"\x80", "this is a Python pickle (a PyTorch .ckpt / .pt / .bin): lorakit reads .safetensors only "
              "(convert it first, e.g. with safetensors' convert script or ComfyUI's save nodes)"),
    (b"GGUF", "this is a GGUF file: lorakit reads .safetensors only"),
    (b"{", "this is JSON, not safetensors (a ComfyUI workflow? use --workflow)"),
    (b"[", "this is JSON, not safetensors"),
)


def sniff(head: bytes) -> str | None:
    """What a file that failed as safetensors looks like, from its first bytes (None: nothing known)."""
    stripped = head.lstrip()
    for magic, what in NOT_SAFETENSORS:
        if (stripped if magic in (b"{", b"[") else head).startswith(magic):
            return what
    return None
