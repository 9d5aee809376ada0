"""The streaming I/O under the merge (io/stream.py): direct and buffered paths give the same bytes,
fallbacks when O_DIRECT is refused, windows that never split a touched tensor."""

from __future__ import annotations

import errno
import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
import lorakit.merge
from lorakit.errors import FileFormatError
from lorakit.io import stream
from lorakit.io.safetensors import SafetensorsFile
from lorakit.planner import LoraSpec
from tests.conftest import ZOO

SD15 = ZOO / "base/sd15/sd15_tiny_single_file.safetensors"
KOHYA = ZOO / "kohya/sd15_kohya_lora.safetensors"
PAGE = stream.PAGE


@pytest.fixture
def never_cached(monkeypatch):
    """Make the reader go direct even for the small, freshly cached test files."""
    monkeypatch.setattr(stream, "mostly_cached", lambda *a: False)


def _direct_supported(folder: Path) -> bool:
    try:
        fd = os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | stream.O_DIRECT)
    except (OSError, TypeError):
        return False
    os.close(fd)
    os.unlink(folder / ".probe")
    return bool(stream.O_DIRECT)


def _pieces(seed: int) -> list[tuple[bytes, int | None, bool]]:
    """Random writes: (bytes, offset within a page-aligned buffer to hold them at, given as a
    tensor?), incl. ones that line up with the file position (None), ones that do not, empty
    ones, plain bytes, and ones over the stage size."""
    rng = random.Random(seed)
    sizes = [0, 1, 7, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, 5000, stream.STAGE_BYTES + 3 * PAGE + 5, 200_000]
    return [(rng.randbytes(rng.choice(sizes)), rng.choice([0, 1, 13, PAGE - 3, None, None]), rng.random() < 0.8)
            for _ in range(40)]


def _write_all(path: Path, pieces, *, direct: bool) -> stream.Writer:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = stream.Writer(fd, direct=direct)
        for data, at, as_tensor in pieces:
            if at is None:  # placed to line up with the file position, as the merge's windows are
                at = w.pos % PAGE
            buf = stream.aligned_empty(len(data) + 2 * PAGE)
            part = buf[at: at + len(data)]
            if data:
                part.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            w.write(part if as_tensor else bytes(data))
        w.finish()
    finally:
        os.close(fd)
    return w


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_writer_writes_exactly_the_bytes(tmp_path: Path, direct: bool, seed: int) -> None:
    if direct and not _direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    pieces = _pieces(seed)
    out = tmp_path / "out.bin"
    w = _write_all(out, pieces, direct=direct)
    assert w.direct is direct  # the path under test really ran
    assert out.read_bytes() == b"".join(d for d, _, _ in pieces)


def test_writer_falls_back_when_direct_is_refused(tmp_path: Path, monkeypatch) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    real, refused = os.pwrite, {"n": 0}

    def pwrite(fd, data, offset):  # a device that accepts two direct writes, then refuses them
        if stream.fcntl.fcntl(fd, stream.fcntl.F_GETFL) & stream.O_DIRECT:
            refused["n"] += 1
            if refused["n"] > 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)
    monkeypatch.setattr(stream.os, "pwrite", pwrite)
    pieces = _pieces(3)
    out = tmp_path / "out.bin"
    w = _write_all(out, pieces, direct=True)
    assert refused["n"] > 2 and not w.direct
    assert out.read_bytes() == b"".join(d for d, _, _ in pieces)


@pytest.mark.parametrize("direct", [True, False])
def test_reader_returns_exact_ranges(tmp_path: Path, direct: bool, never_cached) -> None:
    if direct and not _direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    data = random.Random(5).randbytes(5 * PAGE + 77)
    header = json.dumps({"__metadata__": {"a": "b"}}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + data)
    rng = random.Random(6)
    with SafetensorsFile(p) as src:
        r = stream.Reader(src, direct=direct)
        assert r.direct is direct
        buf = stream.aligned_empty(r.buffer_bytes(len(data)))
        for begin, end in [(0, len(data)), (len(data) - 1, len(data)), (3, 3)] + [
                sorted(rng.sample(range(len(data) + 1), 2)) for _ in range(30)]:
            got = r.read(buf, begin, end, "data")
            assert bytes(got.numpy()) == data[begin:end]
            assert end == begin or (got.data_ptr() - (src.data_start + begin)) % PAGE == 0  # at its in-page offset
        r.close()


def test_reader_falls_back_and_reports_a_shrunk_file(tmp_path: Path, monkeypatch, never_cached) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    data = random.Random(7).randbytes(3 * PAGE)
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 2) + b"{}" + data)
    real = os.preadv

    with SafetensorsFile(p) as src:
        r = stream.Reader(src, direct=True)
        direct_fd = r.direct_fd

        def preadv(fd, bufs, offset, *flags):
            if fd == direct_fd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, bufs, offset, *flags)
        monkeypatch.setattr(stream.os, "preadv", preadv)
        buf = stream.aligned_empty(r.buffer_bytes(len(data)))
        assert bytes(r.read(buf, 10, 2 * PAGE + 5, "data").numpy()) == data[10: 2 * PAGE + 5]
        assert not r.direct
        os.truncate(p, 10 + PAGE)
        with pytest.raises(FileFormatError, match="could not be read"):
            r.read(buf, 0, len(data), "tensor 'w'")
        r.close()


def test_mostly_cached_sees_a_file_just_read(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(os.urandom(64 * PAGE))
    p.read_bytes()
    fd = os.open(p, os.O_RDONLY)
    try:
        assert stream.mostly_cached(fd, 0, 64 * PAGE) is (getattr(os, "RWF_NOWAIT", None) is not None)
    finally:
        os.close(fd)


def test_windows_cover_the_data_and_split_only_low_rank_tensors() -> None:
    """Windows tile the data; a touched tensor lies whole in one window, or (when all its ops are
    plain low-rank and it is bigger than a window) in row pieces that tile it in order."""
    from lorakit.adapters.full import Full
    from lorakit.arch import Target
    from lorakit.planner import Op

    with SafetensorsFile(ZOO / "base/sdxl/sdxl_tiny_single_file.safetensors") as src:
        keys = [k for k in src.order if src.infos[k].nbytes]
        chosen = random.Random(0).sample(keys, len(keys) // 3)
        full = [Op(Target(k), Full({"diff": torch.zeros(1)}), 1.0, "weight", 0, k) for k in chosen[::2]]
        touched = {k: [] for k in chosen} | {op.target.key: [op] for op in full}  # [] is plain low-rank
        biggest = max(src.infos[k].nbytes for k in touched)
        data_end = src.file_size - src.data_start
        for size in (PAGE, biggest // 2, 1 << 20, 1 << 30):
            wins = lorakit.merge._windows(src, touched, size)
            assert wins[0][0] == 0 and wins[-1][1] == data_end
            assert all(a[1] == b[0] for a, b in zip(wins, wins[1:]))
            pieces: dict[str, list] = {}
            for begin, end, ps in wins:
                for key, rows in ps:
                    info = src.infos[key]
                    r0, r1 = rows or (0, info.shape[0])
                    row_bytes = info.nbytes // info.shape[0]
                    assert begin <= info.begin + r0 * row_bytes and info.begin + r1 * row_bytes <= end
                    pieces.setdefault(key, []).append((r0, r1))
                one_piece = len(ps) == 1 and (ps[0][1] is None or ps[0][1][1] - ps[0][1][0] == 1)
                assert end - begin <= size or one_piece
            assert sorted(pieces) == sorted(touched)
            for key, spans in pieces.items():
                info = src.infos[key]
                assert spans[0][0] == 0 and spans[-1][1] == info.shape[0]
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
                if touched[key] or info.nbytes <= size:
                    assert spans == [(0, info.shape[0])], key  # whole: an op reads it all, or it fits


@pytest.mark.parametrize("base, lora", [
    (ZOO / "base/flux/flux1_tiny_dev_fp8_e4m3fn.safetensors", ZOO / "kohya/flux_kohya_lora_te.safetensors"),
    (ZOO / "base/flux/flux1_tiny_dev_fp8_e4m3fn_scaled.safetensors", ZOO / "flux/flux_aitoolkit_lora.safetensors"),
    (ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors", ZOO / "diffusers/flux_diffusers_peft.safetensors"),
    (ZOO / "base/zimage/z_image_turbo_tiny.safetensors", ZOO / "next/zimage/z_image_aitoolkit.safetensors"),
])
def test_tensors_streamed_in_row_pieces_merge_as_whole_ones(tmp_path: Path, monkeypatch, base: Path,
                                                             lora: Path) -> None:
    """With windows far smaller than the tensors, every low-rank tensor is patched in row pieces
    (row slices of fused qkv included, fp8 stochastic rounding counting on across pieces): the same
    bytes as whole-tensor windows."""
    whole = _merge(base, tmp_path / "whole.safetensors", lora)
    monkeypatch.setattr(lorakit.merge, "WINDOW", 1000)
    with SafetensorsFile(base) as src:
        plan = lorakit.merge.plan(base, [LoraSpec(str(lora), 0.7, 1.3)])
        split = [p for _, _, ps in lorakit.merge._windows(src, plan.ops, 1000) for p in ps if p[1] is not None]
    assert split, "nothing was streamed in pieces"
    assert _merge(base, tmp_path / "pieces.safetensors", lora) == whole


def _merge(base: Path, out: Path, lora: Path = KOHYA, **kw) -> bytes:
    lorakit.merge_file(base, [LoraSpec(str(lora), 0.7, 1.3)], out, progress=False, **kw)
    return out.read_bytes()


@pytest.mark.parametrize("base, lora", [
    (SD15, KOHYA),
    (ZOO / "base/sdxl/sdxl_tiny_single_file.safetensors", ZOO / "kohya/sdxl_kohya_lora.safetensors"),
    (ZOO / "base/flux/flux1_tiny_dev_fp8_e4m3fn_scaled.safetensors", ZOO / "kohya/flux_kohya_lora_te.safetensors"),
])
def test_direct_and_buffered_merges_write_the_same_file(tmp_path: Path, never_cached, base: Path,
                                                        lora: Path) -> None:
    direct = _merge(base, tmp_path / "direct.safetensors", lora)
    buffered = _merge(base, tmp_path / "buffered.safetensors", lora, direct_io=False)
    assert direct == buffered
    with SafetensorsFile(base) as a, SafetensorsFile(tmp_path / "direct.safetensors") as b:
        assert (b.data_start - a.data_start) % PAGE == 0  # pages of OUT line up with BASE's
        assert b.data_start % 8 == 0
        assert b.infos.keys() == a.infos.keys()


def test_tensors_at_odd_offsets_merge_like_aligned_ones(tmp_path: Path, never_cached) -> None:
    """A valid file whose data section starts at an odd offset and whose fp16/fp32 tensors sit at
    odd addresses: the merge patches aligned copies and writes the same values."""
    with SafetensorsFile(SD15) as f:
        raw = Path(SD15).read_bytes()[f.data_start:]
        header = {k: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": [i.begin + 1, i.end + 1]}
                  for k, i in f.infos.items()}
        header["zz_odd_byte"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
        header["__metadata__"] = f.metadata
    h = json.dumps(header).encode()
    h += b" " * ((-len(h) % 8) + 3)  # data section at 8 + len(h): odd
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(struct.pack("<Q", len(h)) + h + b"\x7f" + raw)
    for direct_io in (True, False):
        out = tmp_path / f"odd_{direct_io}.safetensors"
        _merge(odd, out, direct_io=direct_io)
        with SafetensorsFile(out) as b:
            assert b.data_start % 2 == 1
    _merge(SD15, tmp_path / "plain.safetensors")
    want = load_file(str(tmp_path / "plain.safetensors"))
    for direct_io in (True, False):
        with SafetensorsFile(tmp_path / f"odd_{direct_io}.safetensors") as b:
            got = {k: b.get(k) for k in b.order}
        assert torch.equal(got.pop("zz_odd_byte"), torch.tensor([0x7F], dtype=torch.uint8))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)


def test_merge_where_the_filesystem_refuses_o_direct(tmp_path: Path, monkeypatch, never_cached) -> None:
    """open(O_DIRECT) and fcntl(O_DIRECT) both refused, as on filesystems without direct I/O:
    the merge runs buffered and writes the same file."""
    want = _merge(SD15, tmp_path / "want.safetensors")
    real_open, real_fcntl = os.open, stream.fcntl.fcntl

    def no_direct_open(path, flags, *a, **k):
        if flags & stream.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    def no_direct_fcntl(fd, cmd, arg=0):
        if cmd == stream.fcntl.F_SETFL and arg & stream.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)
    monkeypatch.setattr(stream.os, "open", no_direct_open)
    monkeypatch.setattr(stream.fcntl, "fcntl", no_direct_fcntl)
    assert _merge(SD15, tmp_path / "got.safetensors") == want
