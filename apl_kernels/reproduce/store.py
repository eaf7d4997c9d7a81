"""The files of a grid: written whole with the umask's mode, damaged ones moved aside, leftovers of
interrupted writes removed, and one lock per run so that processes sharing a directory never train
the same run at the same time.

* :func:`write` writes a file atomically (apl_kernels.files, with the mode the umask gives new
  files) and turns an ``OSError`` (disk full, quota) into :class:`WriteError`,
  one line naming the file.
* :func:`move_aside` renames a damaged file to ``<name>.corrupt`` (kept for inspection) and warns.
* :func:`remove_stale_temporaries` removes the ``*.tmp`` files of interrupted atomic writes.
* :class:`RunLock`: ``locks/<run>.lock`` holds the owner's process id and host. A lock whose owner
  is gone (the process no longer exists on this host, or no heartbeat for :data:`STALE_LOCK_S`) is
  taken over; a live owner touches its locks every :data:`HEARTBEAT_S`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

from tqdm.auto import tqdm

from .. import files

HEARTBEAT_S = 60.0  # a lock's owner touches it this often
STALE_LOCK_S = 600.0  # a lock not touched for this long is stale, whoever owned it
STALE_TMP_S = 600.0  # a temporary file not written to for this long belongs to no live write


class WriteError(OSError):
    """A file could not be written; the message names it and says what was kept."""


def warn(message: str) -> None:
    """One ``warning:`` line on stderr, above any progress bars."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def write(path: Path, write_to: Callable[[BinaryIO], object], kept: str = "") -> None:
    """Write ``path`` atomically through ``write_to(file)``; :class:`WriteError` on failure.

    ``kept`` is added to the error: what the failure leaves intact (the previous file always is).
    """
    try:
        files.atomic_write(Path(path), write_to)
    except OSError as err:
        raise WriteError(f"could not write {path} ({err.strerror or err}){kept}") from None


def write_text(path: Path, text: str, kept: str = "") -> None:
    write(path, lambda f: f.write(text.encode()), kept)


def move_aside(path: Path, reason: object, consequence: str) -> Path | None:
    """Rename damaged ``path`` to ``<path>.corrupt`` (``.corrupt2``... if taken) and warn; ``None``
    if another process moved it first."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.corrupt{number}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    first_line = (str(reason).strip().splitlines() or [type(reason).__name__])[0][:200]
    warn(f"{path} is damaged ({first_line}); moved to {target.name}; {consequence}")
    return target


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ``ValueError`` if the file is not one (truncated, garbage)."""
    data = json.loads(Path(path).read_bytes().decode())
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    return data


def temporaries(folder: Path, name: str = "*") -> list[Path]:
    """Temporary files of interrupted atomic writes of ``folder/name`` (apl_kernels.files' names)."""
    return sorted(Path(folder).glob(f".{name}.*.tmp"))


def remove_stale_temporaries(folders: list[Path], older_than: float = STALE_TMP_S) -> list[Path]:
    """Remove temporary files in ``folders`` not written to for ``older_than`` seconds."""
    removed = []
    now = time.time()
    for folder in folders:
        for path in temporaries(folder):
            try:
                if now - path.stat().st_mtime >= older_than:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                pass  # another process removed or renamed it
    return removed


def prepare_output(out: Path, create: bool = True) -> None:
    """Make sure ``out`` is (or can become) a writable directory; ``create`` it and write a file.

    Raises :class:`WriteError` saying what is wrong with it.
    """
    out = Path(out)
    if not create:  # a dry run: check without creating anything
        existing = next(p for p in [out, *out.parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "is not a directory" if not existing.is_dir() else "is not writable"
            raise WriteError(f"--out {out}: {existing} {what}; choose a directory you can write to")
        return
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise WriteError(f"--out {out} is not a directory this process can write to "
                         f"({err.strerror or err}); choose another --out") from None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class RunLock:
    """``locks/<run>.lock``: who trains a run. :meth:`acquire` returns a held lock or ``None``."""

    _held: set[Path] = set()
    _heartbeat: threading.Thread | None = None

    def __init__(self, path: Path, owner: dict) -> None:
        self.path, self.owner = path, owner

    @staticmethod
    def read_owner(path: Path) -> dict | None:
        """The lock's owner (pid, host, token), ``{}`` if unreadable, ``None`` if there is no lock."""
        try:
            return read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: judged by its age alone

    @classmethod
    def stale(cls, path: Path, owner: dict) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age >= STALE_LOCK_S:
            return True
        same_host = owner.get("host") == socket.gethostname()
        return same_host and isinstance(owner.get("pid"), int) and not process_alive(owner["pid"])

    @classmethod
    def acquire(cls, path: Path) -> RunLock | None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": os.urandom(8).hex(),
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, files.file_mode())
        except FileExistsError:
            current = cls.read_owner(path)
            if current is not None and not cls.stale(path, current):
                return None
            # The owner is gone: take the lock over, then check that no other process did too.
            write_text(path, json.dumps(owner))
            time.sleep(0.05)
            if cls.read_owner(path) != owner:
                return None
        else:
            with os.fdopen(handle, "w") as f:
                f.write(json.dumps(owner))
        lock = cls(path, owner)
        cls._held.add(path)
        cls._start_heartbeat()
        return lock

    def release(self) -> None:
        RunLock._held.discard(self.path)
        if self.read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @classmethod
    def _start_heartbeat(cls) -> None:
        if cls._heartbeat is not None and cls._heartbeat.is_alive():
            return

        def beat() -> None:
            while True:
                time.sleep(HEARTBEAT_S)
                for path in list(cls._held):
                    try:
                        os.utime(path)
                    except OSError:
                        pass

        cls._heartbeat = threading.Thread(target=beat, name="apl-run-lock-heartbeat", daemon=True)
        cls._heartbeat.start()


def describe_owner(path: Path) -> str:
    owner = RunLock.read_owner(path) or {}
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
