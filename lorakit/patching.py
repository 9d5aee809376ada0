"""Patch LoRAs into a live model (state dict or nn.Module) in place, with exact restore and hot swap.

    handle = lorakit.patch(unet, ["style.safetensors:0.8"])   # single-file or diffusers names
    handle.set_strengths([0.5])                               # re-patch from the backup, one pass
    handle.restore()                                          # the original bits, from the backup

The backup holds the touched tensors only (policy "beside": a copy on the weights' own device,
fastest restore; "cpu": pinned host memory; "none": no copy, so no restore; "auto": beside unless
that would leave a GPU with less than 1 GiB free, then cpu). Restoring copies bits back,
never subtracts a delta, so any number of patch / restore / re-patch cycles never drift.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from .arch import detect
from .arch.diffusers import layout
from .arch.modules import Layout
from .codecs import default_rounding, plain
from .engine import Part, patch_generic_, updates, whole
from .codecs.rounding import count_nonfinite
from .errors import ArchitectureMismatch, NonFiniteError, PatchStateError, UsageError
from .io.container import TensorDict
from .ops import Prepared, Update
from .planner import LoraSpec, Op, Plan, parse_lora_arg, plan_loras
from .reports import PatchReport

BACKUP_POLICIES = ("auto", "beside", "cpu", "none")
GPU_BACKUP_HEADROOM = 1 << 30  # "auto" keeps at least this much GPU memory free after the backup


def _state_dict(target: object) -> dict[str, torch.Tensor]:
    if isinstance(target, torch.nn.Module):
        return {k: v.data if isinstance(v, torch.nn.Parameter) else v
                for k, v in target.state_dict(keep_vars=True).items()}
    if isinstance(target, dict) and all(isinstance(v, torch.Tensor) for v in target.values()):
        return target
    raise UsageError("patch() takes an nn.Module or a dict of tensors (a state dict), "
                     f"not {type(target).__name__}")


def _as_spec(item: object) -> LoraSpec:
    if isinstance(item, LoraSpec):
        return item
    if isinstance(item, (str, os.PathLike)):
        return parse_lora_arg(os.fspath(item)) if isinstance(item, str) else LoraSpec(os.fspath(item))
    raise UsageError(f"a LoRA is a path, 'path:model[:clip]' or a LoraSpec, not {type(item).__name__}")


def _views(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[int, ...]], Layout | None]:
    """Logical (single-file) shapes, and the diffusers layout behind them if it is one."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        detect(shapes, "the patch target")
        return shapes, None
    except ArchitectureMismatch:
        lay = layout(shapes)
        if lay is None:
            raise
        return lay.shapes, lay


@dataclass
class _Target:
    """One logical tensor with its ops: where its rows live and how they are stored."""

    key: str
    parts: list[Part]
    ops: list[Op]


class PatchHandle:
    """The patched state of one model; see the module docstring."""

    def __init__(self, the_plan: Plan, targets: list[_Target], specs: list[LoraSpec],
                 *, backup: str, rounding: str, seed: int, backend: str, allow_nonfinite: bool = False) -> None:
        self.plan, self.specs = the_plan, list(specs)
        self.allow_nonfinite = allow_nonfinite
        self.rounding, self.seed, self.backend = rounding, seed, backend
        self._touched = {p.key: p.tensor for t in targets for p in t.parts}
        self.backup_policy = _resolve_backup(backup, self._touched)
        self._backup = _make_backup(self._touched, self.backup_policy)
        self._generic: list[_Target] = []
        self._batch: list[tuple[Update, list[Op]]] = []  # each update with the op behind each segment
        for t in targets:
            ups = updates(t.parts, t.ops)
            if ups is None:
                self._generic.append(t)
            else:
                self._batch += ups
        self._ops = [op for t in targets for op in t.ops]
        self._prepared = Prepared([u for u, _ in self._batch], rounding=rounding, seed=seed, backend=backend)
        self._from_backup: Prepared | None = None  # lazily: re-patch reading the backup, one pass
        self.patched = False
        self.saturated: dict[str, int] = {}

    # -- public -------------------------------------------------------------------------------
    @property
    def touched(self) -> list[str]:
        """Keys of the real tensors this handle changes."""
        return sorted(self._touched)

    def report(self) -> PatchReport:
        """The plan's report with the strengths in force now (after any ``set_strengths``)."""
        loras = []
        for ls, entry in zip(self.specs, self.plan.loras):
            matched = [replace(m, strength=ls.strength_for(m.strength_kind)) for m in entry.matched]
            loras.append(replace(entry, model_strength=ls.model_strength, clip_strength=ls.clip, matched=matched))
        return PatchReport(**dict(self.plan.report_fields(), loras=loras), tensors_changed=len(self._touched),
                           backup=self.backup_policy, rounding=self.rounding, seed=self.seed,
                           fp8_saturated=dict(self.saturated))

    def set_strengths(self, strengths: list[float | tuple[float, float]]) -> None:
        """New (model[, clip]) strengths, one entry per LoRA: the weights become the original
        patched at the new strengths (in one pass from a same-device backup when every change is
        low-rank; else restore, then patch)."""
        if len(strengths) != len(self.specs):
            raise UsageError(f"{len(strengths)} strengths for {len(self.specs)} LoRAs")
        self._need_backup("set_strengths")
        for i, s in enumerate(strengths):
            model, clip = (s, None) if isinstance(s, (int, float)) else s
            self.specs[i] = LoraSpec(self.specs[i].path, float(model), None if clip is None else float(clip))
        for op in self._ops:
            op.strength = self.specs[op.lora_index].strength_for(op.strength_kind)
        for u, ops in self._batch:
            for g, op in zip(u.segments, ops):
                g.scale = op.scale
        self._prepared.rescaled()
        if self.patched and not self._generic and self.backup_policy == "beside":
            if self._from_backup is None:
                sourced = [Update(u.w, u.segments, u.key, u.codec, self._backup[u.key]) for u, _ in self._batch]
                self._from_backup = Prepared(sourced, rounding=self.rounding, seed=self.seed, backend=self.backend)
            else:
                self._from_backup.rescaled()
            self.saturated.clear()
            with torch.no_grad():
                self._from_backup.run()
            self._collect(self._from_backup)
            return
        self.restore()
        self.apply()

    def restore(self) -> None:
        """Put the original bits back (no-op when not patched)."""
        if not self.patched:
            return
        self._need_backup("restore")
        with torch.no_grad():
            for key, t in self._touched.items():
                t.copy_(self._backup[key])
        self.patched = False

    def apply(self) -> None:
        """Patch with the current strengths (done by ``patch()``; again after ``restore()``)."""
        if self.patched:
            return
        self.saturated.clear()
        counts: dict[str, int] = {}
        with torch.no_grad():
            for t in self._generic:
                n = patch_generic_(t.parts, t.ops, rounding=self.rounding, seed=self.seed,
                                   device=t.parts[0].tensor.device)
                if n:
                    counts[t.parts[0].key] = n
            self._prepared.run()
        self._collect(self._prepared, counts)

    def close(self) -> None:
        """Restore (when a backup exists) and free the backup."""
        if self._backup is not None:
            self.restore()
        self._backup = self._from_backup = None

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _collect(self, prepared: Prepared, counts: dict[str, int] | None = None) -> None:
        """Sort what the storage could not hold: fp8 saturation is reported; new inf / NaN in a wider
        format undo the patch (when a backup allows) and raise, unless ``allow_nonfinite``."""
        counts = dict(counts or {})
        for u in prepared.updates:
            if u.out_of_range:
                counts[u.key] = counts.get(u.key, 0) + u.out_of_range
        self.patched = True
        overflow = {}
        for key, n in counts.items():
            t = self._touched[key]
            if plain(t.dtype).coarse:
                self.saturated[key] = n
            else:
                new = n - (count_nonfinite(self._backup[key]) if self._backup is not None else 0)
                if new > 0:
                    overflow[key] = new
        if overflow and not self.allow_nonfinite:
            key = next(iter(overflow))
            undone = self._backup is not None
            if undone:
                self.restore()
            loras = ", ".join(ls.path for ls in self.specs)
            raise NonFiniteError(f"{loras}: patching {self.plan.base_path} writes {sum(overflow.values())} inf / NaN values "
                                 f"({overflow[key]} in {key}): the LoRA's change at these strengths overflows "
                                 f"{self._touched[key].dtype}; " + ("the weights were restored" if undone else
                                                   "the weights hold them (no backup to restore from)")
                                 + " (lower the strength, or allow_nonfinite=True)")

    def _need_backup(self, what: str) -> None:
        if self._backup is None:
            raise PatchStateError(f"{what}() needs the backup of the original weights, but this handle has none "
                               f"(backup={self.backup_policy!r} or already closed)")


def _resolve_backup(policy: str, touched: dict[str, torch.Tensor]) -> str:
    if policy not in BACKUP_POLICIES:
        raise UsageError(f"backup must be one of {', '.join(BACKUP_POLICIES)}, not {policy!r}")
    if policy != "auto":
        return policy
    cuda = [t for t in touched.values() if t.is_cuda]
    if not cuda:
        return "beside"
    need = sum(t.numel() * t.element_size() for t in cuda)
    free, _ = torch.cuda.mem_get_info(cuda[0].device)
    return "beside" if free - need >= GPU_BACKUP_HEADROOM else "cpu"


def _make_backup(touched: dict[str, torch.Tensor], policy: str) -> dict[str, torch.Tensor] | None:
    if policy == "none":
        return None
    if policy == "beside":
        return {k: t.clone() for k, t in touched.items()}
    pin = torch.cuda.is_available()
    return {k: t.to("cpu", copy=True).pin_memory() if pin else t.to("cpu", copy=True) for k, t in touched.items()}


def patch(target: object, loras: list[object], *, model_only: bool = False, backup: str = "auto",
          rounding: str | None = None, seed: int = 0, backend: str = "auto", allow_unmatched: bool = False,
          allow_nonfinite: bool = False) -> PatchHandle:
    """Patch ``loras`` (paths, ``"path:model[:clip]"`` strings or LoraSpec) into ``target`` in place.

    ``target`` is an ``nn.Module`` or a state dict with single-file names (ComfyUI / A1111 / Forge)
    or diffusers names (UNet2DConditionModel, FluxTransformer2DModel). Strict like ``merge``: keys
    that address nothing raise ``UnmatchedKeysError`` before anything is touched.
    Rounding defaults to stochastic for fp8 weights, nearest otherwise.
    """
    tensors = _state_dict(target)
    shapes, lay = _views(tensors)
    spec = detect(shapes, "the patch target")
    specs = [_as_spec(x) for x in loras]
    dtypes = ({k: v.dtype for k, v in tensors.items()} if lay is None else
              {k: tensors[b[0].key].dtype for k, b in lay.blocks.items()})
    the_plan = plan_loras("the patch target", spec, shapes, dtypes, specs, model_only=model_only,
                          allow_unmatched=allow_unmatched, allow_nonfinite=allow_nonfinite, keep_zero=True)
    targets = []
    files = TensorDict(tensors, "the patch target")
    for key, ops in the_plan.ops.items():
        if lay is None:
            parts = whole(key, tensors[key], files.codec(key))
        else:  # diffusers layouts: plain tensors
            parts = [Part(b, tensors[b.key], plain(tensors[b.key].dtype)) for b in lay.blocks[key]]
        targets.append(_Target(key, parts, ops))
    mode = default_rounding([p.codec for t in targets for p in t.parts], rounding)
    handle = PatchHandle(the_plan, targets, specs, backup=backup, rounding=mode, seed=seed, backend=backend,
                         allow_nonfinite=allow_nonfinite)
    handle.apply()
    return handle
