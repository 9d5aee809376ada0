"""Declarative module tables: one row per module of another space (diffusers, XLabs, ...) and the
native module it is (or the row parts of a fused native module). One table gives both directions:

* ``expand`` — the alias side: for a base file's native modules, every name of the table's space
  and its ``Target`` (rows of a fused weight, a re-layout);
* ``view`` — the diffusers side: for a diffusers state dict, each native (single-file) tensor as
  ``Block``s of real diffusers tensors (``arch.diffusers``).

Templates use ``{i}`` for a block index; indices are read from whichever side is at hand, so no
block count is ever written down. Fused native modules list their row parts by size name
(``FUSED``: ``("h", "h", "h", "mlp")``); sizes come from the family's ``dims`` (read from the file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .spec import Block, Shapes, Signature, Split, Target

Fused = dict[str, tuple[str, ...]]  # native module template -> row part size names


@dataclass(frozen=True)
class Row:
    """``name`` (in the table's space) is ``native``, or its row ``part`` (an index, or a half-open
    range of part indices) of a fused native module; ``transform`` re-lays the rows out;
    ``leaf``: the native parameter's name when it is not ``weight`` (BFL RMSNorm ``scale``), or
    ``""`` for a bare parameter (Wan's ``blocks.N.modulation``: the key is the name itself)."""

    name: str
    native: str
    part: int | tuple[int, int] | None = None
    transform: str | None = None
    leaf: str = "weight"


@dataclass(frozen=True)
class Fan:
    """``name`` (in the table's space) is one module whose output rows are the native modules
    ``natives`` in order: a fused projection (diffusers' ``to_qkv`` after ``fuse_qkv_projections``,
    SimpleTuner's fused LoRAs) over a base that stores the parts apart. Present when all are."""

    name: str
    natives: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    space: str
    rows: tuple[Row | Fan, ...]


@lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _fill(template: str, m: re.Match) -> str:
    return template.format(**m.groupdict())


def _part_rows(part: int | tuple[int, int], sizes: tuple[int, ...]) -> tuple[int, int]:
    a, b = (part, part + 1) if isinstance(part, int) else part
    return sum(sizes[:a]), sum(sizes[:b])


def fused_sizes(fused: Fused, module: str, dims: dict[str, int]) -> tuple[int, ...] | None:
    for template, parts in fused.items():
        if _pattern(template).match(module):
            return tuple(dims[p] for p in parts)
    return None


MODULE_LEAVES = ("weight", "bias", "scale")  # a parameter named otherwise is a bare parameter


def native_space(shapes: Shapes, prefix: str, leaves: tuple[str, ...], fused: Fused,
                 dims: dict[str, int], bare: bool = False) -> dict[str, Target]:
    """Every native module of a component (its parameters named by ``leaves``) as a target of
    the whole tensor; with ``bare``, every bare parameter (Wan's ``modulation``) too, under its
    own name. Fused modules know their part sizes (kohya split_qkv files)."""
    out: dict[str, Target] = {}
    for key in sorted(shapes):
        if not key.startswith(prefix):
            continue
        path = key[len(prefix):]
        module, _, leaf = path.rpartition(".")
        if leaf in leaves and module:
            out.setdefault(module, Target(key, splits=fused_sizes(fused, module, dims)))
        elif bare and leaf not in MODULE_LEAVES:
            out.setdefault(path, Target(key))
    return out


def _fan(row: Fan, modules: dict[str, set[str]], prefix: str) -> dict[str, Split]:
    out = {}
    rx = _pattern(row.natives[0])
    for module in sorted(modules):
        m = rx.match(module)
        if m is None or "weight" not in modules[module]:
            continue
        natives = [_fill(n, m) for n in row.natives]
        if all("weight" in modules.get(n, ()) for n in natives):
            out[_fill(row.name, m)] = Split(tuple(Target(f"{prefix}{n}.weight") for n in natives))
    return out


def expand(table: Table, shapes: Shapes, prefix: str, fused: Fused,
           dims: dict[str, int]) -> dict[str, Target | Split]:
    """The table's names for the native modules of a base file."""
    modules: dict[str, set[str]] = {}
    for key in shapes:
        if key.startswith(prefix):
            module, _, leaf = key[len(prefix):].rpartition(".")
            modules.setdefault(module, set()).add(leaf)
            modules.setdefault(key[len(prefix):], set()).add("")  # as a bare parameter
    out: dict[str, Target | Split] = {}
    for row in table.rows:
        if isinstance(row, Fan):
            out.update(_fan(row, modules, prefix))
            continue
        rx = _pattern(row.native)
        for module in sorted(modules):
            m = rx.match(module)
            if m is None or row.leaf not in modules[module]:
                continue
            rows = None
            if row.part is not None:
                sizes = fused_sizes(fused, module, dims)
                rows = _part_rows(row.part, sizes)
            key = f"{prefix}{module}.{row.leaf}" if row.leaf else f"{prefix}{module}"
            out[_fill(row.name, m)] = Target(key, rows, row.transform)
    return out


@dataclass
class Layout:
    """A diffusers state dict seen as the single-file layout: logical key -> shape and the blocks of
    real tensors its rows live in."""

    name: str
    shapes: Shapes
    blocks: dict[str, list[Block]]


def view(table: Table, shapes: Shapes, name: str) -> Layout:
    """Invert ``table`` over a diffusers state dict: every native tensor (weights and biases) made
    of the diffusers tensors of its parts, in part order."""
    parts: dict[str, list[tuple[int, str, Row]]] = {}  # native key -> (part index, diffusers key, row)
    modules: dict[str, list[str]] = {}
    for key in shapes:
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, []).append(leaf)
    for row in table.rows:
        if isinstance(row, Fan):  # a fused name of the LoRA side; diffusers stores the parts
            continue
        rx = _pattern(row.name)
        if not row.leaf:  # a bare parameter: the key is the name
            for key in shapes:
                m = rx.match(key)
                if m is not None:
                    parts.setdefault(_fill(row.native, m), []).append((0, key, row))
            continue
        for module, leaves in modules.items():
            m = rx.match(module)
            if m is None:
                continue
            native = _fill(row.native, m)
            for leaf in leaves:
                if leaf not in ("weight", "bias"):
                    continue
                nleaf = row.leaf if leaf == "weight" else leaf
                index = 0 if row.part is None else (row.part if isinstance(row.part, int) else row.part[0])
                parts.setdefault(f"{native}.{nleaf}", []).append((index, f"{module}.{leaf}", row))
    logical: Shapes = {}
    blocks: dict[str, list[Block]] = {}
    for key, items in parts.items():
        items.sort(key=lambda t: t[0])
        lo, out = 0, []
        for _, dkey, row in items:
            shape = shapes[dkey]
            n = shape[0] if shape else 1
            if row.transform == "swap_halves":  # diffusers [scale; shift] = BFL [shift; scale]
                half = n // 2
                out += [Block(dkey, (lo, lo + half), half), Block(dkey, (lo + half, lo + n), 0)]
            else:
                out.append(Block(dkey, (lo, lo + n)))
            lo += n
        blocks[key] = out
        first = shapes[items[0][1]]
        logical[key] = (lo,) + tuple(first[1:])
    return Layout(name, logical, blocks)


@dataclass(frozen=True)
class View:
    """A family's diffusers layout: recognised by ``signature`` (diffusers keys), read through
    ``table`` (or, for layouts a table cannot express, ``build``)."""

    name: str
    signature: Signature
    table: Table | None = None
    build: object = None  # (shapes) -> Layout

    def layout(self, shapes: Shapes) -> Layout:
        return view(self.table, shapes, self.name) if self.table is not None else self.build(shapes)
