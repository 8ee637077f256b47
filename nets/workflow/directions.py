"""Directions in parameter space for loss landscapes.

A direction is a flat vector :math:`d \\in \\mathbb{R}^P` over a fixed, named
set of parameters (a :class:`ParamSpace`); the landscape evaluates the loss at
:math:`\\theta_0 + t\\,d`.  Three families are provided:

* Ritz vectors of a saved spectrum (``ritz-top-i``: the i-th largest Ritz
  value, ``ritz-bottom-i``: the i-th smallest, ``ritz-min-abs-i``: the i-th
  smallest :math:`|\\theta|`), unit norm;
* seeded Gaussian ``random-i`` directions scaled to unit norm (a control of
  the same length as a Ritz vector);
* ``filter-normalised-i`` directions (Li et al., 2017): a Gaussian direction
  whose every filter (slice along the first axis of a weight with two or more
  dimensions) is rescaled to the norm of the same filter of :math:`\\theta_0`;
  one-dimensional parameters (biases, BatchNorm affine) get zero, as in the
  original ``ignore='biasbn'`` default.

>>> import torch
>>> space = ParamSpace.from_model(torch.nn.Linear(3, 2))
>>> space.names, space.numel
(('weight', 'bias'), 8)
>>> [d.name for d in random_directions(space, 2, seed=0)]
['random-1', 'random-2']
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spectral.errors import argument_error

__all__ = [
    "RITZ_KINDS",
    "Direction",
    "ParamSpace",
    "eigvec_space",
    "filter_normalised_directions",
    "parse_planes",
    "parse_ritz_spec",
    "random_directions",
    "ritz_directions",
]

RITZ_KINDS = ("ritz-top", "ritz-bottom", "ritz-min-abs")
_RITZ_SPEC = re.compile(r"^(ritz-top|ritz-bottom|ritz-min-abs)(?:-(\d+))?$")


@dataclass(frozen=True)
class ParamSpace:
    """An ordered set of named parameter shapes: the coordinates of a flat vector.

    The order is that of ``model.named_parameters()`` restricted to
    :attr:`names`, which is also the order curvature operators use.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_model(cls, model: torch.nn.Module, names: Sequence[str] | None = None) -> ParamSpace:
        """The trainable parameters of ``model`` (or exactly ``names``, in model order).

        Raises
        ------
        ValueError
            If a name is not a parameter of ``model`` or nothing is selected.
        """
        named = dict(model.named_parameters())
        if names is None:
            selected = [n for n, p in named.items() if p.requires_grad]
        else:
            wanted = list(names)
            unknown = [n for n in wanted if n not in named]
            if unknown:
                raise argument_error(
                    "params", f"names of parameters of the model (e.g. {list(named)[:5]})", unknown
                )
            order = {n: i for i, n in enumerate(named)}
            selected = sorted(set(wanted), key=order.__getitem__)
        if not selected:
            raise argument_error("params", "at least one trainable parameter", names)
        return cls(tuple(selected), tuple(tuple(named[n].shape) for n in selected))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of each parameter."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Total number of coordinates :math:`P`."""
        return int(sum(self.sizes))

    def shapes_json(self) -> str:
        """``{name: shape}`` as JSON (stored beside Ritz vectors)."""
        return json.dumps({n: list(s) for n, s in zip(self.names, self.shapes)})

    @classmethod
    def from_json(cls, names: Sequence[str], shapes_json: str) -> ParamSpace:
        """Inverse of :meth:`shapes_json` with an explicit name order."""
        shapes = json.loads(shapes_json)
        return cls(tuple(names), tuple(tuple(int(v) for v in shapes[n]) for n in names))

    def check_model(self, model: torch.nn.Module, what: str = "model") -> None:
        """Raise ``ValueError`` unless ``model`` has these parameters with these shapes."""
        named = dict(model.named_parameters())
        problems = []
        for n, s in zip(self.names, self.shapes):
            if n not in named:
                problems.append(f"{n} missing")
            elif tuple(named[n].shape) != s:
                problems.append(f"{n} has shape {tuple(named[n].shape)}, expected {s}")
        if problems:
            raise argument_error(
                what, "a model with the parameter names and shapes of the direction file", problems
            )

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The model's parameters of this space, in order."""
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def get_vector(self, model: torch.nn.Module) -> torch.Tensor:
        """Flatten the parameters into one detached vector (model dtype and device)."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.parameters(model)]).clone()

    def set_vector(self, model: torch.nn.Module, vector: torch.Tensor) -> None:
        """Copy ``vector`` (length :attr:`numel`) into the model's parameters in place."""
        if vector.ndim != 1 or vector.shape[0] != self.numel:
            raise argument_error("vector", f"a 1-D vector of length {self.numel}", vector)
        offset = 0
        with torch.no_grad():
            for p, size in zip(self.parameters(model), self.sizes):
                p.copy_(vector[offset : offset + size].view_as(p))
                offset += size

    def split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``vector`` shaped like each parameter."""
        return [
            chunk.view(shape)
            for chunk, shape in zip(torch.split(vector, list(self.sizes)), self.shapes)
        ]


@dataclass(frozen=True)
class Direction:
    """A named flat direction; ``value`` is its Ritz value (NaN for other kinds)."""

    name: str
    vector: torch.Tensor
    value: float = float("nan")


def parse_ritz_spec(spec: str, num_directions: int) -> tuple[str, list[int]]:
    """Parse ``'ritz-top'`` (the first ``num_directions``) or ``'ritz-top-3'`` (just the third).

    >>> parse_ritz_spec("ritz-top", 2)
    ('ritz-top', [1, 2])
    >>> parse_ritz_spec("Ritz_Min_Abs-3", 2)
    ('ritz-min-abs', [3])
    """
    text = str(spec).strip().lower().replace("_", "-")
    match = _RITZ_SPEC.match(text)
    if match is None:
        raise argument_error(
            "directions",
            "entries 'ritz-top', 'ritz-bottom', 'ritz-min-abs' (optionally with '-i', "
            "e.g. 'ritz-top-2') or 1-D arrays of length P",
            spec,
        )
    kind, index = match.group(1), match.group(2)
    if index is not None:
        if int(index) < 1:
            raise argument_error("directions", "a 1-based Ritz index", spec)
        return kind, [int(index)]
    return kind, list(range(1, num_directions + 1))


def ritz_directions(
    values: np.ndarray,
    vectors: np.ndarray,
    kind: str,
    indices: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Direction]:
    """Select Ritz vectors by rank.

    ``values`` is float64[m], ``vectors`` is [m, P] with row i the unit Ritz
    vector of ``values[i]``.  ``kind`` orders them: ``'ritz-top'`` by
    decreasing value, ``'ritz-bottom'`` by increasing value, ``'ritz-min-abs'``
    by increasing :math:`|\\theta|`; ``indices`` are 1-based ranks.

    >>> v = np.array([-1.0, 0.1, 3.0]); V = np.eye(3)
    >>> [(d.name, d.value) for d in ritz_directions(v, V, "ritz-min-abs", [1, 2])]
    [('ritz-min-abs-1', 0.1), ('ritz-min-abs-2', -1.0)]
    """
    values = np.asarray(values, dtype=np.float64)
    if kind == "ritz-top":
        order = np.argsort(-values, kind="stable")
    elif kind == "ritz-bottom":
        order = np.argsort(values, kind="stable")
    elif kind == "ritz-min-abs":
        order = np.argsort(np.abs(values), kind="stable")
    else:
        raise argument_error("kind", f"one of {RITZ_KINDS}", kind)
    out = []
    for i in indices:
        if not 1 <= i <= values.shape[0]:
            raise argument_error(
                "directions", f"Ritz ranks between 1 and {values.shape[0]} (the saved vectors)", i
            )
        row = int(order[i - 1])
        vec = torch.as_tensor(np.asarray(vectors[row]), dtype=dtype, device=device)
        out.append(Direction(f"{kind}-{i}", vec, float(values[row])))
    return out


def _gaussian(space: ParamSpace, seed: int, stream: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([int(seed), stream, index])
    return rng.standard_normal(space.numel)


def random_directions(
    space: ParamSpace,
    count: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Direction]:
    """``count`` seeded Gaussian directions of unit Euclidean norm (``random-1`` ...).

    Drawn on the host in float64 with numpy, so bitwise reproducible on any device.
    """
    out = []
    for i in range(1, count + 1):
        g = _gaussian(space, seed, 1, i)
        g /= np.linalg.norm(g)
        out.append(Direction(f"random-{i}", torch.as_tensor(g, dtype=dtype, device=device)))
    return out


def filter_normalised_directions(
    model: torch.nn.Module,
    space: ParamSpace,
    count: int,
    *,
    seed: int = 0,
    ignore_1d: bool = True,
) -> list[Direction]:
    """``count`` filter-normalised Gaussian directions (Li et al., 2017).

    For every parameter :math:`W` with two or more dimensions and each filter
    :math:`i` (``W[i]``), :math:`d_i \\leftarrow d_i\\,\\lVert W_i\\rVert / \\lVert
    d_i\\rVert`.  One-dimensional parameters are zeroed (``ignore_1d``) or set
    to the parameter itself.  Vectors have the model's dtype and device.
    """
    out = []
    params = space.parameters(model)
    for i in range(1, count + 1):
        g = _gaussian(space, seed, 2, i)
        chunks = []
        offset = 0
        for p, size in zip(params, space.sizes):
            w = p.detach().to(torch.float64).cpu().reshape(p.shape[0] if p.ndim else 1, -1)
            d = torch.from_numpy(g[offset : offset + size].copy()).reshape(w.shape)
            offset += size
            if p.ndim <= 1:
                d = torch.zeros_like(d) if ignore_1d else w.clone()
            else:
                d_norm = d.norm(dim=1, keepdim=True)
                w_norm = w.norm(dim=1, keepdim=True)
                d = d * (w_norm / torch.clamp(d_norm, min=torch.finfo(torch.float64).tiny))
            chunks.append(d.reshape(-1))
        vec = torch.cat(chunks).to(dtype=params[0].dtype, device=params[0].device)
        out.append(Direction(f"filter-normalised-{i}", vec))
    return out


def parse_planes(
    planes: bool | Sequence[str | Sequence[str | int]] | None, names: Sequence[str]
) -> list[tuple[int, int]]:
    """Resolve plane specifications to index pairs into ``names``.

    ``None``/``False``: no planes; ``True``: the first two directions; otherwise
    a list whose entries are ``'a|b'`` strings or pairs of names or indices.

    >>> parse_planes(["ritz-top-1|random-1", (0, 1)], ["ritz-top-1", "ritz-top-2", "random-1"])
    [(0, 2), (0, 1)]
    """
    if planes is None or planes is False:
        return []
    if planes is True:
        if len(names) < 2:
            raise argument_error("planes", "at least two directions to span a plane", list(names))
        return [(0, 1)]
    if isinstance(planes, str | bytes):
        planes = [planes]
    index = {n: i for i, n in enumerate(names)}
    out = []
    for entry in planes:
        parts: Sequence[str | int] = entry.split("|") if isinstance(entry, str) else entry
        if len(parts) != 2:
            raise argument_error(
                "planes", "pairs of directions such as 'ritz-top-1|random-1'", entry
            )
        pair = []
        for part in parts:
            if isinstance(part, int | np.integer) and not isinstance(part, bool):
                if not 0 <= int(part) < len(names):
                    raise argument_error("planes", f"direction indices below {len(names)}", entry)
                pair.append(int(part))
            elif isinstance(part, str) and part.strip() in index:
                pair.append(index[part.strip()])
            else:
                raise argument_error("planes", f"direction names among {list(names)}", entry)
        if pair[0] == pair[1]:
            raise argument_error("planes", "two different directions", entry)
        out.append((pair[0], pair[1]))
    return out


def eigvec_space(archive: Mapping[str, np.ndarray]) -> ParamSpace:
    """The :class:`ParamSpace` recorded in a ``-eigvec.npz`` archive."""
    names = [str(n) for n in np.asarray(archive["param_names"]).tolist()]
    return ParamSpace.from_json(names, str(archive["param_shapes_json"]))
