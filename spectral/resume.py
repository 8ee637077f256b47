r"""Resumable long runs: state files, configuration and operator fingerprints.

A Lanczos run on a real network costs one pass over the data per iteration
(tens of seconds to minutes each), so :func:`spectral.lanczos`,
:func:`spectral.slq` and the :mod:`nets` workflow accept a ``checkpoint``
path.  Every ``checkpoint_every`` iterations the full recurrence state is
written there atomically (temporary file, ``fsync``, rename: a crash, even a
``SIGKILL``, leaves either the previous state or the new one).  Restarting
with the same arguments resumes from the last state and, on the CPU, gives
**bit-identical** results to an uninterrupted run: the three-term recurrence
is deterministic given its state, and every quantity of the state is stored
exactly (vectors of a ``float64`` operator as float64; of ``float32``,
``float16`` and ``bfloat16`` operators as float32, a lossless widening).

State file format (an uncompressed ``.npz`` written with
:func:`spectral.io.atomic_write`, read with ``allow_pickle=False``):

``format``
    ``"spectral-resume/1"``.
``kind``
    Who wrote it (``"lanczos"``, ``"slq"``, ``"loss_stats"``...).
``config_json``
    JSON of the run's configuration (function, ``n``, ``num_iters``,
    ``reorth``, seed description, SHA-256 of a user start vector...).
``operator_json``
    The operator fingerprint (below), or ``null`` for runs without operator.
``meta_json``
    JSON of the scalar state (iteration count, ``beta_{j-1}``, the running
    norm estimate, numpy ``bit_generator`` states, flags).
any other key
    Array payload (``alpha``, ``beta``, ``basis``, ``q``, ``q_prev``...).

Operator fingerprint.  Arguments alone cannot tell whether the operator is the
same (same network shape, other weights), so the operator is probed: ``y = A p``
for a Gaussian vector ``p`` drawn from a seed chosen when the state file is first
written and stored in it (``probe_seed``): a fresh random one
(:func:`fresh_probe_seed`).  With one fixed public probe, ``B = A + D`` with
``D p = 0`` resumed ``A``'s state and returned ``A``'s eigenvalues; a fixed change
``D != 0`` now escapes the probe of a file with probability zero (a Rademacher probe,
±1, would still miss a change ``u u^T`` with ``u = e_1 - e_2`` half of the time).  The
probe is drawn in float64 on the host and rounded to the operator's dtype, so the same
seed gives the same ``p`` on every run.  Loading a file recomputes ``A p`` with its
stored probe; files written before the probe was stored use the former fixed
Rademacher probe (seed :data:`FINGERPRINT_SEED`) and still resume.  State files of the
same run therefore differ from run to run in their fingerprint (never in the
recurrence).  Stored are ``n``, the dtype, the platform (the device type of the
operator's vectors: ``"cpu"``, ``"cuda"``...), the probe's kind and seed, the SHA-256
of ``y`` (host float64 bytes), ``\|y\|`` and a sketch ``s = G^T y`` with ``G`` an
``n x 4`` Gaussian matrix drawn from the seed (generated on the host in chunks, never
stored).

The rule: the same operator gives the same ``y`` up to what its platform
allows, and nothing else is accepted.

* **On the CPU** (state written and resumed there) products are deterministic
  in every dtype (float16, float32, float64 alike), so the digests must be
  **equal**: any difference, however small (weights changed by ``1e-5``, a
  float16 model from another initialisation), refuses the state.  The same
  holds for the number of threads and the BLAS library: resume with the
  settings of the first run (they are needed for a bit-identical result too).
* **Where products are not bitwise reproducible** (either side on an
  accelerator: atomic reductions in an order that varies between runs) a
  state is also accepted when
  ``max_i |s_i - s'_i| <= 10^3\,eps\,\|y\|`` (:data:`SKETCH_RTOL_FACTOR`,
  ``eps`` of the operator's dtype): far above reduction-order noise (about
  ``\sqrt{\log n}\,eps\|y\|``).  Changes of the operator below this
  tolerance are not detected there (in float16 it is ``\|y\|`` itself: the
  probe cannot tell float16 operators apart on accelerators); the workflow of
  :mod:`nets` also records the SHA-256 of the weights in the configuration,
  which is exact on every platform.

State files written before the platform was recorded count as ``"cpu"``.  The
fingerprint costs **one extra product** per call (and per resume).

>>> import numpy as np, tempfile, os
>>> from spectral.operator import as_operator
>>> path = os.path.join(tempfile.mkdtemp(), "state.npz")
>>> op = as_operator(np.diag([1.0, 2.0, 3.0]))
>>> ck = Checkpoint(path, kind="demo", config={"num_iters": 3}, operator=op)
>>> ck.load() is None
True
>>> ck.save({"alpha": np.array([1.5])}, {"iteration": 1})
>>> state = Checkpoint(path, kind="demo", config={"num_iters": 3}, operator=op).load()
>>> state.meta["iteration"], state.arrays["alpha"].tolist()
(1, [1.5])
>>> Checkpoint(path, kind="demo", config={"num_iters": 4}, operator=op).load()
Traceback (most recent call last):
...
spectral.resume.StateMismatchError: Argument 'checkpoint': expected a state file ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectral import _backend
from spectral.errors import argument_error
from spectral.io import (
    CHECKSUM_KEY,
    CorruptFileError,
    atomic_write,
    has_checksum,
    load_npz,
    npz_checksum,
)
from spectral.operator import SymmetricOperator

__all__ = [
    "DETERMINISTIC_PLATFORM",
    "FINGERPRINT_SEED",
    "FORMAT",
    "Checkpoint",
    "LanczosHook",
    "LanczosState",
    "OperatorFingerprint",
    "SavedState",
    "StateMismatchError",
    "array_digest",
    "check_every",
    "describe_seed",
    "fresh_probe_seed",
    "operator_fingerprint",
    "storage_dtype",
]

logger = logging.getLogger(__name__)

FORMAT = "spectral-resume/2"

#: The format before state files carried a content checksum (still read).
_FORMAT_WITHOUT_CHECKSUM = "spectral-resume/1"

#: Seed of the Rademacher probe ``p`` of the operator fingerprint in state files written
#: before each file stored its own (random) seed, and the default of
#: :func:`operator_fingerprint`.
FINGERPRINT_SEED = 0x5EED_CAFE

#: Number of Gaussian sketch directions of the operator fingerprint.
SKETCH_SIZE = 4

#: Sketch tolerance factor on non-deterministic platforms (never on the CPU):
#: ``|s - s'| <= SKETCH_RTOL_FACTOR * eps * ||y||``.
SKETCH_RTOL_FACTOR = 1e3

#: The platform on which products are bitwise reproducible, so fingerprints must be equal.
DETERMINISTIC_PLATFORM = "cpu"

_RESERVED = ("format", "kind", "config_json", "operator_json", "meta_json")


class StateMismatchError(ValueError):
    """A state file exists but was written by another configuration or operator.

    The message names the ``checkpoint`` argument, the file, and every
    differing setting, and says how to proceed (delete the file or pass
    another path).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from spectral import lanczos
    >>> state = os.path.join(tempfile.mkdtemp(), "state.npz")
    >>> _ = lanczos(np.diag([1.0, 2.0, 3.0]), 2, seed=0, checkpoint=state)
    >>> try:
    ...     lanczos(np.diag([1.0, 2.0, 4.0]), 2, seed=0, checkpoint=state)
    ... except StateMismatchError as error:
    ...     print(type(error).__name__)
    StateMismatchError
    """


def check_every(checkpoint_every: Any) -> int:
    """Validate the ``checkpoint_every`` argument (a positive integer).

    >>> check_every(5)
    5
    >>> check_every(0)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'checkpoint_every': expected a positive integer; received 0.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int | np.integer):
        raise argument_error(
            "checkpoint_every", "a positive integer", checkpoint_every, kind=TypeError
        )
    if checkpoint_every < 1:
        raise argument_error("checkpoint_every", "a positive integer", checkpoint_every)
    return int(checkpoint_every)


def _as_path(checkpoint: Any) -> Path:
    if isinstance(checkpoint, str | os.PathLike) and str(checkpoint) != "":
        path = Path(checkpoint)
        if path.is_dir():
            raise argument_error(
                "checkpoint", "None or the path of a state file (not a directory)", str(path)
            )
        return path
    raise argument_error("checkpoint", "None or a file path", checkpoint, kind=TypeError)


def storage_dtype(xp: Any, dtype: Any) -> type[np.floating[Any]]:
    """Host dtype that stores vectors of ``dtype`` losslessly: float64 or float32.

    >>> storage_dtype(_backend.namespace(np.zeros(1)), np.dtype("float16")).__name__
    'float32'
    """
    eps = _backend.finfo_eps(xp, dtype)
    return np.float64 if eps < 1e-10 else np.float32


def array_digest(x: Any) -> str:
    """SHA-256 (hex) of the host float64 values of ``x`` (any namespace), with its shape.

    >>> array_digest(np.zeros(2)) == array_digest(np.zeros(2, dtype=np.float32))
    True
    """
    host = np.ascontiguousarray(_backend.to_host_float64(x))
    h = hashlib.sha256(repr(host.shape).encode())
    h.update(host.tobytes())
    return h.hexdigest()


def describe_seed(seed: Any) -> Any:
    """JSON-able description of a ``seed`` argument, for the configuration fingerprint.

    ``None`` and integers describe themselves; a numpy ``Generator`` is
    described by the SHA-256 of its current ``bit_generator`` state, so it must
    be called *before* the generator is used.

    >>> describe_seed(3), describe_seed(None)
    (3, None)
    >>> describe_seed(np.random.default_rng(0)) == describe_seed(np.random.default_rng(0))
    True
    """
    if seed is None or isinstance(seed, bool):
        return seed
    if isinstance(seed, int | np.integer):
        return int(seed)
    if isinstance(seed, np.random.Generator):
        text = json.dumps(seed.bit_generator.state, sort_keys=True)
        return "generator-sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return repr(seed)


@dataclass(frozen=True)
class OperatorFingerprint:
    """Fingerprint of an operator (see the module docstring).

    Attributes: ``n``, ``dtype`` (string), ``digest`` (SHA-256 of ``A p``),
    ``norm`` (``||A p||``), ``sketch`` (``G^T A p``, floats), ``eps`` (of the dtype),
    ``platform`` (device type of the operator's vectors, ``"cpu"``, ``"cuda"``...),
    ``probe_seed`` (the seed of ``p`` and ``G``) and ``probe`` (the kind of ``p``:
    ``"gaussian"`` in state files, ``"rademacher"`` with :data:`FINGERPRINT_SEED` in files
    written before the probe was stored, and by default in :func:`operator_fingerprint`).
    """

    n: int
    dtype: str
    digest: str
    norm: float
    sketch: tuple[float, ...]
    eps: float
    platform: str = DETERMINISTIC_PLATFORM
    probe_seed: int = FINGERPRINT_SEED
    probe: str = "rademacher"

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(
            {
                "n": self.n,
                "dtype": self.dtype,
                "digest": self.digest,
                "norm": self.norm,
                "sketch": list(self.sketch),
                "eps": self.eps,
                "platform": self.platform,
                "probe_seed": self.probe_seed,
                "probe": self.probe,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> OperatorFingerprint:
        """Inverse of :meth:`to_json` (raises ``KeyError``/``ValueError`` on bad input).

        A fingerprint without ``probe_seed``/``probe`` (written before they were stored)
        was taken with the Rademacher probe of :data:`FINGERPRINT_SEED`.
        """
        d = json.loads(text)
        return cls(
            n=int(d["n"]),
            dtype=str(d["dtype"]),
            digest=str(d["digest"]),
            norm=float(d["norm"]),
            sketch=tuple(float(s) for s in d["sketch"]),
            eps=float(d["eps"]),
            platform=str(d.get("platform", DETERMINISTIC_PLATFORM)),
            probe_seed=_probe_seed(d.get("probe_seed", FINGERPRINT_SEED)),
            probe=_probe_kind(d.get("probe", "rademacher")),
        )

    def difference(self, other: OperatorFingerprint) -> str | None:
        """``None`` if ``other`` is the same operator, else a sentence saying what differs.

        The rule of the module docstring: equal digests on the CPU, the sketch
        tolerance only where either side ran on a non-deterministic platform.

        >>> a = OperatorFingerprint(3, "float32", "d1", 1.0, (0.5,), 1.2e-7)
        >>> b = OperatorFingerprint(3, "float32", "d2", 1.0, (0.5 + 1e-6,), 1.2e-7)
        >>> a.difference(a) is None, a.difference(b) is None
        (True, False)
        >>> import dataclasses
        >>> gpu = dataclasses.replace(b, platform="cuda")
        >>> a.difference(gpu) is None  # 1e-6 <= 1e3 * 1.2e-7 * 1.0: rounding on the GPU
        True
        """
        if self.n != other.n:
            return f"the operator has dimension n={other.n}, the state file n={self.n}"
        if self.dtype != other.dtype:
            return f"the operator has dtype {other.dtype}, the state file {self.dtype}"
        if (self.probe, self.probe_seed) != (other.probe, other.probe_seed):
            return (
                f"the fingerprints were taken with different probes ({self.probe} of seed "
                f"{self.probe_seed}, {other.probe} of seed {other.probe_seed}) and cannot be "
                "compared"
            )
        if self.digest == other.digest:
            return None
        scale = max(self.norm, other.norm)
        gap = max(abs(a - b) for a, b in zip(self.sketch, other.sketch))
        if self.platform == other.platform == DETERMINISTIC_PLATFORM:
            relative = gap / scale if scale > 0 else math.inf
            return (
                "the operator's product with the fingerprint probe differs from the one recorded "
                f"(relative sketch difference {relative:.3e}; on the CPU products are "
                "reproducible bit for bit, so no difference is tolerated): it is another "
                "operator (other weights, data, loss or parameter subset), or the same one "
                "evaluated with another number of threads or another BLAS library"
            )
        tol = SKETCH_RTOL_FACTOR * self.eps * scale
        if scale > 0 and gap <= tol:
            logger.info(
                "resume: operator products differ in rounding only (%.3e <= %.3e)", gap, tol
            )
            return None
        return (
            "the operator's product with the fingerprint probe differs from the one recorded "
            f"(sketch difference {gap:.3e}, tolerance {tol:.3e}): it is another operator "
            "(other weights, data, loss or parameter subset)"
        )


def _probe_seed(seed: Any) -> int:
    """``seed`` if it is a non-negative integer (a probe seed read from a file), else a
    ``ValueError``."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"invalid probe_seed {seed!r} (a non-negative integer expected)")
    return int(seed)


#: The kinds of fingerprint probes: the former fixed one, and that of every new state file.
_PROBE_KINDS = ("rademacher", "gaussian")


def _probe_kind(kind: Any) -> str:
    """``kind`` if it is a fingerprint probe kind (read from a file), else ``ValueError``."""
    if kind not in _PROBE_KINDS:
        raise ValueError(f"invalid probe {kind!r} (one of {_PROBE_KINDS} expected)")
    return str(kind)


def _world_size() -> int:
    """``WORLD_SIZE`` of the environment (set by ``torchrun`` for every rank), else 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def fresh_probe_seed(kind: str = "", config: Mapping[str, Any] | None = None) -> int:
    """The seed of the fingerprint probe of a new state file: 63 random bits (``secrets``).

    Under a multi-process launch (``WORLD_SIZE > 1`` in the environment, as ``torchrun``
    sets it) every rank runs the same replicated computation and calls the fingerprint
    product collectively, so all ranks must draw the same probe: the seed is then derived
    from the SHA-256 of ``kind`` and ``config`` (identical on every rank), still specific
    to the run rather than one fixed public probe.  (Pass ``probe_seed`` to
    :class:`Checkpoint` for full control, e.g. a random seed broadcast from rank 0.)

    >>> 0 <= fresh_probe_seed() < 2**63
    True
    """
    if _world_size() > 1:
        text = json.dumps({"kind": kind, "config": config}, sort_keys=True, default=repr)
        digest = hashlib.sha256(b"spectral-probe-seed|" + text.encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1
    return secrets.randbits(63)


def operator_fingerprint(
    op: SymmetricOperator, seed: int = FINGERPRINT_SEED, probe: str = "rademacher"
) -> OperatorFingerprint:
    """Fingerprint ``op`` with one product ``y = A p`` (see the module docstring).

    ``seed`` (a non-negative integer) draws the probe ``p`` of kind ``probe``
    (``"rademacher"`` or ``"gaussian"``, the kind of every new state file) and the sketch
    directions ``G`` (from ``seed + 1``).

    >>> from spectral.operator import as_operator
    >>> f = operator_fingerprint(as_operator(np.eye(3)))
    >>> f.n, f.norm == 3 ** 0.5, f.probe_seed == FINGERPRINT_SEED
    (3, True, True)
    >>> f == operator_fingerprint(as_operator(np.eye(3)))
    True
    >>> operator_fingerprint(as_operator(np.eye(3)), seed=7, probe="gaussian").digest == f.digest
    False
    """
    from spectral.probes import random_probe

    seed, probe = _probe_seed(seed), _probe_kind(probe)
    p = random_probe(op.n, probe, seed, like=op.template)
    y = np.ascontiguousarray(_backend.to_host_float64(op.matvec(p)))
    if y.shape != (op.n,):
        raise argument_error("A", f"an operator returning vectors of shape ({op.n},)", y)
    rng = np.random.default_rng(seed + 1)
    sketch = np.zeros(SKETCH_SIZE)
    chunk = 1 << 18
    for lo in range(0, op.n, chunk):
        block = y[lo : lo + chunk]
        sketch += rng.standard_normal((block.shape[0], SKETCH_SIZE)).T @ block
    h = hashlib.sha256(y.tobytes()).hexdigest()
    return OperatorFingerprint(
        n=op.n,
        dtype=str(op.dtype),
        digest=h,
        norm=float(np.linalg.norm(y)),
        sketch=tuple(float(s) for s in sketch),
        eps=op.eps,
        platform=_platform(op.device),
        probe_seed=seed,
        probe=probe,
    )


def _platform(device: Any) -> str:
    """Device type of a torch/numpy/cupy device: ``"cpu"``, ``"cuda"``, ``"mps"``...

    >>> _platform("cpu"), _platform(None)
    ('cpu', 'unknown')
    """
    kind = getattr(device, "type", None)  # torch.device
    if isinstance(kind, str):
        return kind
    if isinstance(device, str):
        return device.split(":", 1)[0]
    if device is None:
        return "unknown"
    return type(device).__module__.split(".", 1)[0] + ":" + type(device).__name__


@dataclass
class SavedState:
    """The content of a state file once validated: JSON ``meta`` and numpy ``arrays``."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _diff_config(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}={a!r} in the file but {b!r} now")
    return diffs


class Checkpoint:
    """A state file bound to one run: its ``kind``, configuration and (optional) operator.

    Parameters
    ----------
    path:
        The state file (created with its parent directories on the first save).
    kind:
        Name of the writer (``"lanczos"``, ``"slq"``...); a file of another kind is refused.
    config:
        JSON-serialisable mapping of every argument that influences the result.
    operator:
        The operator whose fingerprint must match (computed once, lazily: one product),
        or ``None``.
    probe_seed:
        Seed of the fingerprint probe of a new file (a non-negative integer); ``None``
        (default): :func:`fresh_probe_seed` draws one when the file is first written.  An
        existing file's stored seed always takes precedence.

    :meth:`load` returns ``None`` when the file does not exist, the validated
    :class:`SavedState` otherwise; it raises :class:`StateMismatchError` when
    the file belongs to another configuration or operator, and
    :class:`spectral.io.CorruptFileError` when it cannot be read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str,
        config: Mapping[str, Any],
        operator: SymmetricOperator | None = None,
        probe_seed: int | None = None,
    ) -> None:
        self.path = _as_path(path)
        self.kind = kind
        self.config = json.loads(json.dumps(dict(config), sort_keys=True))
        self._operator = operator
        self._fingerprint: OperatorFingerprint | None = None
        if probe_seed is not None:
            try:
                probe_seed = _probe_seed(probe_seed)
            except ValueError:
                raise argument_error(
                    "probe_seed", "None or a non-negative integer", probe_seed
                ) from None
        self._probe_seed = probe_seed
        self._probe = "gaussian"  # that of every new file; a loaded file's replaces it

    @property
    def fingerprint(self) -> OperatorFingerprint | None:
        """The operator fingerprint (computed on first access, with the probe seed of the
        file once :meth:`load` has read one, else ``probe_seed`` or a fresh seed), ``None``
        without operator."""
        if self._operator is not None and self._fingerprint is None:
            if self._probe_seed is None:
                self._probe_seed = fresh_probe_seed(self.kind, self.config)
            self._fingerprint = operator_fingerprint(
                self._operator, seed=self._probe_seed, probe=self._probe
            )
        return self._fingerprint

    def _adopt_probe(self, stored: OperatorFingerprint) -> None:
        """Fingerprint with the probe stored in the file from now on (the saves keep it)."""
        fp = self._fingerprint
        if fp is not None and (fp.probe, fp.probe_seed) != (stored.probe, stored.probe_seed):
            self._fingerprint = None  # taken before the file was read: one more product
        self._probe_seed, self._probe = stored.probe_seed, stored.probe

    def _mismatch(self, what: str) -> StateMismatchError:
        return StateMismatchError(
            f"Argument 'checkpoint': expected a state file written by {self.kind} with the same "
            f"arguments and operator; '{self.path}' does not match: {what}. Delete the file or "
            "pass another checkpoint path to start afresh."
        )

    def load(self) -> SavedState | None:
        """Read and validate the state file (``None`` if it does not exist yet)."""
        if not self.path.exists():
            return None
        raw = load_npz(self.path)  # verifies the checksum where the file has one
        try:
            fmt = str(raw["format"])
            kind = str(raw["kind"])
            config = json.loads(str(raw["config_json"]))
            op_text = str(raw["operator_json"])
            meta = json.loads(str(raw["meta_json"]))
        except (KeyError, ValueError) as exc:
            raise CorruptFileError(
                f"File '{self.path}' is not a {FORMAT} state file (missing or invalid {exc})."
            ) from exc
        if fmt not in (FORMAT, _FORMAT_WITHOUT_CHECKSUM):
            raise CorruptFileError(
                f"File '{self.path}' has format {fmt!r}; expected {FORMAT!r} (a state file)."
            )
        if fmt == FORMAT and not has_checksum(self.path):
            raise CorruptFileError(
                f"File '{self.path}' has lost its checksum member (every {FORMAT} state file "
                "has one): the archive's directory is damaged, and other members may be lost."
            )
        if kind != self.kind:
            raise self._mismatch(f"it was written by {kind}")
        diffs = _diff_config(config, self.config)
        if diffs:
            raise self._mismatch("; ".join(diffs))
        if (op_text == "null") != (self._operator is None):
            raise self._mismatch("one of the file and the run has an operator, the other not")
        if self._operator is not None:
            try:
                stored = OperatorFingerprint.from_json(op_text)
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise CorruptFileError(
                    f"File '{self.path}' has an invalid operator fingerprint ({exc})."
                ) from exc
            self._adopt_probe(stored)
            fp = self.fingerprint
            assert fp is not None
            reason = stored.difference(fp)
            if reason is not None:
                raise self._mismatch(reason)
        arrays = {k: v for k, v in raw.items() if k not in _RESERVED}
        logger.info("resume: loaded state %s (%s)", self.path, meta)
        return SavedState(meta=meta, arrays=arrays)

    def save(self, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Write the state atomically (uncompressed ``.npz``; no pickled objects)."""
        fp = self.fingerprint
        payload: dict[str, np.ndarray] = {
            "format": np.asarray(FORMAT),
            "kind": np.asarray(self.kind),
            "config_json": np.asarray(json.dumps(self.config, sort_keys=True)),
            "operator_json": np.asarray("null" if fp is None else fp.to_json()),
            "meta_json": np.asarray(json.dumps(dict(meta), sort_keys=True)),
        }
        for key, value in arrays.items():
            if key in _RESERVED:
                raise ValueError(f"Argument 'arrays': key {key!r} is reserved.")
            arr = np.asarray(value)
            if arr.dtype == object:
                raise TypeError(f"Argument 'arrays': {key!r} is an object array.")
            payload[key] = arr
        # the checksum first: a damaged zip directory drops the last members, which a
        # reader would otherwise take for absent optional arrays (a residual of None)
        members = {CHECKSUM_KEY: np.asarray(npz_checksum(payload)), **payload}
        with atomic_write(self.path, "wb") as handle:
            np.savez(handle, **members)  # type: ignore[arg-type]


@dataclass
class LanczosState:
    r"""The state of :func:`spectral.lanczos` after ``iteration`` steps (host arrays).

    Mid-run (``complete=False``), after step ``k = iteration``: ``alphas``
    ``(k,)``, ``betas`` ``(k,)`` (``beta_k`` included), ``basis`` ``(k, n)``
    rows ``q_1..q_k`` or ``None``, ``q = q_{k+1}``, ``q_prev = q_k``,
    ``beta_prev = beta_k``, ``anorm`` (the running ``\|A\|`` estimate), the
    partial-reorthogonalisation estimates ``omega_cur``/``omega_old`` and flag
    ``force_reorth``.  Complete (``complete=True``): ``betas`` has ``k-1``
    entries and ``residual``/``residual_norm``/``breakdown`` describe the end.
    """

    iteration: int
    alphas: np.ndarray
    betas: np.ndarray
    start_norm: float
    basis: np.ndarray | None = None
    q: np.ndarray | None = None
    q_prev: np.ndarray | None = None
    beta_prev: float = 0.0
    anorm: float = 0.0
    omega_cur: np.ndarray = field(default_factory=lambda: np.ones(1))
    omega_old: np.ndarray = field(default_factory=lambda: np.zeros(0))
    force_reorth: bool = False
    complete: bool = False
    breakdown: bool = False
    residual: np.ndarray | None = None
    residual_norm: float = 0.0

    _VECTORS = ("basis", "q", "q_prev", "residual")

    def to_payload(self, prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Split into ``(arrays, meta)`` with keys prefixed by ``prefix``."""
        arrays: dict[str, np.ndarray] = {
            prefix + "alphas": np.asarray(self.alphas, dtype=np.float64),
            prefix + "betas": np.asarray(self.betas, dtype=np.float64),
            prefix + "omega_cur": np.asarray(self.omega_cur, dtype=np.float64),
            prefix + "omega_old": np.asarray(self.omega_old, dtype=np.float64),
        }
        for name in self._VECTORS:
            value = getattr(self, name)
            if value is not None:
                arrays[prefix + name] = value
        meta = {
            prefix + "iteration": int(self.iteration),
            prefix + "start_norm": float(self.start_norm),
            prefix + "beta_prev": float(self.beta_prev),
            prefix + "anorm": float(self.anorm),
            prefix + "force_reorth": bool(self.force_reorth),
            prefix + "complete": bool(self.complete),
            prefix + "breakdown": bool(self.breakdown),
            prefix + "residual_norm": float(self.residual_norm),
        }
        return arrays, meta

    @classmethod
    def from_payload(
        cls, saved: SavedState, prefix: str = "", *, path: Any = "", n: int | None = None
    ) -> LanczosState:
        """Inverse of :meth:`to_payload`, checked by :meth:`validate` (against the operator's
        dimension ``n`` when given); raises ``CorruptFileError`` if keys are missing."""
        a, m = saved.arrays, saved.meta
        try:
            state = cls(
                iteration=int(m[prefix + "iteration"]),
                alphas=np.asarray(a[prefix + "alphas"]),  # dtypes checked by validate
                betas=np.asarray(a[prefix + "betas"]),
                start_norm=float(m[prefix + "start_norm"]),
                beta_prev=float(m[prefix + "beta_prev"]),
                anorm=float(m[prefix + "anorm"]),
                omega_cur=np.asarray(a[prefix + "omega_cur"]),
                omega_old=np.asarray(a[prefix + "omega_old"]),
                force_reorth=bool(m[prefix + "force_reorth"]),
                complete=bool(m[prefix + "complete"]),
                breakdown=bool(m[prefix + "breakdown"]),
                residual_norm=float(m[prefix + "residual_norm"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"State file '{path}' lacks the Lanczos state ({exc}).") from exc
        for name in cls._VECTORS:
            if prefix + name in a:
                setattr(state, name, a[prefix + name])
        state.validate(path, n=n)
        return state

    def validate(self, path: Any = "", *, n: int | None = None) -> None:
        """Check sizes, dtypes and finiteness (raises ``CorruptFileError`` naming ``path``).

        After ``k = iteration`` steps: ``alphas`` ``(k,)`` and ``betas`` ``(k,)`` (``(k-1,)``
        complete), float64 and finite; ``omega_cur``/``omega_old`` float64 of length 1/0
        (no partial reorthogonalisation) or ``k + 1``/``k``; the vectors (``q``, ``q_prev``,
        ``residual``, the ``(k, n)`` rows of ``basis``) float32 or float64, finite, all of one
        length, ``n`` when given (a vector of another length used to reach numpy as a raw
        broadcast error).
        """
        k = self.iteration
        n_betas = k - 1 if self.complete else k
        problems = []
        if k < 1 or self.alphas.shape != (k,):
            problems.append(f"alphas has shape {self.alphas.shape} for iteration {k}")
        if self.betas.shape != (max(n_betas, 0),):
            problems.append(f"betas has shape {self.betas.shape} for iteration {k}")
        if self.omega_cur.shape not in ((1,), (k + 1,)) or self.omega_old.shape not in ((0,), (k,)):
            problems.append(
                f"omega_cur/omega_old have shapes {self.omega_cur.shape}/{self.omega_old.shape} "
                f"for iteration {k}"
            )
        if not self.complete and self.q is None:
            problems.append("the next Lanczos vector is missing")
        for name in ("alphas", "betas", "omega_cur", "omega_old"):
            value = getattr(self, name)
            if value.dtype != np.float64:
                problems.append(f"{name} has dtype {value.dtype}, not float64")
            elif not np.all(np.isfinite(value)):
                problems.append(f"{name} has non-finite values")
        if not all(math.isfinite(x) for x in (self.beta_prev, self.anorm, self.start_norm)):
            problems.append("non-finite scalar state")
        problems += self._vector_problems(n)
        if problems:
            raise CorruptFileError(f"State file '{path}' is inconsistent: {'; '.join(problems)}.")

    def _vector_problems(self, n: int | None) -> list[str]:
        """What is wrong with the stored vectors (see :meth:`validate`)."""
        problems: list[str] = []
        lengths: set[int] = set()
        for name in self._VECTORS:
            value = getattr(self, name)
            if value is None:
                continue
            ndim = 2 if name == "basis" else 1
            if not isinstance(value, np.ndarray) or value.dtype not in (np.float32, np.float64):
                problems.append(f"{name} has dtype {getattr(value, 'dtype', type(value))}")
            elif value.ndim != ndim:
                problems.append(f"{name} has shape {value.shape}, not {ndim}-D")
            elif name == "basis" and value.shape[0] != self.iteration:
                problems.append(f"basis has {value.shape[0]} rows for iteration {self.iteration}")
            elif not np.all(np.isfinite(value)):
                problems.append(f"{name} has non-finite values")
            else:
                lengths.add(int(value.shape[-1]))
        expected = {n} if n is not None else set(list(lengths)[:1])
        if lengths - expected:
            where = f"the operator's dimension n = {n}" if n is not None else "one length"
            problems.append(f"vectors of lengths {sorted(lengths)}, not {where}")
        return problems


class LanczosHook:
    """Connects one Lanczos run to a :class:`Checkpoint` (used by ``lanczos`` and ``slq``).

    Attributes
    ----------
    initial:
        The state to resume from (``None``: start from scratch).
    every:
        Save after every ``every``-th completed step (and at the end).
    storage:
        Host dtype of stored vectors (see :func:`storage_dtype`).

    ``extra()`` returns arrays and meta of the caller (e.g. ``slq``'s finished
    probes) stored in the same file, so that one atomic write captures the
    whole state.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        every: int,
        *,
        initial: LanczosState | None = None,
        prefix: str = "",
        extra: Callable[[], tuple[dict[str, Any], dict[str, Any]]] | None = None,
        storage: type[np.floating[Any]] = np.float64,
    ) -> None:
        self.checkpoint = checkpoint
        self.every = check_every(every)
        self.initial = initial
        self.prefix = prefix
        self.extra = extra
        self.storage = storage

    def host(self, x: Any) -> np.ndarray:
        """Copy a vector/array of the operator's namespace to the host storage dtype (exact)."""
        return np.ascontiguousarray(_backend.to_host_float64(x).astype(self.storage))

    def save(self, state: LanczosState) -> None:
        """Write ``state`` (plus the caller's ``extra``) atomically."""
        arrays, meta = state.to_payload(self.prefix)
        if self.extra is not None:
            more_arrays, more_meta = self.extra()
            arrays.update(more_arrays)
            meta.update(more_meta)
        self.checkpoint.save(arrays, meta)
        logger.debug("resume: saved Lanczos state at iteration %d", state.iteration)
