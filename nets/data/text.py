"""An offline byte-level text corpus for language models, from Python's own Unicode tables.

The text is the list of character names of the Unicode 3.2.0 database that every
CPython ships frozen as :data:`unicodedata.ucd_3_2_0` (used by its IDNA codec):
one name per line (``SPACE``, ``EXCLAMATION MARK``, ..., ``LATIN CAPITAL LETTER A``,
...) for the code points U+0020 to U+2FFF that have a name, in code-point order.
Unicode's stability policy freezes character names and the 3.2.0 table is never
updated, so the corpus is the same bytes on every Python from 3.6 to 3.13 (7,952
lines, 214,459 ASCII bytes; SHA-256 in :data:`CORPUS_SHA256`), needs no download
and no package beyond the standard library.

Tokens are bytes (vocabulary :math:`V = 256`).  The byte stream is cut into
sequences of ``seq_len + 1`` bytes starting every ``seq_len`` bytes; a sequence
gives inputs ``x = s[:-1]`` and next-token targets ``y = s[1:]`` (both ``(T,)``
int64).  Every ``test_every``-th sequence (default every 10th, counting from 1)
is the test set, the others the training set: a fixed split over the whole
alphabet range, with no randomness.

>>> splits = load_text_splits(seq_len=64)
>>> len(splits[0]), len(splits[1])
(3015, 335)
>>> x, y = splits[0][0]
>>> bytes(x[:16].tolist()), bool((x[1:] == y[:-1]).all())
(b'SPACE\\nEXCLAMATIO', True)
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from nets.models._common import check_positive_int
from spectral.errors import argument_error

__all__ = [
    "CORPUS_SHA256",
    "VOCAB_SIZE",
    "TokenDataset",
    "corpus_bytes",
    "load_text_splits",
]

#: Byte-level vocabulary size.
VOCAB_SIZE = 256

#: SHA-256 of :func:`corpus_bytes` (the same on CPython 3.6 to 3.13).
CORPUS_SHA256 = "5573cea6389d70b89a0c64aa7b85c6c66fcfa60a8e5366529f7b7f105373448d"

_FIRST, _STOP = 0x20, 0x3000


def corpus_bytes() -> bytes:
    """The corpus: Unicode 3.2.0 names of U+0020..U+2FFF, one per line, ASCII.

    Raises
    ------
    RuntimeError
        If this Python's frozen Unicode 3.2.0 table gives other bytes (never seen).

    >>> corpus_bytes()[:22]
    b'SPACE\\nEXCLAMATION MARK'
    """
    table = unicodedata.ucd_3_2_0
    names = (table.name(chr(i), "") for i in range(_FIRST, _STOP))
    text = "\n".join(name for name in names if name).encode("ascii")
    digest = hashlib.sha256(text).hexdigest()
    if digest != CORPUS_SHA256:  # pragma: no cover - a Python with a different table
        raise RuntimeError(
            f"The Unicode 3.2.0 name table of this Python gives corpus {digest}, "
            f"expected {CORPUS_SHA256}."
        )
    return text


class TokenDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed-length token sequences with next-token targets.

    Parameters
    ----------
    sequences:
        ``(N, T + 1)`` integer tensor; item ``i`` is ``(sequences[i, :-1], sequences[i, 1:])``
        as int64.
    """

    def __init__(self, sequences: torch.Tensor) -> None:
        if (
            not isinstance(sequences, torch.Tensor)
            or sequences.dim() != 2
            or sequences.shape[1] < 2
            or sequences.dtype.is_floating_point
        ):
            raise argument_error(
                "sequences", "an integer tensor of shape (N, T + 1) with T >= 1", sequences
            )
        self.sequences = sequences.to(torch.int64)

    def __len__(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def seq_len(self) -> int:
        """:math:`T`, the length of the inputs and targets."""
        return int(self.sequences.shape[1]) - 1

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(B, T)`` int64 for ``indices``."""
        rows = self.sequences[torch.as_tensor(indices, dtype=torch.int64)]
        return rows[:, :-1], rows[:, 1:]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch([int(index)])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.get_batch(list(indices))
        return list(zip(x.unbind(0), y.unbind(0)))


def load_text_splits(
    *, seq_len: int = 64, test_every: int = 10, max_sequences: int | None = None
) -> tuple[TokenDataset, TokenDataset]:
    """Training and test :class:`TokenDataset` of the corpus (see the module docstring).

    Parameters
    ----------
    seq_len:
        :math:`T`, tokens per sequence.
    test_every:
        Sequence ``i`` (0-based) is a test sequence when ``(i + 1) % test_every == 0``.
    max_sequences:
        Keep only the first this many sequences of the corpus before splitting
        (small runs and tests); ``None`` keeps all.

    Raises
    ------
    ValueError
        Non-positive sizes, ``test_every < 2`` or a split that leaves a set empty.
    """
    check_positive_int("seq_len", seq_len)
    check_positive_int("test_every", test_every, minimum=2)
    tokens = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8)
    count = (tokens.numel() - 1) // seq_len
    if max_sequences is not None:
        count = min(count, check_positive_int("max_sequences", max_sequences))
    starts = torch.arange(count) * seq_len
    sequences = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    is_test = (torch.arange(count) + 1) % test_every == 0
    if not bool(is_test.any()) or bool(is_test.all()):
        raise argument_error(
            "max_sequences", f"at least {test_every} sequences (a non-empty test set)", count
        )
    return TokenDataset(sequences[~is_test]), TokenDataset(sequences[is_test])
