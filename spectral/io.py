"""Atomic artifact writing and safe reading, shared by every package that writes files.

A file is written to a temporary sibling in the same directory, flushed,
``fsync``-ed and then renamed over the final name, so a crash at any moment
leaves either the old file or the complete new one, never a truncated file.
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
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["CorruptFileError", "atomic_write", "load_npz", "save_npz"]


class CorruptFileError(OSError):
    """A file exists but is truncated, corrupted or not in the expected format."""


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


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success, fsync and rename it to ``path``.

    If the body raises, the temporary file is removed and ``path`` is untouched.
    Parent directories are created.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "sub", "note.txt")
    >>> with atomic_write(p, "w") as f:
    ...     _ = f.write("done")
    >>> from pathlib import Path
    >>> Path(p).read_text(), sorted(os.listdir(os.path.dirname(p)))
    ('done', ['note.txt'])
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"Argument 'mode': expected 'wb' or 'w'; received {mode!r}.")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_directory(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_npz(path: str | os.PathLike[str], **arrays: Any) -> None:
    """Write ``arrays`` to a compressed ``.npz`` atomically.

    Object arrays are refused, so every file we write loads with
    ``allow_pickle=False``.

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
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **converted)  # type: ignore[arg-type]


def load_npz(path: str | os.PathLike[str]) -> Mapping[str, np.ndarray]:
    """Read every array of an ``.npz`` file eagerly, without unpickling.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CorruptFileError
        If the file is truncated, corrupted or holds pickled objects.

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
                return {key: archive[key] for key in archive.files}
    except MemoryError:
        raise
    except Exception as exc:  # BadZipFile, zlib.error, EOFError, ValueError...: all corruption
        raise CorruptFileError(
            f"File '{p}' is truncated, corrupted or not a pickle-free .npz archive ({exc})."
        ) from exc
