"""Atomic artifact writing and safe reading, shared by every package that writes files.

A file is written to a temporary sibling in the same directory, flushed,
``fsync``-ed and then renamed over the final name, so a crash at any moment
leaves either the old file or the complete new one, never a truncated file.
The renamed file gets the permission bits a plain ``open(path, "w")`` would
give: those of the file it replaces, or ``0o666 & ~umask`` for a new file
(``-rw-r--r--`` under the usual umask ``022``); created parent directories get
``0o777 & ~umask``.

Temporary files are named ``.<name>.~dc<host>.<pid>.<random>.tmp`` (``name``:
the final name's first 150 characters, ``host``: 8 hex digits of the SHA-256
of the host name, ``pid``: the writer's process).
A write killed before its rename (``SIGKILL``, power loss) leaves one behind;
every later :func:`atomic_write` into the same directory removes such
leftovers when they are provably abandoned: written on this host by a process
that no longer exists, or (any host, e.g. on a shared file system) not
modified for :data:`STALE_AFTER_SECONDS`.  A temporary file of a live writer
is never removed; other files are never touched.

``.npz`` archives are always read with ``allow_pickle=False``; a truncated or
corrupted archive raises :class:`CorruptFileError` naming the file.

>>> import tempfile, os, numpy as np
>>> d = tempfile.mkdtemp()
>>> save_npz(os.path.join(d, "a.npz"), x=np.arange(3))
>>> load_npz(os.path.join(d, "a.npz"))["x"]
array([0, 1, 2])
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import stat
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "CHECKSUM_KEY",
    "STALE_AFTER_SECONDS",
    "CorruptFileError",
    "atomic_write",
    "clean_stale_temporaries",
    "current_umask",
    "has_checksum",
    "load_npz",
    "npz_checksum",
    "save_npz",
]

logger = logging.getLogger(__name__)

#: A temporary file of :func:`atomic_write` not modified for this long (24 hours) is abandoned,
#: whichever host wrote it.
STALE_AFTER_SECONDS = 24 * 3600.0

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_PATTERN = re.compile(
    r"^\.(?P<target>.+)\.~dc(?P<host>[0-9a-f]{8})\.(?P<pid>[0-9]+)\.[^.]+\.tmp$"
)
_UMASK_LOCK = threading.Lock()


class CorruptFileError(OSError):
    """A file exists but is truncated, corrupted or not in the expected format.

    Examples
    --------
    >>> import os, tempfile
    >>> from spectral import load_npz
    >>> path = os.path.join(tempfile.mkdtemp(), "cut.npz")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(b"PK\\x03\\x04 truncated")
    >>> try:
    ...     load_npz(path)
    ... except CorruptFileError as error:
    ...     print(type(error).__name__, isinstance(error, OSError))
    CorruptFileError True
    """


def current_umask() -> int:
    """The process's file-creation mask, read without changing it where possible.

    On Linux it is read from ``/proc/self/status``; elsewhere it is set and
    restored at once under a lock (``os.umask`` has no read-only form).

    >>> 0 <= current_umask() <= 0o777
    True
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:  # pragma: no cover - platforms without /proc
        mask = os.umask(0o077)
        os.umask(mask)
    return mask  # pragma: no cover


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (zombies count as dead); unsure means alive."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # pragma: no cover - os.kill(pid, 0) terminates processes on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    with contextlib.suppress(OSError, IndexError):
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rindex(")") + 2] != "Z"  # the state field follows the command name
    return True


def clean_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove abandoned temporary files of :func:`atomic_write` from ``directory``.

    A file is removed only if its name is one of :func:`atomic_write`'s
    temporary names (see the module docstring) and either its writer ran on
    this host and no longer exists, or it was not modified for
    :data:`STALE_AFTER_SECONDS`.  Errors (a file vanishing meanwhile, no
    permission) are ignored.  Returns the removed paths.

    >>> import tempfile
    >>> clean_stale_temporaries(tempfile.mkdtemp())
    []
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        match = _TEMP_PATTERN.match(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                continue
            dead = match["host"] == _HOST and not _pid_alive(int(match["pid"]))
            if dead or now - info.st_mtime > STALE_AFTER_SECONDS:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                logger.info("removed the abandoned temporary file %s", entry.path)
        except OSError:
            continue
    return removed


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _final_mode(final: Path) -> int:
    """Mode bits a plain ``open(final, "w")`` leaves: the existing file's, or the umask's."""
    with contextlib.suppress(OSError):
        info = final.lstat()
        if stat.S_ISREG(info.st_mode):
            return stat.S_IMODE(info.st_mode)
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success, fsync and rename it to ``path``.

    If the body raises, the temporary file is removed and ``path`` is untouched.
    Parent directories are created.  A ``path`` that is an existing directory raises
    ``IsADirectoryError`` naming it (before anything is written; the rename would
    otherwise fail naming only the temporary file).  The file ends with the permission bits of
    a plain ``open()`` (the replaced file's, or ``0o666 & ~umask``), and
    abandoned temporary files of killed writes in the directory are removed
    first (:func:`clean_stale_temporaries`).

    Parameters
    ----------
    path : str or os.PathLike
        The final file name.
    mode : str
        ``"wb"`` (default) or ``"w"``.

    Yields
    ------
    file object
        The open temporary file; it becomes ``path`` when the ``with`` block ends without an
        exception.

    Examples
    --------
    >>> import tempfile, os, stat
    >>> p = os.path.join(tempfile.mkdtemp(), "sub", "note.txt")
    >>> with atomic_write(p, "w") as f:
    ...     _ = f.write("done")
    >>> from pathlib import Path
    >>> Path(p).read_text(), sorted(os.listdir(os.path.dirname(p)))
    ('done', ['note.txt'])
    >>> stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~current_umask()
    True
    >>> with atomic_write(os.path.dirname(p), "w") as f:
    ...     pass
    Traceback (most recent call last):
    ...
    IsADirectoryError: Argument 'path': expected the path of a file, not an existing directory; ...
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"Argument 'mode': expected 'wb' or 'w'; received {mode!r}.")
    final = Path(path)
    if final.is_dir():
        raise _directory_error(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final.parent)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name[:150]}.~dc{_HOST}.{os.getpid()}.", suffix=".tmp", dir=final.parent
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            permissions = _final_mode(final)
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), permissions)
            else:  # pragma: no cover - Windows before Python 3.13
                os.chmod(tmp, permissions)
            os.fsync(handle.fileno())
        try:
            os.replace(tmp, final)
        except IsADirectoryError as exc:  # a directory created there meanwhile
            raise _directory_error(final) from exc
        _fsync_directory(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _directory_error(final: Path) -> IsADirectoryError:
    """The error for a target ``path`` that is a directory (names the argument and the path)."""
    return IsADirectoryError(
        f"Argument 'path': expected the path of a file, not an existing directory; "
        f"received '{final}'."
    )


#: Key of the content checksum every :func:`save_npz` archive carries (its first member).
CHECKSUM_KEY = "__sha256__"


def npz_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """``"sha256:<hex>"`` of the arrays: every key with its dtype, shape and bytes, keys sorted.

    >>> npz_checksum({"x": np.arange(3)}) == npz_checksum({"x": np.arange(3)})
    True
    >>> npz_checksum({"x": np.arange(3)}) == npz_checksum({"x": np.arange(3), "y": np.ones(1)})
    False
    """
    digest = hashlib.sha256(b"deep-curvature-npz/1|")
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return "sha256:" + digest.hexdigest()


def save_npz(path: str | os.PathLike[str], **arrays: Any) -> None:
    """Write ``arrays`` to a compressed ``.npz`` atomically, with a content checksum.

    Object arrays are refused, so every file we write loads with
    ``allow_pickle=False``.  The archive's first member, ``__sha256__``, is
    :func:`npz_checksum` of the arrays: :func:`load_npz` verifies it, so a lost
    member (a changed entry count in the zip directory drops the last ones, which a
    reader would otherwise take for absent optional keys) or a changed byte is an
    error.  A ``__sha256__`` passed in (an archive loaded elsewhere and saved again)
    is replaced by the new checksum.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file (written atomically).
    **arrays : array_like
        The arrays to store, by key; numeric or string arrays only.

    Examples
    --------
    >>> import tempfile, os
    >>> save_npz(os.path.join(tempfile.mkdtemp(), "x.npz"), x=np.array([{}]))
    Traceback (most recent call last):
    ...
    TypeError: Argument 'x': expected a numeric or string array (no pickled objects); ...
    """
    converted: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError(
                f"Argument '{key}': expected a numeric or string array (no pickled objects); "
                f"received an object array of shape {arr.shape}."
            )
        converted[key] = arr
    converted.pop(CHECKSUM_KEY, None)
    members = {CHECKSUM_KEY: np.asarray(npz_checksum(converted)), **converted}  # checksum first
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **members)  # type: ignore[arg-type]


def has_checksum(path: str | os.PathLike[str]) -> bool:
    """Whether the ``.npz`` archive ``path`` lists a ``__sha256__`` member.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.npz")
    >>> save_npz(p, x=np.arange(2))
    >>> has_checksum(p)
    True
    """
    with zipfile.ZipFile(path) as archive:
        return CHECKSUM_KEY + ".npy" in archive.namelist()


def load_npz(path: str | os.PathLike[str]) -> Mapping[str, np.ndarray]:
    """Read every array of an ``.npz`` file eagerly, without unpickling.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.

    Returns
    -------
    Mapping[str, numpy.ndarray]
        Every array of the file, read into memory (the file is closed).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CorruptFileError
        If the file is truncated, corrupted or holds pickled objects.

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "pickled.npz")
    >>> np.savez(p, x=np.array([{}], dtype=object))
    >>> load_npz(p)
    Traceback (most recent call last):
    ...
    spectral.io.CorruptFileError: File ... not a pickle-free .npz archive ...
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No such file: '{p}'.")
    try:
        # Open the file ourselves: np.load leaks its handle when the zip directory is corrupt.
        with p.open("rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
                raise ValueError(f"found a single {type(loaded).__name__}, not an .npz archive")
            with loaded as archive:
                arrays = {key: archive[key] for key in archive.files}
    except MemoryError:
        raise
    except Exception as exc:  # BadZipFile, zlib.error, EOFError, ValueError...: all corruption
        raise CorruptFileError(
            f"File '{p}' is truncated, corrupted or not a pickle-free .npz archive ({exc})."
        ) from exc
    stored = arrays.pop(CHECKSUM_KEY, None)
    if stored is not None and str(stored) != npz_checksum(arrays):  # None: written before
        raise CorruptFileError(
            f"File '{p}': checksum mismatch (an array was changed or lost after the file "
            f"was written; it holds {sorted(arrays)})."
        )
    return arrays
