"""Plan and stream a merge: BASE -> OUT, one base tensor in memory at a time.

OUT keeps BASE's keys, shapes, dtypes, tensor order and data offsets; only the header
(metadata + a ``lorakit`` provenance entry) changes size. Untouched byte ranges are copied
file-to-file; touched tensors are read, patched in fp32, rounded once, and written in place.
Everything goes to a temporary file beside OUT that is renamed only when complete.
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

import torch

from . import __version__
from .arch import detect
from .errors import BackendUnavailable, OutputError
from .io.safetensors import SafetensorsFile, TensorInfo, build_header, tensor_bytes
from .lora import load_lora
from .ops import ROUND_CHUNK_ELEMENTS, is_fp8, round_into
from .plan import LoraSpec, Op, Plan, check_compatible, plan_lora, unmatched_error
from .progress import Progress

SCALED_FP8_MARKER = "scaled_fp8"
COPY_CHUNK = 64 << 20
PREFETCH = 2
WRITE_BEHIND = 2


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
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def _apply_ops(w32: torch.Tensor, ops: list[Op]) -> None:
    for op in ops:
        t = op.target
        view = w32 if t.rows is None else w32.narrow(0, t.rows[0], t.rows[1] - t.rows[0])
        if t.transform == "transpose":
            view = view.t()
        work = view
        if t.transform == "swap_halves":  # apply to the re-laid-out rows, then lay them back
            half = view.shape[0] // 2
            work = torch.cat([view[half:], view[:half]])
        if op.part == "weight":
            op.adapter.apply_(work, op.strength)
        else:
            work.add_(op.adapter.bias_delta().to(work.device).reshape(work.shape), alpha=op.strength)
        if work is not view:
            half = view.shape[0] // 2
            view[:half] = work[half:]
            view[half:] = work[:half]


class _Writer:
    """Copies/writes into the temporary OUT at the same data offsets as BASE."""

    def __init__(self, src: SafetensorsFile, dst_fd: int, header: bytes, progress: Progress) -> None:
        self.src, self.fd, self.progress = src, dst_fd, progress
        self.dst_start = len(header)
        self._pwrite(header, 0)

    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def copy(self, begin: int, end: int) -> None:
        """Copy data-section bytes [begin, end) unchanged."""
        src_off, dst_off = self.src.data_start + begin, self.dst_start + begin
        left = end - begin
        while left > 0:
            n = min(left, COPY_CHUNK)
            try:
                done = os.copy_file_range(self.src.fileno(), self.fd, n, src_off, dst_off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                done = 0
            if done <= 0:  # no kernel-side copy here: go through user space
                data = os.pread(self.src.fileno(), n, src_off)
                if not data:
                    raise OSError(errno.EIO, f"{self.src.name} ended early")
                self._pwrite(data, dst_off)
                done = len(data)
            src_off, dst_off, left = src_off + done, dst_off + done, left - done
            self.progress.advance(done)

    def write(self, info: TensorInfo, data: memoryview) -> None:
        self._pwrite(data, self.dst_start + info.begin)
        self.progress.advance(info.nbytes)


def _patch_tensor(stored: torch.Tensor, key: str, ops: list[Op], scale: float | None, *, device: torch.device,
                  rounding: str, seed: int) -> tuple[torch.Tensor, int]:
    w32 = stored.to(device).float()
    if scale is not None:
        w32 = w32 * scale
    fp8 = is_fp8(stored.dtype)
    orig = w32.clone() if fp8 else None
    _apply_ops(w32, ops)
    if not fp8:
        return w32.to(stored.dtype).cpu(), 0
    out = stored.clone()
    rows = out.shape[0] if out.dim() else 1
    o2, w2, r2 = out.reshape(rows, -1), w32.reshape(rows, -1), orig.reshape(rows, -1)
    per_row = o2.shape[1]
    step = max(1, ROUND_CHUNK_ELEMENTS // max(per_row, 1))
    saturated = 0
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        saturated += round_into(o2[sl], w2[sl].cpu(), r2[sl].cpu(), rounding=rounding, seed=seed, key=key,
                                index_offset=r0 * per_row, scale=scale)
    return out, saturated


def _stream(src: SafetensorsFile, writer: "_Writer", ops: dict[str, list[Op]], scales: dict[str, float],
            saturated: dict[str, int], *, device: torch.device, rounding: str, seed: int) -> None:
    """Read-ahead, patch and write-behind on two I/O threads, so disk and compute overlap.

    At most PREFETCH tensors are read ahead and WRITE_BEHIND results wait to be written,
    which bounds memory to a few tensors whatever the file size.
    """
    touched = [k for k in src.order if k in ops]
    reader, out = ThreadPoolExecutor(1, "lorakit-read"), ThreadPoolExecutor(1, "lorakit-write")
    reads: deque = deque(reader.submit(src.get, k) for k in touched[:PREFETCH])
    writes: deque = deque()
    try:
        pos = 0
        for i, key in enumerate(touched):
            info = src.tensors[key]
            writes.append(out.submit(writer.copy, pos, info.begin))
            stored = reads.popleft().result()
            if i + PREFETCH < len(touched):
                reads.append(reader.submit(src.get, touched[i + PREFETCH]))
            new, sat = _patch_tensor(stored, key, ops[key], scales.get(key), device=device, rounding=rounding,
                                     seed=seed)
            del stored
            if sat:
                saturated[key] = sat
            writes.append(out.submit(writer.write, info, tensor_bytes(new)))
            while len(writes) > WRITE_BEHIND:
                writes.popleft().result()
            pos = info.end
        writes.append(out.submit(writer.copy, pos, src.file_size - src.data_start))
        while writes:
            writes.popleft().result()
    finally:
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
        bar = Progress(src.file_size - src.data_start, "merging", enabled=progress)
        saturated: dict[str, int] = {}
        try:
            writer = _Writer(src, fd, header, bar)
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


def _fp8_scales(src: SafetensorsFile, ops: dict[str, list[Op]]) -> dict[str, float]:
    """Per-layer ``scale_weight`` of ComfyUI scaled-fp8 checkpoints, for the touched weights."""
    if SCALED_FP8_MARKER not in src.tensors:
        return {}
    scales = {}
    for key in ops:
        if key.endswith(".weight"):
            skey = key[: -len("weight")] + "scale_weight"
            if skey in src.tensors:
                scales[key] = float(src.get(skey).float().reshape(-1)[0])
    return scales


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
