"""The JSON-lines file of curvature rows (``curvature.jsonl``), each row checksummed.

One row per line, as :class:`nets.CurvatureTracker` measures them, with one extra key,
``"crc32"``: the CRC-32 of the row's canonical JSON (keys sorted, no spaces, the
``crc32`` key left out).  The file is read back when a tracker resumes, and a flipped
bit in a digit would otherwise change a measurement silently; :func:`read_rows`
verifies every row and raises :class:`spectral.io.CorruptFileError` naming the file
and the line.  Files written before the checksums (no row has a ``crc32`` key) are
read as they are; a file where some rows have one and others not is corrupt.

A run's ``stats.json`` repeats the rows in its ``curvature`` list and their CRC-32s, in
the same order, in its ``curvature_crc32`` list (:data:`STATS_CHECKSUMS`):
:func:`verified_rows` checks them when the rows are read from there.

>>> import tempfile, pathlib
>>> folder = tempfile.TemporaryDirectory()
>>> path = pathlib.Path(folder.name) / "curvature.jsonl"
>>> write_rows(path, [{"step": 50, "top_eigenvalues": [12.5, 3.25]}])
>>> read_rows(path)
[{'step': 50, 'top_eigenvalues': [12.5, 3.25]}]
>>> _ = path.write_text(path.read_text().replace("12.5", "13.5"))  # one changed digit
>>> read_rows(path)
Traceback (most recent call last):
...
spectral.io.CorruptFileError: File '...curvature.jsonl', line 1: checksum mismatch ...
>>> folder.cleanup()
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spectral.io import CorruptFileError, atomic_write

__all__ = [
    "STATS_CHECKSUMS",
    "decode_rows",
    "encode_row",
    "read_rows",
    "row_checksums",
    "verified_rows",
    "write_rows",
]

logger = logging.getLogger(__name__)

CRC_KEY = "crc32"
#: The key of ``stats.json`` that holds the CRC-32 of each of its ``curvature`` rows.
STATS_CHECKSUMS = "curvature_crc32"


def _crc(row: Mapping[str, Any]) -> int:
    canonical = json.dumps(row, sort_keys=True, separators=(",", ":"))
    return zlib.crc32(canonical.encode("utf-8")) & 0xFFFFFFFF


def encode_row(row: Mapping[str, Any]) -> str:
    """One line (no newline) of ``row`` as JSON with its ``crc32``.

    >>> encode_row({"step": 1})
    '{"step": 1, "crc32": 286895505}'
    """
    if CRC_KEY in row:
        raise ValueError(f"Argument 'row': expected no {CRC_KEY!r} key; received {dict(row)!r}.")
    return json.dumps({**row, CRC_KEY: _crc(row)})


def _one_character_from_crc_key(key: str) -> bool:
    """Whether ``key`` differs from :data:`CRC_KEY` in exactly one character (a bit flip
    in the key would otherwise turn a checked row of a one-row file into an unchecked one).

    >>> _one_character_from_crc_key("crc33"), _one_character_from_crc_key("crc32")
    (True, False)
    """
    return len(key) == len(CRC_KEY) and sum(a != b for a, b in zip(key, CRC_KEY)) == 1


def decode_rows(text: str, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a file's ``text`` (``path`` names it in errors), checksums verified."""
    rows: list[dict[str, Any]] = []
    with_crc = 0
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for number, line in lines:
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CorruptFileError(f"File '{path}', line {number}: not JSON ({exc}).") from exc
        if not isinstance(row, dict):
            raise CorruptFileError(f"File '{path}', line {number}: not a row (a JSON object).")
        damaged = [k for k in row if _one_character_from_crc_key(k)]
        if damaged:  # e.g. "crc33": one flipped bit, and the row would read as unchecked
            raise CorruptFileError(
                f"File '{path}', line {number}: key {damaged[0]!r} where the checksum key "
                f"{CRC_KEY!r} belongs (a damaged row)."
            )
        if CRC_KEY in row:
            with_crc += 1
            stored = row.pop(CRC_KEY)
            if stored != _crc(row):
                raise CorruptFileError(
                    f"File '{path}', line {number}: checksum mismatch (the row was "
                    f"changed after it was written: stored {stored}, computed {_crc(row)})."
                )
        rows.append(row)
    if 0 < with_crc < len(rows):
        raise CorruptFileError(
            f"File '{path}': {len(rows) - with_crc} of {len(rows)} rows have no {CRC_KEY!r} "
            "key (every row of a file written with checksums has one)."
        )
    return rows


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of the JSON-lines file ``path``, checksums verified (see the module)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"File '{path}': not UTF-8 text ({exc}).") from exc
    return decode_rows(text, path)


def write_rows(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` to ``path`` atomically (temporary file, fsync, rename), one per line."""
    with atomic_write(path, "w") as handle:
        for row in rows:
            handle.write(encode_row(row) + "\n")


def row_checksums(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """The CRC-32 of each row (of its canonical JSON), as ``encode_row`` stores it.

    >>> row_checksums([{"step": 1}])
    [286895505]
    """
    return [_crc(row) for row in rows]


def verified_rows(
    rows: Any, checksums: Any, path: str | os.PathLike[str], section: str = "curvature"
) -> list[dict[str, Any]]:
    """The rows of a JSON document's ``section`` (``path`` names it in errors), each verified
    against its CRC-32 in the parallel list ``checksums`` (see the module).

    ``checksums`` of ``None`` (a file written before the rows had them) reads the rows
    unverified, with a logged warning.

    >>> rows = [{"step": 1, "top_eigenvalues": [2.5]}]
    >>> verified_rows(rows, row_checksums(rows), "stats.json") == rows
    True
    >>> verified_rows([{"step": 1, "top_eigenvalues": [25.0]}], row_checksums(rows), "stats.json")
    Traceback (most recent call last):
    ...
    spectral.io.CorruptFileError: File 'stats.json', 'curvature' row 1: checksum mismatch ...
    """
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise CorruptFileError(f"File '{path}': its {section!r} entry is not a list of rows.")
    if checksums is None:
        if rows:
            logger.warning(
                "File '%s': its %r rows carry no checksums (written before they did); "
                "they are read unverified",
                path,
                section,
            )
        return [dict(row) for row in rows]
    if not isinstance(checksums, list) or len(checksums) != len(rows):
        count = len(checksums) if isinstance(checksums, list) else type(checksums).__name__
        raise CorruptFileError(
            f"File '{path}': {len(rows)} {section!r} rows but {count} checksums in "
            f"its '{section}_crc32' entry (one per row)."
        )
    for number, (row, stored) in enumerate(zip(rows, checksums, strict=True), start=1):
        if stored != _crc(row):
            raise CorruptFileError(
                f"File '{path}', {section!r} row {number}: checksum mismatch (the row was "
                f"changed after it was written: stored {stored}, computed {_crc(row)})."
            )
    return [dict(row) for row in rows]
