"""Plan and stream a merge: BASE -> OUT, a few 64 MB windows in memory at a time (a tensor larger
than a window is streamed in row pieces when its change allows it).

OUT keeps BASE's keys, shapes, dtypes, tensor order and data offsets; only the header
(metadata + a ``lorakit`` provenance entry, padded to BASE's offset within a page) changes size.
BASE is read as one sequential stream (``io.stream``: past the page cache where possible);
untouched bytes pass through unchanged, touched tensors are patched in fp32, rounded once and
written at their offsets. Everything goes to a temporary file beside OUT (same permissions a new
file would get) that is fsynced and renamed only when complete.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ._version import __version__
from .arch import detect
from .codecs import Codec, default_rounding
from .codecs.rounding import count_nonfinite
from .devices import resolve_device
from .engine import lowrank_segments, patch_generic_, piece, updates, whole
from .errors import NonFiniteError, OutputError
from .io import open_container
from .io.safetensors import DTYPES, SafetensorsFile, TensorInfo, build_header
from .io.stream import PAGE, Reader, Writer, aligned_empty
from .ops import BACKENDS, update_many_
from .outputs import TEMP_SUFFIX, check_output, new_file_mode, resolve_out
from .planner import LoraSpec, Op, Plan, plan_loras
from .progress import Progress
from .reports import MergeReport

# Streaming shape, measured on the SDXL benchmark (2-core VM, direct I/O): 64 MB windows streamed
# 25-35 % faster than 32 MB ones and 16 MB ones slower still; 3 read ahead (2 in flight) and 2
# waiting to be written were as fast as 4 + 4 with 190 MB less memory.
WINDOW = 64 << 20  # bytes read, patched and written as one piece (more only for a bigger tensor)
PREFETCH = 3
READERS = 2
WRITE_BEHIND = 2
RING_BUDGET = 768 << 20  # bytes of read/write buffers; depth shrinks for very large tensors
OUT_SUFFIXES = (".safetensors", ".sft")


def plan(base: str | os.PathLike, loras: list[LoraSpec], *, model_only: bool = False,
         allow_unmatched: bool = False, allow_nonfinite: bool = False) -> Plan:
    """Map every LoRA onto BASE and report; raises on strict-mode failures. Writes nothing."""
    with open_container(base) as f:
        shapes = f.shapes()
        dtypes = {k: f.dtype(k) for k in shapes}
    return plan_loras(str(base), detect(shapes, str(base)), shapes, dtypes, loras, model_only=model_only,
                      allow_unmatched=allow_unmatched, allow_nonfinite=allow_nonfinite)


Piece = tuple[str, "tuple[int, int] | None"]  # a touched tensor, or rows r0:r1 of one


def _pieces(src: SafetensorsFile, ops: dict[str, list[Op]], size: int) -> list[tuple[int, int, Piece]]:
    """The touched tensors as byte ranges: (begin, end, (key, rows)). A tensor of more than ``size``
    bytes whose ops are all plain low-rank is cut into row pieces of about ``size`` bytes (each row's
    change depends on that row alone), so memory stays at a few windows whatever the tensor size;
    other tensors stay whole (their adapters read the whole weight)."""
    out = []
    for key in ops:
        info = src.infos[key]
        n = info.end - info.begin
        rows = info.shape[0] if info.shape else 1
        if n <= size or len(info.shape) < 2 or rows < 2 or lowrank_segments(ops[key]) is None:
            out.append((info.begin, info.end, (key, None)))
            continue
        row_bytes = n // rows
        step = max(1, size // row_bytes)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out.append((info.begin + r0 * row_bytes, info.begin + r1 * row_bytes, (key, (r0, r1))))
    return sorted(out, key=lambda t: t[0])


def _windows(src: SafetensorsFile, ops: dict[str, list[Op]], size: int) -> list[tuple[int, int, list[Piece]]]:
    """The data section in file order as windows of about ``size`` bytes: (begin, end, pieces).

    A touched piece always lies whole inside one window (alone, if it is larger than ``size``);
    untouched bytes are cut anywhere. Big windows mean big reads and writes: with direct I/O the
    SDXL benchmark streamed in ~8.1 s with one request per tensor (3 MB typical), 6.8-7.2 s with
    32 MB windows and 5.3-5.8 s with 64 MB ones (2-core test VM, one read in flight)."""
    touched = _pieces(src, ops, size)
    data_end = src.file_size - src.data_start
    out, start, i = [], 0, 0
    while start < data_end or i < len(touched):
        limit, keys = start + size, []
        while i < len(touched) and touched[i][1] <= limit:
            keys.append(touched[i][2])
            i += 1
        if i < len(touched) and touched[i][0] < limit:  # the next touched piece crosses the limit
            if keys or touched[i][0] > start:
                end = touched[i][0]
            else:
                end = touched[i][1]
                keys.append(touched[i][2])
                i += 1
        else:
            end = min(limit, data_end)
        out.append((start, end, keys))
        start = end
    return out


def _stream(src: SafetensorsFile, reader: Reader, writer: Writer, progress: Progress, ops: dict[str, list[Op]],
            codecs: dict[str, Codec], out_of_range: OutOfRange, *, device: torch.device, rounding: str,
            seed: int) -> None:
    """One sequential read stream (two reads in flight) and one sequential write stream on their
    own threads; patching in between.

    Everything is read in file order (untouched bytes too) into a ring of reused page-aligned
    buffers, patched there and written from there. With PREFETCH windows read ahead and
    WRITE_BEHIND waiting to be written, PREFETCH + WRITE_BEHIND + 1 buffers are in use at most:
    memory stays at a few windows whatever the file size.
    """
    windows = _windows(src, ops, WINDOW)
    cap = Reader.buffer_bytes(max(b - a for a, b, _ in windows) if windows else 0)
    depth = max(2, min(PREFETCH, RING_BUDGET // cap // 2))
    behind = max(1, min(WRITE_BEHIND, RING_BUDGET // cap - depth - 1))
    ring = [aligned_empty(cap) for _ in range(depth + behind + 1)]

    def read(i: int) -> torch.Tensor:
        begin, end, pieces = windows[i]
        return reader.read(ring[i % len(ring)], begin, end, f"tensor {pieces[0][0]!r}" if pieces else "data")

    def write(raw: torch.Tensor) -> None:
        writer.write(raw)
        progress.advance(len(raw))

    # two reads in flight: direct reads of the next windows overlapped ~10 % faster on the test VM
    pool_r, pool_w = ThreadPoolExecutor(READERS, "lorakit-read"), ThreadPoolExecutor(1, "lorakit-write")
    reads: deque = deque(pool_r.submit(read, i) for i in range(min(depth, len(windows))))
    writes: deque = deque()
    pending: dict[str, int] = {}  # out-of-range counts of the pieces of a tensor seen so far
    try:
        for i, (begin, _end, pieces) in enumerate(windows):
            raw = reads.popleft().result()
            if i + depth < len(windows):
                reads.append(pool_r.submit(read, i + depth))
            for key, rows in pieces:
                info = src.infos[key]
                lo, hi = info.begin, info.end
                if rows is not None:
                    row_bytes = (info.end - info.begin) // info.shape[0]
                    lo, hi = info.begin + rows[0] * row_bytes, info.begin + rows[1] * row_bytes
                n = pending.pop(key, 0) + _patch_raw(raw[lo - begin: hi - begin], info, ops[key], codecs[key],
                                                     device=device, rounding=rounding, seed=seed, rows=rows)
                if rows is not None and rows[1] < info.shape[0]:
                    pending[key] = n  # more pieces of this tensor to come
                elif n:
                    out_of_range.add(key, n, codecs[key], lambda k=key: src.get(k))
            writes.append(pool_w.submit(write, raw))
            while len(writes) > behind:
                writes.popleft().result()
        while writes:
            writes.popleft().result()
    finally:
        pool_r.shutdown(wait=True, cancel_futures=True)
        pool_w.shutdown(wait=True, cancel_futures=True)


class OutOfRange:
    """What the stored formats could not hold: fp8 values clipped at the limit (reported), and inf /
    NaN a merge would write into a wider format where BASE had none (refused unless
    ``allow_nonfinite``: the LoRA's change at these strengths overflows the format)."""

    def __init__(self, name: str, loras: str, allow_nonfinite: bool) -> None:
        self.name, self.loras, self.allow_nonfinite = name, loras, allow_nonfinite
        self.saturated: dict[str, int] = {}
        self.nonfinite: dict[str, int] = {}

    def add(self, key: str, n: int, codec: Codec, original: Callable[[], torch.Tensor]) -> None:
        if codec.coarse:
            self.saturated[key] = n
            return
        new = n - count_nonfinite(original())  # the base's own inf / NaN are not the merge's doing
        if new <= 0:
            return
        if not self.allow_nonfinite:
            raise NonFiniteError(f"{self.name}: the merge with {self.loras} would write {new} inf / NaN values into "
                                 f"{key} ({codec.name}): the LoRA's change at these strengths overflows the format; "
                                 "nothing was written (lower the strength, or --allow-nonfinite to write them)")
        self.nonfinite[key] = new


def _patch_raw(raw: torch.Tensor, info: TensorInfo, ops: list[Op], codec: Codec, *, device: torch.device,
               rounding: str, seed: int, rows: tuple[int, int] | None = None) -> int:
    """Patch one tensor (or its rows ``rows``: a piece, plain low-rank ops only) in place, given as
    its raw bytes (every op in order, one rounding); returns the number of elements its storage
    could not hold."""
    if raw.storage_offset() % DTYPES[info.dtype][1]:
        # stored at an offset its dtype cannot be viewed at: patch an aligned copy
        aligned = raw.clone()
        sat = _patch_raw(aligned, info, ops, codec, device=device, rounding=rounding, seed=seed, rows=rows)
        raw.copy_(aligned)
        return sat
    shape = info.shape if rows is None else (rows[1] - rows[0],) + tuple(info.shape[1:])
    stored = raw.view(info.torch_dtype).reshape(shape)
    target = stored if device.type == "cpu" else stored.to(device)
    parts = whole(info.key, target, codec) if rows is None else piece(info.key, target, codec, rows[0])
    ups = updates(parts, ops)
    if ups is not None:  # plain low-rank: the primitive (the Triton kernel on CUDA)
        update_many_([u for u, _ in ups], rounding=rounding, seed=seed)
        out_of_range = sum(u.out_of_range for u, _ in ups)
    else:
        assert rows is None, "only plain low-rank tensors are streamed in pieces"
        out_of_range = patch_generic_(parts, ops, rounding=rounding, seed=seed, device=device)
    if target is not stored:
        stored.copy_(target)
    return out_of_range


def merge_file(base: str | os.PathLike, loras: list[LoraSpec], out: str | os.PathLike, *, model_only: bool = False,
               rounding: str | None = None, seed: int = 0, device: str = "auto", allow_unmatched: bool = False,
               allow_nonfinite: bool = False, force: bool = False, in_place: bool = False,
               progress: bool | None = None, direct_io: bool = True) -> MergeReport:
    """Merge ``loras`` into ``base`` and write ``out``; returns the report (``to_json()`` is what ``--json`` prints).

    ``direct_io``: stream past the page cache where the filesystem allows it (``io.stream``);
    the output bytes are the same either way."""
    base_p = Path(base)
    out_p, new_folder = resolve_out(out, default_out_name(base_p))
    check_output(out_p, base=base_p, others=[Path(ls.path) for ls in loras], force=force, in_place=in_place,
                 suffixes=OUT_SUFFIXES, new_folder=new_folder)
    the_plan = plan(base_p, loras, model_only=model_only, allow_unmatched=allow_unmatched,
                    allow_nonfinite=allow_nonfinite)
    dev = resolve_device(device)
    t0 = time.monotonic()
    with SafetensorsFile(base_p) as src:  # the stream copies safetensors byte ranges
        codecs = {k: src.codec(k) for k in the_plan.ops}
        if dev.type == "cuda":  # say once why the kernel is not used, if it is not
            kernel = next(b for b in BACKENDS if b.name == "triton")
            why = next((w for c in codecs.values() if (w := kernel.unavailable(
                torch.empty(1, dtype=c.dtype, device=dev), c))), None)
            if why:
                the_plan.notes.append(f"the Triton kernel is not used ({why}); patching with torch on the GPU")
        coarse = [k for k, c in codecs.items() if c.coarse]
        mode = default_rounding(list(codecs.values()), rounding)
        provenance = _provenance(src, loras, the_plan, model_only=model_only, rounding=mode, seed=seed,
                                 allow_unmatched=allow_unmatched)
        metadata = dict(src.metadata)
        metadata["lorakit"] = json.dumps(provenance, separators=(",", ":"))
        # OUT's data section starts at BASE's offset within a page, so pages move unshifted
        header = build_header([src.infos[k] for k in src.order], metadata, data_start_like=src.data_start,
                              page=PAGE)
        with Reader(src, direct=direct_io) as reader:
            if new_folder:
                out_p.parent.mkdir()
            fd, tmp = tempfile.mkstemp(prefix=f".{out_p.name}.", suffix=TEMP_SUFFIX, dir=out_p.parent)
            os.fchmod(fd, new_file_mode(base_p if in_place else None))
            bar = Progress(src.file_size - src.data_start, "merging", enabled=progress)
            out_of_range = OutOfRange(str(base_p), ", ".join(Path(ls.path).name for ls in loras), allow_nonfinite)
            try:
                writer = Writer(fd, direct=direct_io)
                writer.write(header)
                _stream(src, reader, writer, bar, the_plan.ops, codecs, out_of_range, device=dev, rounding=mode,
                        seed=seed)
                writer.finish()
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(tmp, out_p)
            except BaseException as e:
                if fd >= 0:
                    os.close(fd)
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                if new_folder:
                    out_p.parent.rmdir()  # made for this merge, empty again
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    raise OutputError(f"{out_p}: disk full while writing; the partial file was removed, BASE is untouched") from None
                if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
                    raise OutputError(f"{out_p}: write failed ({e.strerror or e}); the partial file was removed") from None
                raise
            finally:
                bar.close()
    return MergeReport(**the_plan.report_fields(), out=str(out_p), tensors_changed=len(the_plan.ops), rounding=mode,
                       seed=seed, device=str(dev), fp8_tensors_changed=len(coarse), fp8_saturated=out_of_range.saturated,
                       nonfinite_written=out_of_range.nonfinite,
                       seconds=round(time.monotonic() - t0, 3))


def default_out_name(base: Path) -> str:
    """What a merge into a folder calls its output: ``<base name>_lorakit.safetensors``."""
    return f"{base.stem}_lorakit.safetensors"


def _provenance(src: SafetensorsFile, loras: list[LoraSpec], the_plan: Plan, **options: object) -> dict:
    previous = src.metadata.get("lorakit")
    entry = {
        "version": __version__,
        "base": {"file": Path(src.name).name, "arch": the_plan.spec.arch},
        "loras": [{"file": Path(ls.path).name, "sha256": r.sha256, "model_strength": ls.model_strength,
                   "clip_strength": ls.clip} for ls, r in zip(loras, the_plan.loras)],
        "options": options,
    }
    if previous:
        try:
            entry["previous"] = json.loads(previous)
        except json.JSONDecodeError:
            entry["previous"] = previous
    return entry
