"""Files written whole or not at all: what the reproduction and the benchmarks write goes through here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def file_mode() -> int:
    """The mode the umask gives a new file (what ``open(path, "w")`` would create)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object], exclusive: bool = False) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it to ``path``: readers
    and interrupted writers never leave or see a half-written file. The file gets the mode a new
    file would (mkstemp's temporary files are private, 0600). It is on the disk before it gets its
    name, so that a power cut leaves the previous file or this one, whole.

    ``exclusive``: ``FileExistsError`` if ``path`` exists (the temporary file is hard-linked to
    ``path``, which fails if it exists, instead of renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    renamed = False
    try:
        os.fchmod(handle, file_mode())
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(temporary, path)
        else:
            os.replace(temporary, path)
            renamed = True
    finally:
        if not renamed:
            os.unlink(temporary)
    sync_directory(path.parent)


def sync_directory(folder: Path) -> None:
    """Put ``folder``'s entries (a new name) on the disk where the system can; failures are ignored:
    the file's own data is already there, and some systems cannot open or sync a directory."""
    try:
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))
