"""The weight cache's directory: where it is, how large it may grow, which entries are in use, and which
are deleted when it grows beyond its cap (least recently used first). ``ttswap.cache`` decides what an
entry holds; this module only handles files.

An entry is one file, ``<key>.safetensors``; its modification time is its last use (a hit touches it).

* Writing is atomic: a writer writes ``.<key>.<pid>.<token>.tmp`` while holding an exclusive ``flock``
  on it and renames it into place. A reader never sees half an entry, and a writer killed mid-write
  leaves only its temporary file, which nothing reads and the next eviction deletes (its lock died
  with the writer).
* An entry in use is never evicted: a conversion reading an entry holds a shared ``flock`` on it until
  it is done with the file; eviction asks for an exclusive lock without waiting and skips the entry
  when it cannot have one. ``flock`` locks belong to an open file, so this holds between processes
  and within one. A reader that opened an entry just before it was evicted sees, once it has its
  lock, that the file is no longer the entry, and converts as on a miss.
* A converted model keeps the weights of a hit mapped from the file after the conversion. Evicting
  that file later does not disturb it (an unlinked file lives on while mapped; its blocks are freed
  when the model is).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("ttswap")

ENV_DIR = "TTSWAP_CACHE_DIR"
ENV_MAX_BYTES = "TTSWAP_CACHE_MAX_BYTES"
# Why 2 GiB: an entry holds one conversion's prepared weights, about the model's fp32 size (YOLOv4,
# the largest shipped model: 258 MB; a ResNet-50: ~100 MB; VoVNet-19: ~25 MB). 2 GiB keeps the last
# ~8 YOLOv4 conversions or a few dozen smaller ones, enough for a working set of models x recipes x
# backends, while a hit saves seconds, not minutes: entries older than that are cheap to rebuild.
DEFAULT_MAX_BYTES = 2 * 2**30
SUFFIX = ".safetensors"
STALE_TEMP_SECONDS = 10.0  # a temporary file this old and unlocked belongs to a dead writer
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


# -- where, and how large ----------------------------------------------------------------------------


def default_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ttswap" / "weights"


def cache_dir(cache: "bool | str | Path") -> Path | None:
    """Where ``convert(cache=...)`` keeps its files; None when caching is off."""
    if cache is False:
        return None
    if cache is True:
        return default_dir()
    if isinstance(cache, (str, Path)):
        return Path(cache).expanduser()
    raise TypeError(f"cache must be True, False or a directory, got {cache!r}")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from ``"1073741824"``, ``"512M"``, ``"2G"``, ``"1.5GiB"`` (binary units, case-insensitive)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not found:
        raise ValueError(f"{what} must be a number of bytes such as 2147483648, 512M or 2G, got {text!r}")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def max_bytes(override: "int | str | None" = None) -> int:
    """The cap: ``override`` (``convert(cache_max_bytes=...)``), else ``$TTSWAP_CACHE_MAX_BYTES``, else
    ``DEFAULT_MAX_BYTES``. 0 means that nothing is written."""
    if override is None:
        text = os.environ.get(ENV_MAX_BYTES, "").strip()
        return parse_size(text, ENV_MAX_BYTES) if text else DEFAULT_MAX_BYTES
    if isinstance(override, str):
        return parse_size(override, "cache_max_bytes")
    if isinstance(override, bool) or not isinstance(override, int) or override < 0:
        raise ValueError(f"cache_max_bytes must be a number of bytes >= 0, got {override!r}")
    return override


# -- entries -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: Path
    size: int
    last_used: float  # seconds since the epoch

    @property
    def key(self) -> str:
        return self.path.name.removesuffix(SUFFIX)


def entries(directory: Path) -> list[Entry]:
    """The directory's entries, least recently used first (none if it does not exist)."""
    found = []
    for path in directory.glob(f"*{SUFFIX}"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # evicted meanwhile
            continue
        found.append(Entry(path, stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda e: (e.last_used, e.path.name))


def _names_this_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not evicted, not replaced)."""
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return mine.st_nlink > 0 and (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


class EntryLock:
    """A shared lock on one entry, held while a conversion reads it: eviction skips a locked entry."""

    def __init__(self, fd: int, path: Path):
        self.path = path
        self._fd: int | None = fd
        self._closer = weakref.finalize(self, os.close, fd)  # released even if the conversion fails

    @classmethod
    def acquire(cls, path: Path, attempts: int = 3) -> "EntryLock | None":
        """Lock the entry at ``path``; None if there is none (also if it keeps being replaced)."""
        for _ in range(attempts):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction decides about this file
            if _names_this_file(fd, path):
                return cls(fd, path)
            os.close(fd)  # evicted or replaced between open and lock: look again
        return None

    @property
    def readable_path(self) -> str:
        """A path to exactly the locked file, even if ``path`` has since been replaced."""
        proc = Path(f"/proc/self/fd/{self._fd}")
        return str(proc) if proc.exists() else str(self.path)

    def remove(self) -> None:
        """Delete the entry (it is damaged), unless ``path`` already names another file."""
        assert self._fd is not None
        try:
            if _names_this_file(self._fd, self.path):
                self.path.unlink()
        except OSError as exc:  # a read-only directory: the next conversion finds it damaged again
            log.info("weight cache: could not delete %s: %s", self.path, exc)

    def touch(self) -> None:
        """Mark the entry used now: eviction deletes least recently used entries first."""
        try:
            os.utime(self.path)
        except OSError:  # read-only: the entry only ages, which is harmless
            pass

    def release(self) -> None:
        if self._fd is not None:
            self._closer()
            self._fd = None


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary path)`` then rename it to ``path``; on any error, no file is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # tells eviction that the writer is alive
        write(temp)  # writes through the name: the same file, so the lock covers it
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


# -- eviction ----------------------------------------------------------------------------------------


@dataclass
class Pruned:
    """What one eviction did."""

    removed: list[Entry] = field(default_factory=list)
    in_use: list[Entry] = field(default_factory=list)  # would have been removed, but a conversion holds it
    temporary_files: int = 0  # left by writers that died mid-write

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)


def _remove_unless_in_use(path: Path) -> bool:
    """Delete ``path`` if nobody holds a lock on it; False if somebody does (or it was replaced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # another process evicted it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        if not _names_this_file(fd, path):
            return not path.exists()  # replaced by a new entry: that one stays
        path.unlink()
        return True
    finally:
        os.close(fd)


def _remove_dead_writers_files(directory: Path) -> int:
    now, removed = time.time(), 0
    for temp in directory.glob(f".*{SUFFIX}.*.tmp"):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS and _remove_unless_in_use(temp):
                removed += 1
        except OSError:  # gone meanwhile, or a read-only directory
            continue
    return removed


def prune(directory: Path, limit: int, keep: Path | None = None) -> Pruned:
    """Delete least recently used entries until the directory holds at most ``limit`` bytes of them,
    never ``keep`` nor an entry in use, and the temporary files of dead writers."""
    result = Pruned()
    if not directory.is_dir():
        return result
    result.temporary_files = _remove_dead_writers_files(directory)
    found = entries(directory)
    total = sum(e.size for e in found)
    for entry in found:
        if total <= limit:
            break
        if entry.path == keep:
            continue
        try:
            removed = _remove_unless_in_use(entry.path)
        except OSError as exc:  # read-only directory
            log.info("weight cache: could not delete %s: %s", entry.path, exc)
            continue
        if removed:
            result.removed.append(entry)
            total -= entry.size
            log.info("weight cache: evicted %s (%.0f MB)", entry.path.name, entry.size / 1e6)
        else:
            result.in_use.append(entry)
    return result


__all__ = ["DEFAULT_MAX_BYTES", "ENV_DIR", "ENV_MAX_BYTES", "Entry", "EntryLock", "Pruned", "cache_dir",
           "default_dir", "entries", "max_bytes", "parse_size", "prune", "write_atomically"]
