"""Where a command may write: the checks every writing command (merge, sample, workflow jobs) makes on
OUT before any work, and the temporary file beside it that becomes OUT only when complete.

Inputs are read-only by identity: OUT may not be any input file — compared by device and inode
(so symlinks and hard links count) and by resolved path — with or without ``--force``; only
``--in-place`` lets OUT be BASE, and even then OUT is written to a temporary file first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import OutputError

TEMP_SUFFIX = ".lorakit-tmp"
TEMP_EXTRA = len(".") + len(".") + 8 + len(TEMP_SUFFIX)  # "." + name + "." + mkstemp's 8 characters + suffix


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def is_folder(out: str | os.PathLike) -> bool:
    """OUT names a folder: it ends with a path separator, or is an existing folder."""
    text = os.fspath(out)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def resolve_out(out: str | os.PathLike, default_name: str) -> tuple[Path, bool]:
    """OUT as a file path, and whether its folder is still to be made: a folder (``baked/``) means
    ``<folder>/<default_name>``; a folder that does not exist yet is made when its parent exists."""
    if not is_folder(out):
        return Path(out), False
    folder = Path(out)
    if not folder.exists() and not folder.parent.is_dir():
        raise OutputError(f"{os.fspath(out)}: folder {folder.parent} does not exist (OUT ends with '/': a folder)")
    return folder / default_name, not folder.exists()


def check_output(out: Path, *, base: Path | None, others: Sequence[Path] = (), force: bool,
                 in_place: bool = False, suffixes: tuple[str, ...] = (), new_folder: bool = False) -> None:
    """Refuse, in one line, an OUT that cannot or may not be written; writes nothing.

    ``base`` and ``others``: every file the command reads (``--in-place`` lets OUT be ``base``
    only). ``suffixes``: the file types this command writes. ``new_folder``: OUT's folder is made
    just before writing (its parent must be a writable folder)."""
    if not out.name or out.name in (".", ".."):
        raise OutputError(f"{out}: give a file name for OUT")
    if "\0" in str(out):
        raise OutputError(f"{out!r}: OUT contains a NUL byte")
    folder = out.parent
    if new_folder:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{out}: folder {folder} does not exist")
    name, limit = len(os.fsencode(out.name)), _name_max(folder)
    if name + TEMP_EXTRA > limit:
        raise OutputError(f"{out}: the name is {name} bytes; lorakit writes a temporary file named after it "
                          f"({name + TEMP_EXTRA} bytes) beside it first, and this folder allows {limit}")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name for OUT")
    present = out.exists() or out.is_symlink()
    if present:
        for src in others:
            if _same_file(out, src):
                raise OutputError(f"{out}: OUT is the input {src}; inputs are never overwritten")
        if base is not None and _same_file(out, base):
            if not in_place:
                raise OutputError(f"{out}: OUT is BASE; pass --in-place to overwrite BASE (written to a temporary "
                                  "file first)")
        elif not force:
            raise OutputError(f"{out}: already exists; pass --force to replace it")
    if suffixes and out.suffix.lower() not in suffixes:
        raise OutputError(f"{out}: this command writes {' / '.join(suffixes)} files; name OUT with that suffix")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {folder} is not writable")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def new_file_mode(keep_from: Path | None) -> int:
    """mkstemp makes 0600 files; OUT gets BASE's mode when replacing it, else 0666 minus umask."""
    if keep_from is not None:
        return os.stat(keep_from).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
