"""The files of a grid: written whole with the umask's mode, damaged ones moved aside, leftovers of
interrupted writes removed, and one lock per run so that processes sharing a directory never train
the same run at the same time.

* :func:`write` writes a file atomically (apl_kernels.files, with the mode the umask gives new
  files) and turns an ``OSError`` (disk full, quota) into :class:`WriteError`,
  one line naming the file.
* :func:`write_verified` / :func:`read_verified`: a file that carries the SHA-256 digest of its
  content, checked before anything in it is trusted (checkpoints: torch.load reads flipped bytes
  inside a tensor without complaint).
* :func:`move_aside` renames a damaged file to ``<name>.corrupt`` (kept for inspection) and warns.
* :func:`remove_stale_temporaries` removes the ``*.tmp`` files of interrupted atomic writes.
* :class:`RunLock`: ``locks/<run>.lock`` holds the owner's process id and host, and is created
  whole (linked into place) or not at all. A lock whose owner is gone (the process no longer
  exists on this host, or no heartbeat for :data:`STALE_LOCK_S`) or that cannot be read (damage,
  as locks are never partly written) is taken over; a live owner touches its locks every
  :data:`HEARTBEAT_S`. An owner checks that its lock is still its own before it writes a run's
  files (:meth:`RunLock.check_held`), so a process that lost it while stopped yields the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
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


class LockLost(Exception):
    """This process no longer holds the lock of the run it trains (it was stopped past
    :data:`STALE_LOCK_S` and another process took the run over); the message says so."""


class WriteError(OSError):
    """A file could not be written; the message names it and says what was kept."""


def warn(message: str) -> None:
    """One ``warning:`` line on stderr, above any progress bars."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def write(path: Path, write_to: Callable[[BinaryIO], object], kept: str = "", exclusive: bool = False) -> None:
    """Write ``path`` atomically through ``write_to(file)``; :class:`WriteError` on failure.

    ``kept`` is added to the error: what the failure leaves intact (the previous file always is).
    ``exclusive``: ``FileExistsError`` if ``path`` exists (files.atomic_write).
    """
    try:
        files.atomic_write(Path(path), write_to, exclusive)
    except OSError as err:
        if exclusive and isinstance(err, FileExistsError):
            raise  # not a failure: the caller asked to be told
        raise WriteError(f"could not write {path} ({err.strerror or err}){kept}") from None


def write_text(path: Path, text: str, kept: str = "", exclusive: bool = False) -> None:
    write(path, lambda f: f.write(text.encode()), kept, exclusive)


DIGEST_HEADER = b"apl-kernels sha256 "  # then 64 hex digits, a newline, and the content


def write_verified(path: Path, write_to: Callable[[BinaryIO], object], kept: str = "") -> None:
    """:func:`write`, the file starting with the SHA-256 digest of what ``write_to`` writes."""
    def write_with_digest(f: BinaryIO) -> None:
        buffer = io.BytesIO()
        write_to(buffer)
        content = buffer.getbuffer()
        f.write(DIGEST_HEADER + hashlib.sha256(content).hexdigest().encode() + b"\n")
        f.write(content)

    write(path, write_with_digest, kept)


def read_verified(path: Path) -> bytes:
    """The content of a file written by :func:`write_verified`; ``ValueError`` if its digest is
    missing or does not match (the file is damaged)."""
    data = Path(path).read_bytes()
    start = len(DIGEST_HEADER) + 65
    if not data:
        raise ValueError("empty")
    if not data.startswith(DIGEST_HEADER) or data[start - 1:start] != b"\n":
        raise ValueError("no SHA-256 digest at its start (random bytes, or written by an older version)")
    content = data[start:]
    if hashlib.sha256(content).hexdigest().encode() != data[len(DIGEST_HEADER):start - 1]:
        raise ValueError("its content does not match its SHA-256 digest (truncated or altered)")
    return content


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
    warn(f"{path} is damaged ({first_line(reason)}); moved to {target.name}; {consequence}")
    return target


def json_object(content: bytes) -> dict:
    """``content`` as a JSON object; ``ValueError`` if it is not one (truncated, garbage)."""
    if not content:
        raise ValueError("empty")
    data = json.loads(content.decode())
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    return data


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ``ValueError`` if the file is not one (truncated, garbage)."""
    return json_object(Path(path).read_bytes())


def child(folder: Path, name: str) -> Path:
    """``folder / name`` for a file name built from file content, reduced to a safe file name
    (letters, digits and ``._+-``, anything else ``_``, no leading dot): a file directly in
    ``folder``, whatever ``name`` holds (``/``, ``..``)."""
    return Path(folder) / (re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "_")


def first_line(reason: object) -> str:
    """The first line of an exception or message, at most 200 characters: for one-line warnings."""
    return (str(reason).strip().splitlines() or [type(reason).__name__])[0][:200]


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
            return {}  # damaged

    @classmethod
    def stale(cls, modified: float, owner: dict) -> bool:
        """Whether a lock last touched at time ``modified`` by ``owner`` is abandoned."""
        if time.time() - modified >= STALE_LOCK_S:
            return True
        same_host = owner.get("host") == socket.gethostname()
        return same_host and isinstance(owner.get("pid"), int) and not process_alive(owner["pid"])

    @classmethod
    def acquire(cls, path: Path) -> RunLock | None:
        path = Path(path)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": os.urandom(8).hex(),
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        text, kept = json.dumps(owner), "; free some space and run the same command again"
        try:
            write_text(path, text, kept, exclusive=True)
        except FileExistsError:
            if not cls._remove_if_abandoned(path):
                return None
            try:
                write_text(path, text, kept, exclusive=True)
            except FileExistsError:
                return None  # another process created one meanwhile
            # A process that judged the old lock at the same time as this one may have moved this
            # one aside by mistake and put it back, or lost it: check that it is still ours.
            time.sleep(0.05)
            if cls.read_owner(path) != owner:
                return None
        lock = cls(path, owner)
        cls._held.add(path)
        cls._start_heartbeat()
        return lock

    @classmethod
    def _remove_if_abandoned(cls, path: Path) -> bool:
        """Remove lock ``path`` if its owner is gone or it cannot be read; ``False`` if it is held."""
        try:
            judged_file = open(path, "rb")
        except FileNotFoundError:
            return True  # released meanwhile
        with judged_file:  # open until it is moved: a new lock cannot get its inode number meanwhile
            judged = os.fstat(judged_file.fileno())
            try:
                owner = json_object(judged_file.read())
            except ValueError as err:  # locks are written whole: this one is damaged
                warn(f"{path} is not a readable lock ({first_line(err)}); taking it over")
            else:
                if not cls.stale(judged.st_mtime, owner):
                    return False
            # Renamed aside before it is removed: of processes judging it at once, one alone moves it.
            aside = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return True  # another process moved it first
            moved = os.stat(aside)
        if (moved.st_dev, moved.st_ino) != (judged.st_dev, judged.st_ino):
            # Another process replaced it between this look and the move: put its lock back.
            try:
                os.link(aside, path)
            except FileExistsError:
                pass  # a third created one meanwhile; the other's check after 50 ms sees its loss
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def held(self) -> bool:
        """Whether the lock is still this one's: not taken over (after a stop of this process past
        :data:`STALE_LOCK_S`, a suspended laptop, a preempted job) nor removed since."""
        return self.read_owner(self.path) == self.owner

    def check_held(self, what: str) -> None:
        """:class:`LockLost` unless :meth:`held`; ``what`` names the run in its message."""
        if not self.held():
            raise LockLost(f"{what}: this process lost its lock {self.path} (it was stopped for longer than "
                           f"{STALE_LOCK_S / 60:.0f} minutes and another process took the run over); the run "
                           f"is left to that process, and its result kept")

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


def describe_owner(path: Path) -> str | None:
    """``pid N on HOST`` of lock ``path``'s owner; ``None`` if the lock is gone (released since it was
    seen) or unreadable."""
    owner = RunLock.read_owner(path)
    if not owner or "pid" not in owner or "host" not in owner:
        return None
    return f"pid {owner['pid']} on {owner['host']}"
