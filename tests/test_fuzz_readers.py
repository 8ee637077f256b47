"""Fuzzing the file readers: random, truncated and mutated bytes raise only documented errors.

Every reader that takes a user file is fed

* random byte strings,
* valid files truncated at a random point,
* valid files with random bytes overwritten or inserted,
* mutations of a *malicious* file whose unpickling would create a marker
  directory (``os.mkdir``),

and must either return normally or raise one of its documented exceptions
(:class:`spectral.io.CorruptFileError`, :class:`nets.checkpoint.UnsafeFileError`,
``ValueError`` for well-formed files of the wrong kind).  After every example
the marker directory must not exist: no code was executed.  A last group of
tests feeds each reader an intact malicious file and asserts it is refused.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from nets.checkpoint import UnsafeFileError, load_checkpoint, model_from_checkpoint, save_checkpoint
from nets.data.cifar import read_pickle_file
from nets.models import get_model, model_spec
from nets.workflow import load_spectrum
from spectral.density import SpectralDensity
from spectral.io import CorruptFileError, load_npz, save_npz
from spectral.resume import Checkpoint, StateMismatchError

WORKDIR = Path(tempfile.mkdtemp(prefix="fuzz-readers-"))
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)
MARKER = WORKDIR / "pwned"


class _Evil:
    """Unpickling this object calls ``os.mkdir(MARKER)``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(MARKER),))


def _npz_bytes(**arrays: Any) -> bytes:
    path = WORKDIR / "tmp-valid.npz"
    save_npz(path, **arrays)
    return path.read_bytes()


def _evil_npz_bytes() -> bytes:
    """An ``.npz`` whose member is an object array holding :class:`_Evil` (pickled)."""
    buffer = io.BytesIO()
    np.savez(buffer, w=np.array([_Evil()], dtype=object))
    return buffer.getvalue()


def _checkpoint_bytes() -> bytes:
    net = get_model("MLP", num_classes=3, in_channels=1, input_size=2, hidden=(2,))
    path = WORKDIR / "tmp-valid.pt"
    save_checkpoint(path, net, None, 1, dict(model_spec(net) or {}))
    return path.read_bytes()


def _evil_checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "payload": _Evil()}, buffer)
    return buffer.getvalue()


def _cifar_bytes() -> bytes:
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [0, 1],
        b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251,
        b"filenames": [b"a.png", b"b.png"],
    }
    return pickle.dumps(batch, protocol=2)


def _evil_cifar_bytes() -> bytes:
    return pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2)


def _spectrum_bytes() -> bytes:
    return _npz_bytes(
        w=np.array([0.5, 2.0]),
        eigvals=np.array([0.5, 2.0]),
        gammas=np.array([0.25, 0.75]),
        num_params=np.int64(4),
        config_json="{}",
    )


def _state_bytes() -> bytes:
    path = WORKDIR / "tmp-state.npz"
    Checkpoint(path, kind="fuzz", config={"a": 1}).save({"x": np.arange(3.0)}, {"i": 1})
    return path.read_bytes()


def _load_state(path: Path) -> Any:
    return Checkpoint(path, kind="fuzz", config={"a": 1}).load()


# reader name -> (reader, documented exceptions, valid bytes, malicious bytes)
READERS: dict[str, tuple[Callable[[Path], Any], tuple[type[BaseException], ...], bytes, bytes]] = {
    "load_npz": (load_npz, (CorruptFileError,), _npz_bytes(x=np.arange(5.0)), _evil_npz_bytes()),
    "SpectralDensity.load": (
        SpectralDensity.load,
        (CorruptFileError, ValueError),
        _npz_bytes(nodes=np.array([1.0, 2.0]), weights=np.array([0.5, 0.5])),
        _evil_npz_bytes(),
    ),
    "load_spectrum": (
        load_spectrum,
        (CorruptFileError, ValueError),
        _spectrum_bytes(),
        _evil_npz_bytes(),
    ),
    "resume.Checkpoint.load": (
        _load_state,
        (CorruptFileError, StateMismatchError),
        _state_bytes(),
        _evil_npz_bytes(),
    ),
    "load_checkpoint": (
        load_checkpoint,
        (CorruptFileError, UnsafeFileError),
        _checkpoint_bytes(),
        _evil_checkpoint_bytes(),
    ),
    "cifar.read_pickle_file": (
        read_pickle_file,
        (CorruptFileError, UnsafeFileError),
        _cifar_bytes(),
        _evil_cifar_bytes(),
    ),
}


def _feed(reader_name: str, data: bytes) -> None:
    """Write ``data`` to a file, read it, and check only documented errors and no execution."""
    reader, allowed, _, _ = READERS[reader_name]
    path = WORKDIR / f"fuzz-{reader_name}.bin"
    path.write_bytes(data)
    try:
        reader(path)
    except allowed as exc:
        assert str(path.name) in str(exc) or isinstance(exc, StateMismatchError | ValueError), exc
    assert not MARKER.exists(), "unpickling executed code"


def _mutate(data: bytes, edits: list[tuple[int, int, bool]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value, insert in edits:
        i = position % (len(out) + 1)
        if insert or i == len(out):
            out.insert(i, value)
        else:
            out[i] = value
    if cut is not None:
        out = out[: cut % (len(out) + 1)]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255), st.booleans()), max_size=8)
NAMES = st.sampled_from(sorted(READERS))


@given(name=NAMES, data=st.binary(max_size=300))
def test_random_bytes(name: str, data: bytes) -> None:
    _feed(name, data)


@given(name=NAMES, cut=st.integers(0, 1 << 20))
def test_truncated_files(name: str, cut: int) -> None:
    valid = READERS[name][2]
    _feed(name, valid[: cut % len(valid)])


@given(name=NAMES, edits=EDITS, cut=st.none() | st.integers(0, 1 << 20))
def test_mutated_valid_files(
    name: str, edits: list[tuple[int, int, bool]], cut: int | None
) -> None:
    _feed(name, _mutate(READERS[name][2], edits, cut))


@given(name=NAMES, edits=EDITS, cut=st.none() | st.integers(0, 1 << 20))
def test_mutated_malicious_files(
    name: str, edits: list[tuple[int, int, bool]], cut: int | None
) -> None:
    _feed(name, _mutate(READERS[name][3], edits, cut))


@given(data=st.binary(max_size=200))
def test_random_bytes_inside_a_zip_member(data: bytes) -> None:
    """A well-formed zip archive whose ``.npy`` member holds random bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + data)
    for name in ("load_npz", "SpectralDensity.load", "load_spectrum", "resume.Checkpoint.load"):
        _feed(name, buffer.getvalue())


@pytest.mark.parametrize("name", sorted(READERS))
def test_valid_files_still_load(name: str) -> None:
    reader, _, valid, _ = READERS[name]
    path = WORKDIR / f"valid-{name}.bin"
    path.write_bytes(valid)
    assert reader(path) is not None


@pytest.mark.parametrize("name", sorted(READERS))
def test_malicious_file_is_refused_and_not_executed(name: str) -> None:
    reader, allowed, _, evil = READERS[name]
    path = WORKDIR / f"evil-{name}.bin"
    path.write_bytes(evil)
    with pytest.raises(allowed):
        reader(path)
    assert not MARKER.exists()


def test_malicious_checkpoint_is_refused_by_model_from_checkpoint() -> None:
    path = WORKDIR / "evil-model.pt"
    path.write_bytes(_evil_checkpoint_bytes())
    with pytest.raises(UnsafeFileError, match="refused"):
        model_from_checkpoint(path)
    assert not MARKER.exists()


def test_checkpoint_of_plain_module_round_trips(tmp_path: Path) -> None:
    """Sanity: the fuzzed reader accepts what save_checkpoint writes for any module."""
    net = nn.Linear(2, 1)
    save_checkpoint(tmp_path / "c.pt", net, None, 0, {})
    assert set(load_checkpoint(tmp_path / "c.pt")["state_dict"]) == {"weight", "bias"}


# ----------------------------------------------------------------------------- CLI arguments


def _cli_vocabulary() -> tuple[list[str], list[str]]:
    """Sub-command names and every option string of the ``curvature`` parser."""
    import argparse

    from nets.cli import build_parser

    parser = build_parser()
    commands: list[str] = []
    options: set[str] = set()
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands.append(name)
                for sub_action in sub._actions:
                    options.update(sub_action.option_strings)
    return sorted(commands), sorted(options)


COMMANDS, OPTIONS = _cli_vocabulary()
TOKENS = st.one_of(
    st.sampled_from(COMMANDS),
    st.sampled_from(OPTIONS),
    st.sampled_from(["-", "--", "=", "", "nan", "inf", "-1", "0", "1e400", "0.5", "2", "x=y"]),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12),
)


def _no_op(args: Any) -> list[str]:
    return []


@given(argv=st.lists(TOKENS, max_size=8))
def test_cli_argument_parsing_never_tracebacks(argv: list[str]) -> None:
    """Random argv: parsed, or ``SystemExit(2)`` with one error line; never a traceback.

    The command handlers are replaced by no-ops, so nothing is trained or computed.
    """
    import contextlib

    import nets.cli

    handlers = {name: getattr(nets.cli, name) for name in dir(nets.cli) if name.startswith("_cmd_")}
    err, out = io.StringIO(), io.StringIO()
    try:
        for name in handlers:
            setattr(nets.cli, name, _no_op)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = nets.cli.main(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            return
        assert exc.code == 2, (argv, exc.code, err.getvalue())
        message = err.getvalue()
        assert message.startswith("curvature") and "error:" in message, (argv, message)
        assert message.count("\n") == 1 and "Traceback" not in message, (argv, message)
    else:
        assert status == 0, argv
    finally:
        for name, handler in handlers.items():
            setattr(nets.cli, name, handler)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["spectrum", "--checkpoint", "missing.pt"], "No such checkpoint file"),
        (["landscape", "--checkpoint", "missing.pt", "--dist", "-1"], "missing.pt"),
        (["plot", "spectrum", "missing.npz"], "missing.npz"),
        (["train", "--dir", "r", "--epochs", "0"], "Option --epochs:"),
        (["train", "--dir", "r", "--model", "NoSuchNet", "--epochs", "1"], "Option --model:"),
        (["train", "--dir", "r", "--optimizer", "Nope", "--epochs", "1"], "Option --optimizer:"),
        (["train", "--dir", "r", "--dataset", "imagenet", "--epochs", "1"], "Option --dataset:"),
    ],
)
def test_cli_command_errors_exit_2_with_a_message(
    argv: list[str],
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Errors found by the commands themselves: status 2 and one line naming the problem."""
    import nets.cli

    monkeypatch.chdir(tmp_path)
    assert nets.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"curvature {argv[0]}: error:" in err and fragment in err
    assert "Traceback" not in err
