"""Plan and stream a merge: BASE -> OUT, one base tensor in memory at a time.

OUT keeps BASE's keys, shapes, dtypes, tensor order and data offsets; only the header
(metadata + a ``lorakit`` provenance entry) changes size. BASE is read as one sequential stream;
untouched bytes pass through unchanged, touched tensors are patched in fp32, rounded once and
written at their offsets. Everything goes to a temporary file beside OUT (same permissions a new
file would get) that is fsynced and renamed only when complete.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import __version__
from .arch import detect
from .errors import BackendUnavailable, OutputError
from .io import scaled_fp8
from .io.safetensors import SafetensorsFile, build_header, tensor_bytes
from .lora import load_lora
from .engine import patch_generic_, updates, whole
from .ops import BACKENDS, is_fp8, update_many_
from .plan import LoraSpec, Op, Plan, check_compatible, plan_lora, unmatched_error
from .progress import Progress

COPY_CHUNK = 16 << 20  # bytes per segment of untouched data
PREFETCH = 4
WRITE_BEHIND = 4
RING_BUDGET = 768 << 20  # bytes of read/write buffers; depth shrinks for very large tensors
READ_AHEAD = 64 << 20
WRITE_PIECE = 1 << 20  # page-cache writes in 1 MB pieces ran ~1.7x faster than 16 MB pieces on the test VM
ADVISE_STEP = 8 << 20


def plan(base: str | os.PathLike, loras: list[LoraSpec], *, model_only: bool = False,
         allow_unmatched: bool = False, allow_nonfinite: bool = False) -> Plan:
    """Map every LoRA onto BASE and report; raises on strict-mode failures. Writes nothing."""
    with SafetensorsFile(base) as f:
        shapes = f.shapes()
    spec = detect(shapes, str(base))
    result = Plan(str(base), spec, [])
    if model_only and all(c.strength_kind == "clip" for c in spec.components):
        result.notes.append(f"--model-only on a text-encoder BASE ({spec.name}): nothing applies; OUT equals BASE "
                            "apart from metadata")
    for i, ls in enumerate(loras):
        lora = load_lora(ls.path)
        check_compatible(lora, spec, str(base))
        entry = plan_lora(lora, ls, i, spec, shapes, model_only=model_only,
                          allow_nonfinite=allow_nonfinite, ops=result.ops)
        if entry["unmatched"] and not allow_unmatched:
            raise unmatched_error(entry, str(base), spec)
        result.loras.append(entry)
    return result


def _resolve_device(device: str) -> torch.device:
    # auto stays on the CPU until the GPU path (kernel issue) is tested on a GPU; cuda is opt-in
    if device == "auto":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: no CUDA device is available to torch here; use --device cpu or auto")
    return torch.device(device)


def _check_output(base: Path, out: Path, *, force: bool, in_place: bool) -> None:
    same = out.exists() and base.exists() and os.path.samefile(base, out)
    if same and not in_place:
        raise OutputError(f"{out}: OUT is BASE; pass --in-place to overwrite BASE (written to a temporary file first)")
    if out.exists() and not same and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name for OUT")
    folder = out.parent
    if not folder.is_dir():
        raise OutputError(f"{out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {folder} is not writable")


class _Writer:
    """Sequential writes into the temporary OUT, at the same data offsets as in BASE."""

    def __init__(self, dst_fd: int, header: bytes, progress: Progress) -> None:
        self.fd, self.progress = dst_fd, progress
        self.dst_start = len(header)
        self._pwrite(memoryview(header), 0)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while len(view):
            n = os.pwrite(self.fd, view[:WRITE_PIECE], offset)
            view, offset = view[n:], offset + n

    def write(self, begin: int, data: memoryview) -> None:
        self._pwrite(data, self.dst_start + begin)
        if _sync_file_range is not None and len(data):
            # start write-back of what was just written, so dirty pages never pile up to the
            # point where the kernel throttles every writer (measured: fewer long stalls)
            _sync_file_range(self.fd, self.dst_start + begin, len(data), SYNC_FILE_RANGE_WRITE)
        self.progress.advance(len(data))


def _load_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def _segments(src: SafetensorsFile, ops: dict[str, list[Op]]) -> list[tuple[int, int, str | None]]:
    """The data section in file order: touched tensors, and the bytes between them in chunks."""
    out, pos = [], 0
    end_of_data = src.file_size - src.data_start
    touched = [(src.tensors[k].begin, src.tensors[k].end, k) for k in src.order if k in ops]
    for begin, end, key in touched + [(end_of_data, end_of_data, None)]:
        for c in range(pos, begin, COPY_CHUNK):
            out.append((c, min(begin, c + COPY_CHUNK), None))
        if key is not None:
            out.append((begin, end, key))
        pos = end
    return out


def _patch_tensor(stored: torch.Tensor, key: str, ops: list[Op], scale: float | None, *, device: torch.device,
                  rounding: str, seed: int) -> tuple[torch.Tensor, int]:
    """Patch one stored tensor in place (every op in order, one rounding); returns it and the
    number of fp8 elements that saturated."""
    target = stored if device.type == "cpu" else stored.to(device)
    parts = whole(key, target)
    ups = updates(parts, ops, scale)
    if ups is not None:  # plain low-rank: the primitive (the Triton kernel on CUDA)
        update_many_(ups, rounding=rounding, seed=seed)
        saturated = sum(u.saturated for u in ups)
    else:
        saturated = patch_generic_(parts, ops, weight_scale=scale, rounding=rounding, seed=seed, device=device)
    if target is not stored:
        stored.copy_(target)
    return stored, saturated


def _stream(src: SafetensorsFile, writer: _Writer, ops: dict[str, list[Op]], scales: dict[str, float],
            saturated: dict[str, int], *, device: torch.device, rounding: str, seed: int) -> None:
    """One sequential read stream and one sequential write stream on two threads; patching in between.

    Everything is read in file order (untouched bytes too) into a ring of reused buffers, so the
    disk's read-ahead keeps working and no fresh memory is faulted in per tensor. With PREFETCH
    segments read ahead and WRITE_BEHIND waiting to be written, PREFETCH + WRITE_BEHIND + 1
    buffers are in use at most: memory stays at a few tensors whatever the file size.
    """
    segments = _segments(src, ops)
    try:
        os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    data_end = src.file_size - src.data_start
    touched = [src.tensors[k] for k in ops]
    cap = max([COPY_CHUNK] + [i.nbytes for i in touched])
    depth = max(2, min(PREFETCH, RING_BUDGET // cap // 2))
    behind = max(1, min(WRITE_BEHIND, RING_BUDGET // cap - depth - 1))
    ring = [torch.empty(cap, dtype=torch.uint8) for _ in range(depth + behind + 1)]

    advised = [0]

    def read(i: int) -> torch.Tensor:
        begin, end, key = segments[i]
        # keep the kernel reading READ_AHEAD bytes ahead asynchronously: on the test VM a read
        # loop interleaved with writes ran 2-4x slower without it (the plain read-ahead stalls)
        while advised[0] < min(end + READ_AHEAD, data_end):
            try:
                os.posix_fadvise(src.fileno(), src.data_start + advised[0], ADVISE_STEP, os.POSIX_FADV_WILLNEED)
            except (AttributeError, OSError):
                pass
            advised[0] += ADVISE_STEP
        buf = ring[i % len(ring)][: end - begin]
        src.read_into(memoryview(buf.numpy()), begin, f"tensor {key!r}" if key else "data")
        if key is None:
            return buf
        info = src.tensors[key]
        return buf.view(info.torch_dtype).reshape(info.shape)

    reader, out = ThreadPoolExecutor(1, "lorakit-read"), ThreadPoolExecutor(1, "lorakit-write")
    threads = torch.get_num_threads()
    # leave a core to the I/O threads: on 2 cores one compute thread merged ~15 % faster
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    reads: deque = deque(reader.submit(read, i) for i in range(min(depth, len(segments))))
    writes: deque = deque()
    try:
        for i, (begin, _end, key) in enumerate(segments):
            data = reads.popleft().result()
            if i + depth < len(segments):
                reads.append(reader.submit(read, i + depth))
            if key is not None:
                data, sat = _patch_tensor(data, key, ops[key], scales.get(key), device=device, rounding=rounding,
                                          seed=seed)
                if sat:
                    saturated[key] = sat
            writes.append(out.submit(writer.write, begin, tensor_bytes(data)))
            while len(writes) > behind:
                writes.popleft().result()
        while writes:
            writes.popleft().result()
    finally:
        torch.set_num_threads(threads)
        reader.shutdown(wait=True, cancel_futures=True)
        out.shutdown(wait=True, cancel_futures=True)


def merge_file(base: str | os.PathLike, loras: list[LoraSpec], out: str | os.PathLike, *, model_only: bool = False,
               rounding: str | None = None, seed: int = 0, device: str = "auto", allow_unmatched: bool = False,
               allow_nonfinite: bool = False, force: bool = False, in_place: bool = False,
               progress: bool | None = None) -> dict:
    """Merge ``loras`` into ``base`` and write ``out``; returns the report (as ``--json`` prints it)."""
    base_p, out_p = Path(base), Path(out)
    the_plan = plan(base_p, loras, model_only=model_only, allow_unmatched=allow_unmatched,
                    allow_nonfinite=allow_nonfinite)
    _check_output(base_p, out_p, force=force, in_place=in_place)
    dev = _resolve_device(device)
    if dev.type == "cuda":  # say once why the kernel is not used, if it is not
        kernel = next(b for b in BACKENDS if b.name == "triton")
        why = kernel.unavailable(torch.empty(1, dtype=torch.float16, device=dev))
        if why:
            the_plan.notes.append(f"the Triton kernel is not used ({why}); patching with torch on the GPU")
    t0 = time.monotonic()
    with SafetensorsFile(base_p) as src:
        scales = _fp8_scales(src, the_plan.ops)
        fp8_targets = [k for k in the_plan.ops if is_fp8(src.tensors[k].torch_dtype)]
        mode = rounding or ("stochastic" if fp8_targets else "nearest")
        provenance = _provenance(src, loras, the_plan, model_only=model_only, rounding=mode, seed=seed,
                                 allow_unmatched=allow_unmatched)
        metadata = dict(src.metadata)
        metadata["lorakit"] = json.dumps(provenance, separators=(",", ":"))
        header = build_header([src.tensors[k] for k in src.order], metadata)
        fd, tmp = tempfile.mkstemp(prefix=f".{out_p.name}.", suffix=".lorakit-tmp", dir=out_p.parent)
        os.fchmod(fd, _new_file_mode(base_p if in_place else None))
        bar = Progress(src.file_size - src.data_start, "merging", enabled=progress)
        saturated: dict[str, int] = {}
        try:
            writer = _Writer(fd, header, bar)
            _stream(src, writer, the_plan.ops, scales, saturated, device=dev, rounding=mode, seed=seed)
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
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise OutputError(f"{out_p}: disk full while writing; the partial file was removed, BASE is untouched") from None
            if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
                raise OutputError(f"{out_p}: write failed ({e.strerror or e}); the partial file was removed") from None
            raise
        finally:
            bar.close()
    report = the_plan.report()
    report.update({"out": str(out_p), "tensors_changed": len(the_plan.ops), "rounding": mode, "seed": seed,
                   "device": str(dev), "fp8_tensors_changed": len(fp8_targets), "fp8_saturated": saturated,
                   "seconds": round(time.monotonic() - t0, 3)})
    return report


def _new_file_mode(keep_from: Path | None) -> int:
    """mkstemp makes 0600 files; OUT gets BASE's mode when replacing it, else 0666 minus umask."""
    if keep_from is not None:
        return os.stat(keep_from).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fp8_scales(src: SafetensorsFile, ops: dict[str, list[Op]]) -> dict[str, float]:
    """Per-layer scales of a ComfyUI scaled-fp8 checkpoint, for the touched weights."""
    if scaled_fp8.MARKER not in src.tensors:
        return {}
    get = lambda k: src.get(k) if k in src.tensors else None  # noqa: E731
    return {k: s for k in ops if (s := scaled_fp8.weight_scale(k, src.tensors[k].torch_dtype, get)) is not None}


def _provenance(src: SafetensorsFile, loras: list[LoraSpec], the_plan: Plan, **options: object) -> dict:
    previous = src.metadata.get("lorakit")
    entry = {
        "version": __version__,
        "base": {"file": Path(src.name).name, "arch": the_plan.spec.arch},
        "loras": [{"file": Path(ls.path).name, "sha256": r["sha256"], "model_strength": ls.model_strength,
                   "clip_strength": ls.clip} for ls, r in zip(loras, the_plan.loras)],
        "options": options,
    }
    if previous:
        try:
            entry["previous"] = json.loads(previous)
        except json.JSONDecodeError:
            entry["previous"] = previous
    return entry
