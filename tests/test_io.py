"""The safetensors reader refuses lying files; the writer's output reads back with the official library."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import FileFormatError
from lorakit.io.safetensors import SafetensorsFile, save_file


def _raw(path: Path, header: dict, data: bytes) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_roundtrip_all_dtypes(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
        "d": torch.randn(4, 4).to(torch.float8_e4m3fn), "e": torch.randn(3).to(torch.float8_e5m2),
        "f": torch.arange(6, dtype=torch.int64), "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3),
    }
    p = tmp_path / "x.safetensors"
    save_file(tensors, p, {"k": "v"})
    back = load_file(str(p))
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)) or t.numel() == 0
    with SafetensorsFile(p) as f:
        assert f.metadata == {"k": "v"}
        assert torch.equal(f.get("a"), tensors["a"])


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "needs 16"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 16, "overlap"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"__metadata__": {"x": 1}}, b"", "__metadata__"),
])
def test_lying_headers_are_refused(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    p = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(FileFormatError, match=message) as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_not_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\xff\xfe\x00 garbage that is no known format at all")
    with pytest.raises(FileFormatError, match="header length"):
        SafetensorsFile(p)
    p.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")  # a PyTorch .ckpt / .pt
    with pytest.raises(FileFormatError, match="zip archive .*reads .safetensors only"):
        SafetensorsFile(p)
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(FileFormatError, match="shorter than"):
        SafetensorsFile(tmp_path / "short")
    bad_json = tmp_path / "j.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(FileFormatError, match="not JSON"):
        SafetensorsFile(bad_json)
    with pytest.raises(FileFormatError, match="not found"):
        SafetensorsFile(tmp_path / "missing.safetensors")
