"""The ``curvature`` command line: train, spectrum, stats, landscape, compare, plot, demo.

Each subcommand is a thin layer over the Python API (``nets.train_network``,
``nets.compute_eigenspectrum``, ``nets.compute_loss_stats``,
``nets.build_loss_landscape``, the ``nets.plot_*`` functions and
:func:`nets.demo.run_demo`), shows progress bars while it works and prints a
summary table at the end. ``curvature <subcommand> --help`` lists the options.

Examples (the paper's Tables 1-3 as command lines)::

    curvature train --dir result/VGG16-CIFAR100 --dataset CIFAR100 --data-path data \\
        --model VGG16 --epochs 100 --optimizer SGD --lr 0.03 --momentum 0.9 --weight-decay 5e-4
    curvature spectrum --checkpoint result/VGG16-CIFAR100/checkpoint-00100.pt \\
        --curvature ggn --iters 20 --save-eigvec \\
        --out result/VGG16-CIFAR100/spectra/spectrum-00100-ggn-lanczos
    curvature plot spectrum result/VGG16-CIFAR100/spectra/spectrum-00100-ggn-lanczos.npz
    curvature spectrum --checkpoint run/checkpoint-00010.pt --blocks transformer:heads=4
    curvature plot blocks run/spectra/blocks-00010-hessian-transformer-heads-4.npz
    curvature landscape --checkpoint checkpoint-00100.pt --spectrum spectrum-00100-hessian \\
        --dist 1 --n-points 21 --out landscape-100.npz
    curvature demo --out results

>>> args = build_parser().parse_args(["spectrum", "--checkpoint", "checkpoint-00010.pt"])
>>> args.command, args.curvature, args.iters, args.bn_mode, args.device
('spectrum', 'hessian', 20, 'train', 'auto')
>>> print(format_table([("a", "1"), ("bbb", "2.5")], title="Example"))
Example
-------
a    1
bbb  2.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "format_table", "main"]

Row = tuple[str, str]

#: The optimizers ``train --help`` lists (each is tested from a subprocess).
OPTIMIZERS = ("SGD", "Adam", "LancGN", "LancHess", "KFAC", "EKFAC", "SWATS")


# --------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    """Short human-readable form of a number or other value for the summary tables."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[Row], *, title: str | None = None) -> str:
    """Two aligned columns (name, value), with an optional underlined title."""
    width = max((len(name) for name, _ in rows), default=0)
    lines = [] if title is None else [title, "-" * len(title)]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    return "\n".join(lines)


def format_grid(header: Sequence[str], body: Sequence[Sequence[str]], *, title: str) -> str:
    """A table with a header row and right-aligned columns."""
    columns = [list(header)] + [list(r) for r in body]
    widths = [max(len(row[i]) for row in columns) for i in range(len(header))]
    lines = [title, "-" * len(title)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


class UsageError(Exception):
    """A user error on the command line: reported as one line on stderr, exit status 2."""


#: Library argument names -> the flags that set them (so errors speak the user's words).
FLAGS: dict[str, str] = {
    "dir": "--dir",
    "dataset": "--dataset",
    "data_path": "--data-path",
    "model": "--model",
    "device": "--device",
    "seed": "--seed",
    "epochs": "--epochs",
    "optimizer": "--optimizer",
    "optimizer_kwargs": "--opt",
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "batch_size": "--batch-size",
    "schedule": "--schedule",
    "save_freq": "--save-freq",
    "resume": "--resume",
    "overwrite": "--overwrite",
    "checkpoint_path": "--checkpoint",
    "save_spectrum_path": "--out",
    "save_path": "--out",
    "save_eigvec": "--save-eigvec",
    "lanczos_iters": "--iters",
    "curvature_matrix": "--curvature",
    "curvature": "--curvature",
    "num_probes": "--probes",
    "bn_mode": "--bn-mode",
    "subsample": "--subsample",
    "state_path": "--state",
    "checkpoint_every": "--checkpoint-every",
    "spectrum_path": "--spectrum",
    "dist": "--dist",
    "n_points": "--n-points",
    "directions": "--directions",
    "num_directions": "--num-directions",
    "random_directions": "--random-directions",
    "filter_normalised": "--filter-normalised",
    "planes": "--planes",
    "refresh_bn": "--refresh-bn",
    "smooth": "--smooth",
    "metric": "--metric",
    "log_weights": "--log-weights",
    "hessian_spectrum": "--hessian",
    "ggn_spectrum": "--ggn",
    "ggn_diagonal": "--diagonal",
    "solve_tol": "--solve-tol",
    "blocks": "--blocks",
    "heads": "--blocks",
    "sigma": "--smooth",
    "path": "the input file",
    "kind_or_path": "the input file",
    "source": "the input",
}

#: Advice in library messages that has a different form on the command line.
_ADVICE = (
    (
        ", or call with download=True (needs torchvision).",
        "; then pass that folder as --data-path (the command line does not download).",
    ),
    ("(or a dataset that it takes;", "(or a --dataset that it takes;"),
    ("trained with track=...)", "trained with 'curvature train --track-curvature')"),
    ("pass another checkpoint path to start afresh", "pass another --state path to start afresh"),
    ("pass overwrite=True to replace it", "pass --overwrite to replace it"),
)

#: Library argument names whose flag depends on the subcommand (the library's
#: ``checkpoint`` of a resumable state is ``--state``; the demo's flags).
_COMMAND_FLAGS: dict[str, dict[str, str]] = {
    "spectrum": {"checkpoint": "--state"},
    "demo": {"lanczos_iters": "--lanczos-iters", "out_dir": "--out", "overwrite": "--overwrite"},
}


def user_message(exc: BaseException, flags: Mapping[str, str] | None = None) -> str:
    """The message of ``exc`` in the command line's words: argument names become flags
    (:data:`FLAGS`, updated by ``flags``).

    >>> user_message(ValueError("Argument 'lanczos_iters': expected an integer >= 1; received 0."))
    'Option --iters: expected an integer >= 1; received 0.'
    """
    import re

    known = {**FLAGS, **(flags or {})}
    text = str(exc) if str(exc) else type(exc).__name__

    named: list[tuple[str, str]] = []

    def flag(match: re.Match[str]) -> str:
        name = match.group(1)
        target = known.get(name)
        if target is None:
            return match.group(0)
        named.append((name, target))
        return f"\0{len(named) - 1}\0"  # put back below, after the bare names

    text = re.sub(r"Argument '(\w+)'", flag, text)
    # "1 <= lanczos_iters", "lanczos_iters=4 in the file" -> "--iters": identifiers only (an
    # English word -- "the 4 epochs already trained", "a torch.device" -- is not an argument
    # name in prose); the named argument's own, then every other known one
    for name, target in [*named, *known.items()]:
        if target.startswith("--") and " " not in target and "_" in name:
            text = re.sub(rf"(?<![\w.-]){name}(?![\w-])", target, text)
    for index, (_, target) in enumerate(named):
        shown = f"Option {target}" if target.startswith("--") else target[0].upper() + target[1:]
        text = text.replace(f"\0{index}\0", shown)
    for old, new in _ADVICE:
        text = text.replace(old, new)
    return " ".join(text.split())


def _emit(text: str) -> None:
    print()
    print(text)


# --------------------------------------------------------------------------- parsing helpers


def _parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` value: JSON when it parses as JSON (numbers, true, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} expects KEY=VALUE; received {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _count_or_fraction(text: str) -> int | float:
    """``--subsample``: an integer count (``500``) or a fraction in (0, 1) (``0.25``)."""
    value = float(text)
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1); got {text}")


def _checkpoint_config(path: str | None, flag: str = "Option --checkpoint") -> dict[str, Any]:
    """The JSON config stored in a checkpoint (model, dataset, data_path...), or ``{}``.

    A file that cannot be read as a checkpoint is a :class:`UsageError` naming ``flag``
    (the option or argument that gave it).
    """
    if path is None:
        return {}
    from nets.checkpoint import load_checkpoint

    try:
        config = load_checkpoint(path).get("config")
    except OSError as exc:  # missing, corrupted, not a checkpoint, unsafe
        raise UsageError(f"{flag}: {user_message(exc)}") from exc
    return dict(config) if isinstance(config, Mapping) else {}


def checkpoint_epoch(path: str, flag: str = "Option --checkpoint") -> int:
    """The epoch a checkpoint records (0 for a bare ``state_dict``); a file that cannot be
    read as a checkpoint is a :class:`UsageError` naming ``flag``."""
    from nets.checkpoint import load_checkpoint

    try:
        epoch = load_checkpoint(path).get("epoch")
    except OSError as exc:
        raise UsageError(f"{flag}: {user_message(exc)}") from exc
    return int(epoch) if isinstance(epoch, int) else 0


def _fill_from_checkpoint(
    args: argparse.Namespace, checkpoint: str | None, flag: str = "Option --checkpoint"
) -> None:
    """Default ``--model``, ``--dataset``, ``--data-path`` to what the checkpoint records."""
    config = _checkpoint_config(checkpoint, flag)
    for attr, key in (("model", "model"), ("dataset", "dataset"), ("data_path", "data_path")):
        if getattr(args, attr, None) is None and isinstance(config.get(key), str):
            setattr(args, attr, config[key])
    if getattr(args, "dataset", None) is None:
        args.dataset = "digits"


def _add_common(p: argparse.ArgumentParser, *, train: bool = False) -> None:
    """``--dataset``, ``--data-path``, ``--model`` (real defaults in the help), device, seed."""
    if train:  # defaults None: with --resume, a flag left out takes the run's value
        p.add_argument(
            "--dataset",
            default=None,
            help="digits (embedded), CIFAR10, CIFAR100, synthetic or text (default: digits; "
            "with --resume, the run's)",
        )
        p.add_argument(
            "--data-path",
            default=None,
            help="folder with the CIFAR archives (with --resume, default: the run's)",
        )
        p.add_argument(
            "--model",
            default=None,
            help="model name, e.g. SmallCNN, VGG16 (default: SmallCNN; with --resume, the run's)",
        )
    else:
        p.add_argument(
            "--dataset",
            default=None,
            help="digits (embedded), CIFAR10, CIFAR100, synthetic or text "
            "(default: the dataset the checkpoint was trained on, else digits)",
        )
        p.add_argument(
            "--data-path",
            default=None,
            help="folder with the CIFAR archives (default: the checkpoint's)",
        )
        p.add_argument(
            "--model",
            default=None,
            help="model name, e.g. SmallCNN, VGG16 (default: the checkpoint's model)",
        )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:0, ...")
    p.add_argument(
        "--seed",
        type=int,
        default=None if train else 0,
        help="random seed (default 0" + ("; with --resume, the run's)" if train else ")"),
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )


# --------------------------------------------------------------------------- subcommands


#: Optimiser options with their own flag (the rest go through ``--opt KEY=VALUE``).
_OPTIMIZER_FLAGS = (("lr", "--lr"), ("momentum", "--momentum"), ("weight_decay", "--weight-decay"))
#: Options that train_network takes out of the optimiser's keywords itself.
_TRAINING_OPTIONS = frozenset({"batch_size", "curvature_batch_size"})


def optimizer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The optimiser's keywords from ``--lr``, ``--momentum``, ``--weight-decay`` and ``--opt``.

    Only options the user gave are passed (a flag left out leaves the optimiser's own
    default), and each must be a parameter of the optimiser's signature
    (:func:`nets.optim.registry.optimizer_options`); otherwise a :class:`UsageError`
    names the flag and lists what the optimiser takes.
    """
    from nets.optim.registry import optimizer_options

    given: dict[str, tuple[str, Any]] = {}
    for key, flag in _OPTIMIZER_FLAGS:
        value = getattr(args, key)
        if value is not None:
            given[key] = (flag, value)
    for key, value in _key_values(args.opt, "--opt").items():
        given[key] = (f"--opt {key}=...", value)
    name = run_flag(args, "optimizer")
    try:
        accepted = optimizer_options(name)
    except ValueError as exc:
        raise UsageError(user_message(exc)) from None
    if accepted is not None:
        for key, (flag, _) in given.items():
            if key not in accepted and key not in _TRAINING_OPTIONS:
                raise UsageError(
                    f"{flag} is not an option of the optimizer {name} (it takes "
                    f"{', '.join(sorted(accepted))}; set them with --opt KEY=VALUE)"
                )
    return {key: value for key, (_, value) in given.items()}


def _training_data(args: argparse.Namespace) -> Any:
    """``--dataset`` by name, or with ``--subsample`` its splits with a seeded training subset.

    Only the training split shrinks (its normalisation stays that of the whole set); the
    test split is whole. The checkpoints record the subsample in ``dataset_options``.
    """
    dataset, seed = run_flag(args, "dataset"), run_flag(args, "seed")
    if args.subsample is None:
        return dataset
    from dataclasses import replace

    from nets.data import ArrayDataset, load_dataset
    from nets.workflow._resolve import subsample_dataset

    splits = load_dataset(dataset, args.data_path, seed=seed)
    subset = subsample_dataset(splits.train, args.subsample, seed)
    if subset is splits.train:
        return splits
    train: Any = subset
    # train_eval: the same samples without augmentation (the tracker's measurement set, the
    # SWA BatchNorm refresh); it was the augmented subset, so CIFAR curvature was measured
    # on randomly cropped and flipped images
    train_eval: Any = subsample_dataset(splits.train_eval, args.subsample, seed)
    if isinstance(splits.train, ArrayDataset):
        index = torch_index(subset.indices)
        train = splits.train.with_transform(splits.train.transform)
        train.inputs, train.targets = train.inputs[index], train.targets[index]
        train_eval = train.with_transform(None)
    options = {**splits.options, "subsample": args.subsample}
    return replace(splits, train=train, train_eval=train_eval, options=options)


def torch_index(indices: Sequence[int]) -> Any:
    """``indices`` as a torch index tensor (torch imported only when a command needs it)."""
    import torch

    return torch.as_tensor(list(indices), dtype=torch.long)


#: Flags of ``train`` that define the run: (attribute, its key in the run's config, the
#: default of a new run, the flag). With ``--resume`` a flag left out takes the run's value.
_RUN_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("model", "model", "SmallCNN", "--model"),
    ("dataset", "dataset", "digits", "--dataset"),
    ("optimizer", "optimizer", "SGD", "--optimizer"),
    ("batch_size", "batch_size", 128, "--batch-size"),
    ("schedule", "schedule", "linear", "--schedule"),
    ("seed", "seed", 0, "--seed"),
    ("epochs", "epochs", 10, "--epochs"),
    ("save_freq", "save_freq", 25, "--save-freq"),
)
#: Run flags that a resumed run may change (the others must equal the recorded values).
_CHANGEABLE_ON_RESUME = frozenset({"epochs", "save_freq"})


def run_flag(args: argparse.Namespace, attr: str) -> Any:
    """The value of a run-defining flag of ``train``: as given (or filled in by
    :func:`resolve_run_flags`), else a new run's default."""
    value = getattr(args, attr, None)
    if value is None:
        value = next(default for name, _, default, _ in _RUN_FLAGS if name == attr)
    return value


def _same_setting(given: Any, recorded: Any) -> bool:
    if isinstance(given, str) and isinstance(recorded, str):
        return given.lower() == recorded.lower()  # names are case-insensitive
    return bool(given == recorded)


def resolve_run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the run-defining flags of ``train`` left out (``None``) in place; return the
    optimiser keywords the run had (``{}`` for a new run).

    A new run takes the defaults of :data:`_RUN_FLAGS`.  With ``--resume`` the run continues
    as it was configured (its checkpoint's config): a flag left out takes the run's value,
    and a flag given with another value (but ``--epochs``, checked by
    :func:`nets.training.check_schedule_history`) is a :class:`UsageError` naming the flag
    and both values.  The optimiser's keywords and learning rate are compared by
    :func:`nets.training.check_same_run`.
    """
    config = _checkpoint_config(args.resume, "Option --resume") if args.resume else {}
    where = f"recorded in '{args.resume}'"
    for attr, key, default, flag in _RUN_FLAGS:
        given, known = getattr(args, attr), key in config and config[key] is not None
        if given is None:
            setattr(args, attr, config[key] if known else default)
        elif known and attr not in _CHANGEABLE_ON_RESUME and not _same_setting(given, config[key]):
            raise UsageError(
                f"Option {flag}: expected the value of the run being resumed "
                f"({config[key]!r}, {where}): resuming continues that run as it was "
                f"configured (leave {flag} out to take it); received {given!r}."
            )
    if not config:
        return {}
    if args.data_path is None and isinstance(config.get("data_path"), str):
        args.data_path = config["data_path"]
    recorded = (config.get("dataset_options") or {}).get("subsample")
    if args.subsample is None:
        args.subsample = recorded
    elif recorded != args.subsample:
        raise UsageError(
            f"Option --subsample: expected the value of the run being resumed ({recorded!r}, "
            f"{where}; None: the whole training set); received {args.subsample!r}."
        )
    kept = dict(config.get("optimizer_kwargs") or {})
    if config.get("curvature_batch_size") is not None:
        kept["curvature_batch_size"] = config["curvature_batch_size"]
    return kept


def _cmd_train(args: argparse.Namespace) -> list[str]:
    from nets.training import train_network

    recorded_options = resolve_run_flags(args)
    given_options = optimizer_kwargs(args)
    options = {**recorded_options, **given_options}
    kwargs: dict[str, Any] = {
        "dir": args.dir,
        "dataset": _training_data(args),
        "data_path": args.data_path,
        "model": args.model,
        "optimizer": args.optimizer,
        "optimizer_kwargs": options,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "schedule": args.schedule,
        "seed": args.seed,
        "device": args.device,
        "progress": args.progress,
    }
    if args.save_freq is not None:
        if args.save_freq < 0:
            raise UsageError(
                "Option --save-freq: expected an integer >= 0 (0: only the initial and final "
                f"checkpoints); received {args.save_freq}."
            )
        kwargs["save_freq"] = args.save_freq if args.save_freq > 0 else None
    if args.resume is not None:
        if args.overwrite:  # resuming keeps the run's files, --overwrite deletes them
            raise UsageError(
                "Option --overwrite: expected not to be given with --resume (resuming continues "
                "the run's files; --overwrite deletes them and starts anew); received both."
            )
        refuse_replacing_resume(args.dir, args.resume)
        kwargs["resume"] = args.resume
    if args.track_curvature is not None:
        kwargs["track"] = track_options(args.track_curvature)
    kwargs["overwrite"] = args.overwrite
    # the optimiser's keywords without a flag of their own are set by --opt; the
    # tracker's arguments are keys of --track-curvature
    flags = {key: f"--opt {key}=..." for key in options if key not in FLAGS}
    if args.track_curvature is not None:
        flags.update(TRACK_FLAGS)
    start = time.perf_counter()
    try:
        train_network(**kwargs)
    except ValueError as exc:
        raise UsageError(user_message(exc, flags)) from exc
    elapsed = time.perf_counter() - start
    return [_training_table(Path(args.dir), elapsed)]


def refuse_replacing_resume(run_dir: str, resume: str) -> None:
    """Refuse a ``--resume`` checkpoint that ``train`` would write over: a file of the run
    in ``run_dir`` (compared with :func:`same_file`: symbolic and hard links too) other
    than a checkpoint of an epoch up to the one it holds (the run writes the later ones).
    """
    from nets.training import run_files

    for path in run_files(Path(run_dir)):
        if not same_file(path, resume):
            continue
        named = re.fullmatch(r"(?:checkpoint|swa)-(\d+)\.pt", path.name)
        held = checkpoint_epoch(resume, "Option --resume")
        if named is not None and int(named.group(1)) <= held:
            continue
        raise UsageError(
            f"Option --resume: the checkpoint '{resume}' is the file {path.name} of the run in "
            f"--dir '{run_dir}', which the run writes anew (it holds epoch {held}); copy the "
            "checkpoint elsewhere and resume from the copy"
        )


#: Keys of ``--track-curvature`` and their types.
TRACK_KEYS: dict[str, type] = {
    "every": int,
    "top_k": int,
    "trace_probes": int,
    "kind": str,
    "seed": int,
    "tol": float,
    "samples": int,
    "density_every": int,
    "density_iters": int,
    "density_probes": int,
    "bn_mode": str,
}


#: Tracker arguments -> their key of ``--track-curvature`` (for error messages; the
#: tracker's ``seed`` defaults to ``--seed``, its measurement set ``data`` is the first
#: ``samples`` training samples).
TRACK_FLAGS: dict[str, str] = {
    **{key: f"--track-curvature {key}" for key in TRACK_KEYS if key not in ("seed", "samples")},
    "data": "--track-curvature samples",
}


def track_options(text: str) -> dict[str, Any]:
    """``--track-curvature every=50,top_k=3`` as the tracker's keyword arguments.

    >>> track_options("every=50,top_k=3,trace_probes=8")
    {'every': 50, 'top_k': 3, 'trace_probes': 8}
    """
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise UsageError(f"--track-curvature expects KEY=VALUE,...; received {item!r}")
        kind = TRACK_KEYS.get(key)
        if kind is None:
            raise UsageError(
                f"--track-curvature: unknown key {key!r} (keys: {', '.join(TRACK_KEYS)})"
            )
        if key in given:  # the last one would silently win
            raise UsageError(
                f"--track-curvature {key}: expected each key once; received {key}="
                f"{given[key]} and {key}={value}"
            )
        given[key] = value
        try:
            out[key] = kind(value)
        except ValueError:
            raise UsageError(
                f"--track-curvature {key}: expected {kind.__name__}; received {value!r}"
            ) from None
        minimum = 0 if key in ("trace_probes", "seed") else 1
        if kind is int and out[key] < minimum:
            raise UsageError(
                f"--track-curvature {key}: expected an integer >= {minimum}; received {value}"
            )
    return out


def _accuracy_or_perplexity(entry: dict[str, Any], split: str, label: str, note: int) -> Row:
    """The accuracy row, or the perplexity row for a language model (no accuracy, a ppl)."""
    if entry.get(f"{split}_acc") is None and entry.get(f"{split}_ppl") is not None:
        return (f"{label} perplexity ({note})", _fmt(entry.get(f"{split}_ppl")))
    return (f"{label} accuracy (%) ({note})", _fmt(entry.get(f"{split}_acc")))


def _training_table(run_dir: Path, elapsed: float | None = None) -> str:
    stats_file = run_dir / "stats.json"
    rows: list[Row] = [("run directory", str(run_dir))]
    notes: list[str] = []
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        epochs = stats.get("epochs") or []
        last = epochs[-1] if epochs else {}
        tested = [e for e in epochs if e.get("test_loss") is not None]
        config = stats.get("config") or {}
        rows += [
            ("model / dataset", f"{config.get('model') or '-'} / {config.get('dataset') or '-'}"),
            ("optimizer", str(config.get("optimizer") or "-")),
            ("epochs", _fmt(last.get("epoch"))),
            ("last epoch's train loss (1)", _fmt(last.get("train_loss"))),
            _accuracy_or_perplexity(last, "train", "last epoch's train", 1),
        ]
        if tested:
            rows += [
                ("final test loss (2)", _fmt(tested[-1].get("test_loss"))),
                _accuracy_or_perplexity(tested[-1], "test", "final test", 2),
            ]
        definitions = stats.get("definitions") or {}
        notes = [
            f"({i}) {definitions[key]}"
            for i, key in ((1, "train_loss"), (2, "test_loss"))
            if key in definitions and (i == 1 or tested)
        ]
    checkpoints = sorted(run_dir.glob("checkpoint-*.pt"))
    if checkpoints:
        rows.append(("checkpoints", f"{len(checkpoints)} (last: {checkpoints[-1].name})"))
    if elapsed is not None:
        rows.append(("wall time (s)", f"{elapsed:.1f}"))
    table = format_table(rows, title="Training summary")
    return "\n".join([table, *notes]) if stats_file.is_file() else table


def spectrum_rows(path: str | Path) -> list[Row]:
    """Summary rows of a spectrum file: curvature, P, m, top value, trace, negative mass..."""
    from nets.plots.spectrum import spectrum_summary

    s = spectrum_summary(path)
    config = s.get("config") or {}
    samples = config.get("subsample")
    return [
        ("file", str(path)),
        ("curvature", _fmt(s["curvature"])),
        (
            "of the mean loss over",
            "the training set" if samples is None else f"{samples} training samples (--subsample)",
        ),
        ("BatchNorm mode of the products", _fmt(config.get("bn_mode"))),
        ("parameters P", _fmt(s["num_params"])),
        ("Ritz values m", _fmt(s["num_ritz"])),
        ("top Ritz value", _fmt(s["top"])),
        ("bottom Ritz value", _fmt(s["bottom"])),
        ("trace P*sum(w*theta)", _fmt(s["trace"])),
        ("negative spectral mass", _fmt(s["negative_mass"])),
        ("condition of positive part", _fmt(s["positive_condition"])),
    ]


def _npz_forms(path: str | Path) -> list[Path]:
    """``path`` and the ``.npz`` file the workflow functions write or read for it."""
    p = Path(path)
    return [p] if p.suffix == ".npz" else [p, p.with_name(p.name + ".npz")]


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once resolved (symbolic links,
    ``./`` and ``..``), or, when both exist, the same file (:func:`os.path.samefile`: hard
    links, bind mounts).

    >>> same_file("run/./spec.npz", "run/x/../spec.npz"), same_file("a.npz", "b.npz")
    (True, False)
    """
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): no hard link to compare
        return False


def eigvec_input(spectrum: str | Path) -> Path:
    """The Ritz-vector file that ``landscape --spectrum`` reads: ``spectrum`` itself when
    it names one (``...-eigvec.npz``), else the one beside it.

    >>> str(eigvec_input("run/spec")), str(eigvec_input("run/spec-eigvec.npz"))
    ('run/spec-eigvec.npz', 'run/spec-eigvec.npz')
    """
    from nets.workflow._resolve import eigvec_file

    text = os.fspath(spectrum)
    return Path(text) if text.endswith("-eigvec.npz") else eigvec_file(text)


def refuse_overwriting_inputs(
    outputs: Sequence[str | Path], inputs: dict[str, Any], *, flag: str = "--out"
) -> None:
    """Raise :class:`UsageError` naming ``flag`` when an output would replace an input, or
    names an existing directory.

    ``inputs`` maps each input flag (or argument) to a path, a list of paths or None;
    paths are compared with :func:`same_file` (resolved, and hard links), each with the
    ``.npz`` form the workflow adds.

    >>> refuse_overwriting_inputs(["a.npz"], {"--spectrum": "b"})
    >>> refuse_overwriting_inputs(["run/s"], {"--spectrum": "run/s.npz"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nets.cli.UsageError: --out: the output run/s.npz would replace the input of --spectrum ...
    """
    for out in outputs:  # the workflow would write '<dir>.npz' beside a directory
        if Path(out).is_dir():
            raise UsageError(
                f"{flag}: expected a file path (the output is a file, its .npz suffix added "
                f"when missing); received '{out}', an existing directory"
            )
    written = [form for out in outputs for form in _npz_forms(out)]
    for name, value in inputs.items():
        paths = value if isinstance(value, (list, tuple)) else [value]
        for path in paths:
            if path is None:
                continue
            for form in _npz_forms(path):
                clash = next((out for out in written if same_file(out, form)), None)
                if clash is not None:
                    raise UsageError(
                        f"{flag}: the output {clash} would replace the input of {name} "
                        f"({form}); choose another {flag}"
                    )


def _default_spectrum_path(checkpoint: str, curvature: str) -> Path:
    ckpt = Path(checkpoint)
    tag = ckpt.stem.replace("checkpoint-", "") if ckpt.stem.startswith("checkpoint-") else ckpt.stem
    kind = curvature.lower().replace("_", "-").removesuffix("-lanczos")
    return ckpt.parent / "spectra" / f"spectrum-{tag}-{kind}-lanczos.npz"


def _cmd_spectrum(args: argparse.Namespace) -> list[str]:
    from nets.workflow.spectrum import compute_eigenspectrum

    if args.blocks is not None:
        return _cmd_block_spectra(args)
    _fill_from_checkpoint(args, args.checkpoint)
    out = Path(args.out) if args.out else _default_spectrum_path(args.checkpoint, args.curvature)
    from nets.workflow._resolve import eigvec_file

    # the Ritz vectors go beside the spectrum (without --save-eigvec an old file there is
    # deleted): both are outputs
    refuse_overwriting_inputs(
        [out, eigvec_file(out)], {"--checkpoint": args.checkpoint, "--state": args.state}
    )
    kwargs: dict[str, Any] = {
        "dataset": args.dataset,
        "data_path": args.data_path,
        "model": args.model,
        "checkpoint_path": args.checkpoint,
        "save_spectrum_path": str(out),
        "save_eigvec": args.save_eigvec,
        "lanczos_iters": args.iters,
        "curvature_matrix": args.curvature,
        "num_probes": args.probes,
        "bn_mode": args.bn_mode,
        "seed": args.seed,
        "device": args.device,
        "progress": args.progress,
        "fit": args.fit,
    }
    if args.subsample is not None:
        kwargs["subsample"] = args.subsample
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    if args.state is not None:
        kwargs["state_path"] = args.state
        kwargs["checkpoint_every"] = args.checkpoint_every
    start = time.perf_counter()
    compute_eigenspectrum(**kwargs)
    elapsed = time.perf_counter() - start
    written = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
    from nets.workflow.bulk import bulk_rows
    from spectral.io import load_npz

    rows = [*spectrum_rows(written), *bulk_rows(load_npz(written))]
    rows.append(("wall time (s)", f"{elapsed:.1f}"))
    return [format_table(rows, title="Spectrum summary")]


#: Options of ``spectrum`` that per-block spectra (``--blocks``) do not take.
_NOT_WITH_BLOCKS = (
    ("save_eigvec", "--save-eigvec", "keep no Ritz vectors"),
    ("fit", "--fit", "fit no bulk law"),
)


def _default_blocks_path(checkpoint: str, curvature: str, blocks: str) -> Path:
    """``<checkpoint dir>/spectra/blocks-<epoch>-<curvature>-<partition>.npz``.

    >>> str(_default_blocks_path("run/checkpoint-00002.pt", "GGN", "transformer:heads=4"))
    'run/spectra/blocks-00002-ggn-transformer-heads-4.npz'
    """
    spectrum = _default_spectrum_path(checkpoint, curvature)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", blocks).strip("-").lower() or "blocks"
    name = spectrum.name.replace("spectrum-", "blocks-", 1).replace("-lanczos.npz", f"-{tag}.npz")
    return spectrum.with_name(name)


def _block_state_files(state: str, out: Path) -> list[Path]:
    """The state files of ``spectrum --blocks --state DIR`` (``DIR/block-NNNNN.npz``) that
    ``out`` could name: those in ``DIR`` and the one of ``out``'s name.

    >>> [str(p) for p in _block_state_files("missing-dir", Path("elsewhere/block-00001.npz"))]
    ['missing-dir/block-00001.npz']
    """
    found = sorted(Path(state).glob("block-*.npz")) if Path(state).is_dir() else []
    if re.fullmatch(r"block-\d{5}\.npz", out.name):
        found.append(Path(state) / out.name)
    return found


def _cmd_block_spectra(args: argparse.Namespace) -> list[str]:
    """``spectrum --blocks``: per-block SLQ spectra (:func:`nets.compute_block_spectra`)."""
    from nets.workflow.block_spectra import compute_block_spectra

    for attr, flag, reason in _NOT_WITH_BLOCKS:
        if getattr(args, attr) not in (None, False):
            raise UsageError(
                f"Option {flag}: not available with --blocks (per-block spectra {reason}); "
                "leave it out"
            )
    _fill_from_checkpoint(args, args.checkpoint)
    out = (
        Path(args.out)
        if args.out
        else _default_blocks_path(args.checkpoint, args.curvature, args.blocks)
    )
    states = None if args.state is None else [args.state, *_block_state_files(args.state, out)]
    refuse_overwriting_inputs([out], {"--checkpoint": args.checkpoint, "--state": states})
    kwargs: dict[str, Any] = {
        "dataset": args.dataset,
        "data_path": args.data_path,
        "model": args.model,
        "checkpoint_path": args.checkpoint,
        "save_path": str(out),
        "blocks": args.blocks,
        "lanczos_iters": args.iters,
        "curvature_matrix": args.curvature,
        "num_probes": args.probes,
        "bn_mode": args.bn_mode,
        "subsample": args.subsample,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": args.device,
        "progress": args.progress,
        "state_path": args.state,
        "checkpoint_every": args.checkpoint_every,
    }
    start = time.perf_counter()
    try:
        result = compute_block_spectra(**kwargs)
    except (ValueError, TypeError) as exc:  # a head count that does not divide a projection
        raise UsageError(user_message(exc, {"num_heads": "--blocks"})) from exc
    elapsed = time.perf_counter() - start
    return block_tables(result.path or out, elapsed)


def block_tables(path: str | Path, elapsed: float | None = None) -> list[str]:
    """The per-block table (block, size, top eigenvalue, trace, negative mass) of a
    per-block spectra file, and a summary with the heterogeneity statistics."""
    from nets.workflow.block_spectra import load_block_spectra

    res = load_block_spectra(path)
    header = ["block", "size", "top eigenvalue", "trace", "negative mass"]
    body = [
        [label, _fmt(b.size), _fmt(b.top), _fmt(b.trace), _fmt(b.negative_mass)]
        for label, b in res.blocks.items()
    ]
    grid = format_grid(header, body, title=f"Per-block {res.curvature} spectra ({res.path})")
    stats = res.heterogeneity()
    samples = res.config.get("subsample")
    rows: list[Row] = [
        ("partition", res.partition),
        (
            "of the mean loss over",
            "the training set" if samples is None else f"{samples} training samples (--subsample)",
        ),
        ("parameters in the blocks", _fmt(res.num_params)),
        ("Lanczos iterations x probes", f"{res.lanczos_iters} x {res.num_probes}"),
        ("top eigenvalues span (decades)", _fmt(stats["top_spread"])),
        ("mean Jensen-Shannon distance", _fmt(stats["mean_js_distance"])),
    ]
    if elapsed is not None:
        rows.append(("wall time (s)", f"{elapsed:.1f}"))
    return [grid, format_table(rows, title="Block heterogeneity")]


def _approximation_names(approx: str) -> list[str]:
    """The proxy names of ``--approx`` (comma-separated), refused when empty or a low rank < 1."""
    names = [name.strip() for name in approx.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--approx: expected a comma-separated list of names, got {approx!r}")
    for name in names:  # low_rank's own error names its 'k', which is not compare's --k
        rank = re.fullmatch(r"low-rank-(\d+)(-diag)?", name.lower())
        if rank is not None and int(rank.group(1)) < 1:
            raise UsageError(
                f"Option --approx: expected low-rank-K with a rank K >= 1; received {name!r}."
            )
    return names


def _cmd_compare(args: argparse.Namespace) -> list[str]:
    """Grade curvature approximations against the exact curvature at a checkpoint."""
    import numpy as np

    from nets.workflow._resolve import (
        default_loss,
        make_eval_loader,
        preserve_global_state,
        resolve_data,
        resolve_model,
        resolve_parallel,
    )
    from nets.workflow.compare import compare_curvatures

    _fill_from_checkpoint(args, args.checkpoint)
    names = _approximation_names(args.approx)
    epoch = checkpoint_epoch(args.checkpoint)  # the run's config records no epoch
    out = (
        Path(args.out)
        if args.out
        else Path(args.checkpoint).parent / f"compare-{int(epoch):05d}-{args.curvature}.npz"
    )
    figure = figure_beside(out)
    refuse_overwriting_inputs([out, figure], {"--checkpoint": args.checkpoint})
    start = time.perf_counter()
    with preserve_global_state():
        data = resolve_data(args.dataset, args.data_path, seed=args.seed)
        _, device = resolve_parallel(False, args.device)
        resolved = resolve_model(
            args.model, args.checkpoint, data, device=device, seed=args.seed, copy_module=False
        )
        loader = make_eval_loader(
            data.train, args.batch_size, subsample=args.subsample, seed=args.seed
        )
        try:
            reports = compare_curvatures(
                resolved.model,
                default_loss(None, data.task),
                loader,
                approximations=names,
                exact=args.curvature,
                bn_mode=args.bn_mode,
                k=args.k,
                num_iters=args.iters,
                solve_tol=args.solve_tol,
                seed=args.seed,
                save_path=out,
                figure_path=figure,
                provenance={
                    "checkpoint": str(args.checkpoint),
                    "model": resolved.name,
                    "dataset": data.name,
                    "data_path": args.data_path,
                    "subsample": args.subsample,
                    "batch_size": args.batch_size,
                },
            )
        except ValueError as exc:  # curvops names a proxy name its 'spec'
            if not str(exc).startswith("Argument 'spec'"):
                raise
            raise UsageError(user_message(exc, {"spec": "--approx"})) from exc
    elapsed = time.perf_counter() - start
    header = ["proxy", "W1", "top-1 rel. err", "max angle (rad)", "trace rel. err",
              "Newton step rel. err", "products"]  # fmt: skip
    body = [
        [
            name,
            _fmt(float(r.wasserstein)),
            _fmt(float(np.abs(r.top_eigenvalue_errors[0])))
            if r.top_eigenvalue_errors.size
            else "-",
            _fmt(float(np.max(r.principal_angles))) if r.principal_angles.size else "-",
            _fmt(float(r.trace_error)),
            _fmt(float(r.newton_step_error)),
            _fmt(int(r.products_exact) + int(r.products_approximation)),
        ]
        for name, r in reports.items()
    ]
    title = f"Approximations against the exact {args.curvature} ({out}, {elapsed:.1f} s)"
    return [format_grid(header, body, title=title)]


def _checkpoint_list(items: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("checkpoint-*.pt"))
            if not found:
                raise UsageError(f"{STATS_INPUT}: no checkpoint-*.pt files in '{p}'")
            paths += [str(f) for f in found]
        else:
            paths.append(str(p))
    return paths


_STATS_COLUMNS = (
    ("epoch", "epoch"),
    ("loss_mean", "loss (1)"),
    ("train_loss", "train loss (2)"),
    ("grad_mean_norm_sq", "|E g|^2"),
    ("grad_var", "Var g"),
    ("hess_mean_norm_sq", "|E H|^2"),
    ("hess_var", "Var H"),
    ("weight_norm_l2", "|w|_2"),
    ("test_loss", "test loss (3)"),
    ("test_acc", "test acc (3)"),
)


#: How errors name the positional argument of ``stats`` (its metavar in the usage line).
STATS_INPUT = "Argument CHECKPOINTS"


#: The start of the library's message for a ``subsample`` count larger than a split.
_SUBSAMPLE_COUNT = "Argument 'subsample': expected a sample count between 1 and "


def _subsample_bound(args: argparse.Namespace, exc: ValueError) -> UsageError | None:
    """For ``stats`` and ``landscape``, which draw ``--subsample`` N samples from the
    training *and* the test split: the error of an N larger than one of them, saying that
    the bound is the smaller split's size and giving both (the library checks one split
    at a time, so its bound alone looked arbitrary). ``None`` for any other error."""
    if not isinstance(args.subsample, int) or not str(exc).startswith(_SUBSAMPLE_COUNT):
        return None
    from nets.workflow._resolve import resolve_data

    data = resolve_data(args.dataset, args.data_path, seed=args.seed)
    train = len(data.train)  # type: ignore[arg-type]
    if data.test is None:  # only the training split is drawn from
        why = f"the size of the training split; {args.command} has no test split here"
        bound = train
    else:
        test = len(data.test)  # type: ignore[arg-type]
        bound = min(train, test)
        why = (
            f"the smaller of the train ({train}) and test ({test}) splits, since "
            f"{args.command} draws N samples from each"
        )
    return UsageError(
        f"Option --subsample: expected a sample count N between 1 and {bound} ({why}); "
        f"received {args.subsample}."
    )


def _cmd_stats(args: argparse.Namespace) -> list[str]:
    import numpy as np

    from nets.workflow.loss_stats import compute_loss_stats
    from spectral.io import load_npz

    checkpoints = _checkpoint_list(args.checkpoints)
    _fill_from_checkpoint(args, checkpoints[0], STATS_INPUT)
    out = Path(args.out) if args.out else Path(checkpoints[0]).parent / "loss-stats.npz"
    refuse_overwriting_inputs([out], {"CHECKPOINTS": checkpoints})
    kwargs: dict[str, Any] = {
        "dataset": args.dataset,
        "data_path": args.data_path,
        "model": args.model,
        "checkpoint_path": checkpoints if len(checkpoints) > 1 else checkpoints[0],
        "save_path": str(out),
        "curvature_matrix": args.curvature,
        "seed": args.seed,
        "device": args.device,
        "progress": args.progress,
    }
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    if args.subsample is not None:
        kwargs["subsample"] = args.subsample
    kwargs["bn_mode"] = args.bn_mode
    try:
        compute_loss_stats(**kwargs)
    except (ValueError, TypeError, OSError) as exc:  # its checkpoint_path is CHECKPOINTS
        bound = _subsample_bound(args, exc) if isinstance(exc, ValueError) else None
        raise (bound or UsageError(user_message(exc, {"checkpoint_path": STATS_INPUT}))) from exc
    arrays = load_npz(out if out.suffix == ".npz" else out.with_name(out.name + ".npz"))
    config = json.loads(str(arrays["config_json"])) if "config_json" in arrays else {}
    definitions = config.get("definitions") or {}
    present = [
        (k, h)
        for k, h in _STATS_COLUMNS
        if k in arrays and not (k == "test_acc" and bool(np.all(np.isnan(arrays[k]))))
    ]  # no accuracy column for a language model (NaN: its targets are not class labels)
    count = int(max((arrays[k].size for k, _ in present), default=0))
    body = [
        [_fmt(arrays[k].ravel()[i].item()) if arrays[k].size > i else "-" for k, _ in present]
        for i in range(count)
    ]
    notes = [
        f"({i}) {definitions[key]}"
        for i, key in ((1, "loss_mean"), (2, "train_loss"), (3, "test_loss"))
        if key in definitions
    ]
    grid = format_grid([h for _, h in present], body, title=f"Loss statistics ({out})")
    return ["\n".join([grid, *notes])]


def _cmd_landscape(args: argparse.Namespace) -> list[str]:
    from nets.workflow.landscape import build_loss_landscape
    from spectral.io import load_npz

    _fill_from_checkpoint(args, args.checkpoint)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "landscape.npz"
    spectrum = None if args.spectrum is None else [args.spectrum, eigvec_input(args.spectrum)]
    refuse_overwriting_inputs([out], {"--checkpoint": args.checkpoint, "--spectrum": spectrum})
    kwargs: dict[str, Any] = {
        "dataset": args.dataset,
        "data_path": args.data_path,
        "model": args.model,
        "dist": args.dist,
        "n_points": args.n_points,
        "spectrum_path": args.spectrum,
        "checkpoint_path": args.checkpoint,
        "save_path": str(out),
        "seed": args.seed,
        "device": args.device,
        "progress": args.progress,
    }
    if args.directions is not None:
        kwargs["directions"] = args.directions
    if args.planes is not None:
        kwargs["planes"] = True if args.planes == ["auto"] else args.planes
    for attr in ("num_directions", "random_directions", "filter_normalised", "batch_size"):
        if getattr(args, attr) is not None:
            kwargs[attr] = getattr(args, attr)
    if args.subsample is not None:
        kwargs["subsample"] = args.subsample
    if args.refresh_bn:
        kwargs["refresh_bn"] = True
    start = time.perf_counter()
    try:
        build_loss_landscape(**kwargs)
    except ValueError as exc:
        bound = _subsample_bound(args, exc)
        if bound is None:
            raise
        raise bound from exc
    elapsed = time.perf_counter() - start
    written = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
    arrays = load_npz(written)
    names = [str(n) for n in arrays.get("direction_names", [])]
    t = arrays["t"]
    mid = int(abs(t).argmin())
    header = [
        "direction",
        "theta",
        "train loss (1) at t=0",
        f"at t={t[0]:g}",
        f"at t={t[-1]:g}",
    ]
    body = []
    values = arrays.get("direction_values")
    for i, name in enumerate(names):
        theta = float(values[i]) if values is not None and values.size > i else float("nan")
        row = arrays["train_loss"][i]
        body.append(
            [name, _fmt(theta), _fmt(float(row[mid])), _fmt(float(row[0])), _fmt(float(row[-1]))]
        )
    config = json.loads(str(arrays["config_json"])) if "config_json" in arrays else {}
    definition = (config.get("definitions") or {}).get("train_loss")
    norms = sorted(set((config.get("direction_normalisation") or {}).values()))
    notes = [] if definition is None else [f"(1) {definition}"]
    if norms:
        notes.append(f"directions: {', '.join(norms)}; t is in these units")
    grid = format_grid(header, body, title=f"Loss landscape ({written})")
    tables = ["\n".join([grid, *notes])]
    tables.append(format_table([("wall time (s)", f"{elapsed:.1f}")]))
    return tables


#: How errors name the positional argument of ``plot`` (its metavar in the usage line).
PLOT_INPUT = "Argument INPUTS"

#: The library's names of the file that ``plot``'s INPUTS gives.
_PLOT_INPUT_NAMES = ("path", "kind_or_path", "source", "path_or_rows", "path_or_dir")

_SPECTRUM_FILE = "a spectrum .npz written by compute_eigenspectrum (the spectrum command)"
_DIAGONAL_FILE = "a curvature diagonal .npz with a 'diagonal' array (as the demo writes)"

#: What each kind of ``plot`` reads: a file of ``.npz`` arrays or of JSON (a run's).
PLOT_EXPECTS: dict[str, tuple[str, str]] = {
    "spectrum": ("npz", _SPECTRUM_FILE),
    "band": ("npz", _SPECTRUM_FILE),
    "diag": ("npz", _DIAGONAL_FILE),
    "blocks": (
        "npz",
        "a per-block spectra .npz written by compute_block_spectra (spectrum --blocks)",
    ),
    "landscape": (
        "npz",
        "a landscape .npz written by build_loss_landscape (the landscape command)",
    ),
    "training": ("json", "a run directory or its stats.json (written by the train command)"),
    "tracking": (
        "json",
        "a run directory, its curvature.jsonl or stats.json (train --track-curvature)",
    ),
}

#: The content descriptions of :func:`describe_file` that a kind of ``plot`` reads.
_NPZ_CONTENT = "an .npz archive"
_TEXT_CONTENTS = ("a JSON file", "a JSON-lines file", "a text file")


def describe_file(path: str | Path) -> str:
    """What ``path`` holds, judged by its content (its suffix only tells JSON lines).

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "stats.json").write_text('{"epochs": []}')
    >>> describe_file(folder / "stats.json"), describe_file(folder)
    ('a JSON file', 'a directory')
    """
    import zipfile

    p = Path(path)
    if p.is_dir():
        return "a directory"
    try:
        with p.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return "a file that cannot be read"
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a .npy array (not an .npz archive of several)"
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
        if any(name.endswith("data.pkl") for name in names):
            return "a PyTorch checkpoint (torch.save)"
        if names and all(name.endswith(".npy") for name in names):
            return _NPZ_CONTENT
        return "a zip archive other than an .npz"
    if head.startswith(b"\x80"):
        return "a pickle file"
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:
        return "a binary file"
    if text[:1] in ("{", "["):
        return "a JSON-lines file" if p.suffix.lower() == ".jsonl" else "a JSON file"
    return "a text file"


def check_plot_input(path: str | None, what: str, name: str) -> None:
    """Refuse, naming ``name`` (the argument or option), a file of another kind than
    ``plot what`` reads (:data:`PLOT_EXPECTS`): say what was expected and what was
    received.  A missing file is left to the plot (its message names both candidates).
    """
    if path is None:
        return
    form, expected = PLOT_EXPECTS[what]
    p = Path(path)
    if form == "json":
        if p.is_dir() or not p.exists():
            return
        found = describe_file(p)
        if found in _TEXT_CONTENTS:
            return
    else:
        candidates = [q for q in _npz_forms(p) if q.is_file()]
        if not candidates and not p.is_dir():
            return
        found = describe_file(candidates[0] if candidates else p)
        if found == _NPZ_CONTENT:
            return
    raise UsageError(f"{name}: expected {expected}; received '{path}', {found}.")


def _check_plot_inputs(args: argparse.Namespace, source: str | None) -> None:
    """:func:`check_plot_input` on INPUTS, or on the files of ``plot comparison``."""
    if args.what != "comparison":
        check_plot_input(source, args.what, PLOT_INPUT)
        return
    for option, what in (("hessian", "spectrum"), ("ggn", "spectrum"), ("diagonal", "diag")):
        check_plot_input(getattr(args, option), what, f"Option --{option}")


def _run_files_of(source: str | None, what: str) -> list[Path]:
    """The files of the run that ``plot training``/``plot tracking`` reads (the run
    directory given, or the one of the file given): ``stats.json``, ``curvature.jsonl``,
    density snapshots, checkpoints; none for the other kinds."""
    if source is None or what not in ("training", "tracking"):
        return []
    from nets.training import run_files

    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    return run_files(folder)


#: The suffixes of the data files that a default figure is named after: removed (the
#: first that ends the name), every other dot kept (``lr0.1.npz`` -> ``lr0.1.png``).
_DATA_SUFFIXES = (".npz", ".jsonl", ".json", ".pt")

#: The kinds of ``plot`` that read the files of another kind (band: a spectrum's;
#: tracking: a run's ``stats.json``, as training does): their default figure adds the
#: kind to the name, so that both figures of one file are kept.
_FIGURE_TAGS = {"band": "-band", "tracking": "-tracking"}


def figure_beside(path: str | Path, tag: str = "") -> Path:
    """The figure named after the data file ``path``: its name without a data suffix
    (:data:`_DATA_SUFFIXES`; other dots are part of the name), then ``tag``, then ``.png``.

    >>> str(figure_beside("runs/lr0.1")), str(figure_beside("runs/lr0.1.npz", "-band"))
    ('runs/lr0.1.png', 'runs/lr0.1-band.png')
    >>> str(figure_beside("compare-00010-ggn.npz")), str(figure_beside("report.png"))
    ('compare-00010-ggn.png', 'report.png.png')
    """
    p = Path(path)
    name = p.name
    for suffix in _DATA_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(f"{name}{tag}.png")


def default_figure(source: str | None, what: str) -> str:
    """Where ``plot what`` writes its figure without ``--out``: beside the input, named
    after it (:func:`figure_beside`, with ``-band``/``-tracking`` for the kinds that read
    another kind's file), ``<dir>/training.png`` or ``<dir>/curvature.png`` for a run
    directory, ``comparison.png`` (here) for ``plot comparison``.

    >>> default_figure("s/lr0.1", "spectrum"), default_figure("s/lr0.1.npz", "band")
    ('s/lr0.1.png', 's/lr0.1-band.png')
    >>> default_figure(None, "comparison")
    'comparison.png'
    """
    if source is None:
        return "comparison.png"
    base = Path(source)
    if base.is_dir():
        return str(base / ("curvature.png" if what == "tracking" else "training.png"))
    return str(figure_beside(base, _FIGURE_TAGS.get(what, "")))


def _draw(args: argparse.Namespace, source: str | None, out: str) -> Any:
    """The figure of ``plot``, saved to ``out``."""
    from nets.plots import (
        plot_loss_landscape,
        plot_spectrum,
        plot_spectrum_comparison,
        plot_training,
    )

    if args.what == "spectrum":
        return plot_spectrum(
            "lanczos",
            path=source,
            log_weights=args.log_weights,
            smooth=args.smooth,
            save_path=out,
        )
    if args.what == "diag":
        return plot_spectrum("diag", path=source, log_weights=args.log_weights, save_path=out)
    if args.what == "blocks":
        from nets.plots.blocks import plot_block_spectra

        sigma = 0.1 if args.smooth is None else args.smooth
        return plot_block_spectra(source, sigma=sigma, save_path=out)
    if args.what == "band":
        from nets.plots.band import plot_spectrum_band

        return plot_spectrum_band(source, confidence=args.confidence, save_path=out)
    if args.what == "training":
        return plot_training(source, save_path=out)
    if args.what == "tracking":
        from nets.plots.tracking import plot_curvature_tracking

        return plot_curvature_tracking(source, save_path=out)
    if args.what == "landscape":
        return plot_loss_landscape(source, metric=args.metric, save_path=out)
    if args.diagonal is None:
        raise UsageError("'plot comparison' needs --diagonal")
    return plot_spectrum_comparison(
        args.hessian, args.ggn, args.diagonal, log_scale=not args.linear, save_path=out
    )


def _cmd_plot(args: argparse.Namespace) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from nets.plots._figure import close_figure

    source = args.inputs[0] if args.inputs else None
    if args.what != "comparison" and (source is None or len(args.inputs) != 1):
        raise UsageError(f"'plot {args.what}' takes exactly one input file")
    out = args.out if args.out is not None else default_figure(source, args.what)
    refuse_overwriting_inputs(
        [out],
        {
            "INPUTS": args.inputs,
            "--hessian": args.hessian,
            "--ggn": args.ggn,
            "--diagonal": args.diagonal,
            "INPUTS (a file of its run)": _run_files_of(source, args.what),
        },
    )
    _check_plot_inputs(args, source)
    replaced = args.out is None and Path(out).exists()
    names = {} if args.what == "comparison" else dict.fromkeys(_PLOT_INPUT_NAMES, PLOT_INPUT)
    try:
        fig = _draw(args, source, out)
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(user_message(exc, names)) from exc
    close_figure(fig)
    rows: list[Row] = [("figure", out)]
    if replaced:
        rows.append(("replaced", "an existing file of that name (--out names another)"))
    if args.what in ("spectrum", "band") and source is not None:
        rows = spectrum_rows(source) + rows
    if args.what == "blocks" and source is not None:
        return [*block_tables(source), format_table(rows, title="Plot")]
    return [format_table(rows, title="Plot")]


def _cmd_demo(args: argparse.Namespace) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # the demo only writes files
    from nets.demo import run_demo

    summary = run_demo(
        args.out,
        epochs=args.epochs,
        lanczos_iters=args.lanczos_iters,
        quick=args.quick,
        exact_diagonal=args.exact_diagonal,
        seed=args.seed,
        device=args.device,
        progress=args.progress,
        model=args.model,
        overwrite=args.overwrite,
    )
    tables = [format_table(rows, title=title) for title, rows in summary.sections]
    tables.append(f"Results are in '{summary.out_dir}' ({summary.total_time:.0f} s).")
    return tables


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> Any:  # argparse's signature is NoReturn
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` only for meaningful defaults not already named in the help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        flag = action.nargs == 0  # store_true / store_false: the default says nothing useful
        if flag or "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def _add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    """``train``'s ``--lr``, ``--momentum``, ``--weight-decay`` and ``--opt``."""
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="initial learning rate (default: the optimizer's own: SGD, Adam and SWATS "
        "0.001, LancGN/LancHess 1.0, KFAC/EKFAC 0.01; with --resume, the run's)",
    )
    p.add_argument(
        "--momentum",
        type=float,
        default=None,
        help="momentum, for optimizers that take one (SGD, KFAC, EKFAC; default: the "
        "optimizer's own: SGD 0, KFAC/EKFAC 0.9; with --resume, the run's)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay (default: the optimizer's own: 0 for every optimizer listed; "
        "with --resume, the run's)",
    )
    p.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="any other keyword of the optimizer's constructor, repeatable; VALUE is read "
        "as JSON when it parses (numbers, true/false, lists), else as a string: "
        "--opt damping=10 --opt lanczos_iters=5, --opt nesterov=true, --opt betas=[0.9,0.99]. "
        "An option the optimizer does not take is an error. With --resume, the run's "
        "options are kept; one given here must equal the run's.",
    )


def _add_train_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``train`` subcommand and its options."""
    p = sub.add_parser(
        "train",
        help="train a network, saving checkpoints and stats.json",
        formatter_class=fmt,
        description="Train a model; writes checkpoint-XXXXX.pt and stats.json into --dir.",
    )
    p.add_argument("--dir", required=True, help="output directory of the run")
    _add_common(p, train=True)
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs in all, those before --resume too (default: 10; with --resume, the run's)",
    )
    p.add_argument(
        "--optimizer",
        default=None,
        help=f"{', '.join(OPTIMIZERS)}, or any other torch.optim class name (default: SGD; "
        "with --resume, the run's)",
    )
    _add_optimizer_flags(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="minibatch size (default: 128; with --resume, the run's)",
    )
    p.add_argument(
        "--subsample",
        type=_count_or_fraction,
        default=None,
        help="train on only this many (or this fraction of) training samples, drawn with "
        "--seed; the test set stays whole (default: the whole training set; with --resume, "
        "the run's)",
    )
    p.add_argument(
        "--schedule",
        default=None,
        help="learning-rate schedule (linear: Eq. 8; default: linear; with --resume, the run's)",
    )
    p.add_argument(
        "--save-freq",
        type=int,
        default=None,
        help="checkpoint every N epochs, besides the initial and final ones (0: only those; "
        "default: 25; with --resume, the run's)",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint to resume from: the run continues with its recorded settings (a "
        "flag left out takes the run's value; a flag given must equal it, except --save-freq "
        "and --epochs when the epochs already trained keep their learning rates)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the files of a run already in --dir and start anew (without it, "
        "such a --dir is refused unless --resume continues that run)",
    )
    p.add_argument(
        "--track-curvature",
        default=None,
        metavar="KEY=VALUE,...",
        help="track the curvature during training (nets.CurvatureTracker), e.g. "
        "every=50,top_k=3,trace_probes=8; other keys: kind, seed, tol, samples (size of "
        "the measurement set, default 256), density_every, density_iters, density_probes, "
        "bn_mode; rows go to <dir>/curvature.jsonl and stats.json",
    )
    p.set_defaults(handler=_cmd_train)


def _add_spectrum_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``spectrum`` subcommand and its options."""
    p = sub.add_parser(
        "spectrum",
        help="Lanczos spectrum of the Hessian/GGN at a checkpoint",
        formatter_class=fmt,
        description="Run Lanczos on the curvature of the mean training loss at a "
        "checkpoint and save Ritz values, weights and the trace estimate (.npz).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint-XXXXX.pt")
    _add_common(p)
    p.add_argument("--curvature", default="hessian", help="hessian, ggn or fisher")
    p.add_argument("--iters", type=int, default=20, help="Lanczos iterations m")
    p.add_argument("--probes", type=int, default=1, help="random probe vectors")
    p.add_argument(
        "--bn-mode",
        default="train",
        choices=("train", "eval"),
        help="BatchNorm statistics used in curvature products",
    )
    p.add_argument(
        "--subsample",
        type=_count_or_fraction,
        default=None,
        help="use only this many (or this fraction of) training samples, drawn with --seed "
        "(default: the whole training set)",
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="batch size of the curvature products"
    )
    p.add_argument("--save-eigvec", action="store_true", help="also save the Ritz vectors")
    p.add_argument(
        "--fit",
        default=None,
        choices=("mp", "semicircle"),
        help="fit a random-matrix law to the bulk and list the outliers (bulk + outliers)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="spectrum file (default: <checkpoint dir>/spectra/spectrum-<epoch>-"
        "<curvature>-lanczos.npz)",
    )
    p.add_argument(
        "--state",
        default=None,
        help="resumable state file (with --blocks: a directory of one state file per "
        "block): rerun the same command after an interruption to resume",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="save the Lanczos state every N iterations (with --state)",
    )
    p.add_argument(
        "--blocks",
        default=None,
        metavar="PARTITION",
        help="one SLQ spectrum per diagonal block instead (block heterogeneity): layers, "
        "transformer (embeddings, norms, Q/K/V, attention output, MLPs) or "
        "transformer:heads=N (Q/K/V per head); --out defaults to <checkpoint dir>/spectra/"
        "blocks-<epoch>-<curvature>-<partition>.npz; a table per block is printed",
    )
    p.set_defaults(handler=_cmd_spectrum)


def _add_stats_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``stats`` subcommand and its options."""
    p = sub.add_parser(
        "stats",
        help="loss statistics (gradient/Hessian moments) of checkpoints",
        formatter_class=fmt,
        description="Gradient and curvature moments, weight norms and losses of "
        "one or several checkpoints (a directory means all its checkpoints).",
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINTS", help="checkpoint files or run directories"
    )
    _add_common(p)
    p.add_argument(
        "--curvature", default="hessian", help="hessian or ggn for the curvature moments"
    )
    p.add_argument(
        "--bn-mode",
        default="train",
        choices=("train", "eval"),
        help="BatchNorm statistics of the minibatch moments (train: each minibatch's own, "
        "as in the paper); the train/test losses always use eval mode",
    )
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size of the moments")
    p.add_argument(
        "--subsample",
        type=_count_or_fraction,
        default=None,
        help="use only this many (or this fraction of) samples, drawn with --seed, from the "
        "training set AND (as many, or the same fraction) from the test set "
        "(default: both whole)",
    )
    p.add_argument("--out", default=None, help="statistics file (default <dir>/loss-stats.npz)")
    p.set_defaults(handler=_cmd_stats)


def _add_landscape_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``landscape`` subcommand and its options."""
    p = sub.add_parser(
        "landscape",
        help="loss along Ritz vectors and random directions",
        formatter_class=fmt,
        description="Train/test loss and accuracy at --n-points perturbations "
        "in [-dist, dist] along the Ritz vectors of a saved spectrum (saved with "
        "--save-eigvec) and control directions.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint-XXXXX.pt")
    p.add_argument("--spectrum", default=None, help="spectrum file with Ritz vectors beside it")
    _add_common(p)
    p.add_argument("--dist", type=float, default=1.0, help="largest perturbation")
    p.add_argument("--n-points", type=int, default=21, help="points per direction")
    p.add_argument(
        "--directions",
        nargs="+",
        default=None,
        help="Ritz directions, e.g. ritz-top ritz-bottom ritz-min-abs ritz-top-3 "
        "(default: ritz-top with a spectrum)",
    )
    p.add_argument(
        "--num-directions",
        type=int,
        default=2,
        help="how many Ritz vectors each of --directions takes",
    )
    p.add_argument(
        "--random-directions",
        type=int,
        default=0,
        help="number of random directions of unit Euclidean norm (a control)",
    )
    p.add_argument(
        "--filter-normalised",
        type=int,
        default=0,
        help="number of filter-normalised random directions (Li et al. 2017)",
    )
    p.add_argument(
        "--planes",
        nargs="+",
        default=None,
        help="2-D planes 'a|b' of direction names, or 'auto' for the first two",
    )
    p.add_argument(
        "--refresh-bn",
        action="store_true",
        help="recompute BatchNorm running statistics at each perturbed point",
    )
    p.add_argument(
        "--subsample",
        type=_count_or_fraction,
        default=None,
        help="use only this many (or this fraction of) samples, drawn with --seed, from the "
        "training set AND (as many, or the same fraction) from the test set "
        "(default: both whole)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--out", default=None, help="landscape file (default <dir>/landscape.npz)")
    p.set_defaults(handler=_cmd_landscape)


def _add_compare_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``compare`` subcommand and its options."""
    p = sub.add_parser(
        "compare",
        help="grade curvature approximations (K-FAC, diagonals, low rank) against the truth",
        formatter_class=fmt,
        description="Build each approximation of the curvature at a checkpoint and compare it "
        "with the exact operator: W1 distance of the spectral densities, top eigenvalues, "
        "principal angles, quadratic forms, Newton step, trace and log-determinant (.npz and "
        "a figure with every spectrum in one unit).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint-XXXXX.pt")
    _add_common(p)
    p.add_argument(
        "--approx",
        default="kfac,ekfac,diag-ggn,diag-mc,low-rank-20",
        help="comma-separated approximations: kfac, ekfac, diag-ggn, diag-mc, diag-ef, "
        "diag-hutchinson, low-rank-K, blocks (see curvops.proxies.make_proxy)",
    )
    p.add_argument("--curvature", default="ggn", help="the exact curvature: ggn, hessian or fisher")
    p.add_argument(
        "--iters", type=int, default=50, help="Lanczos iterations m of the SLQ densities"
    )
    p.add_argument("--k", type=int, default=10, help="top eigenpairs compared")
    p.add_argument(
        "--solve-tol",
        type=float,
        default=None,
        help="relative residual of the Newton-step solves (default: sqrt(eps) of the model's "
        "dtype, 1.5e-8 in float64, 3.5e-4 in float32)",
    )
    p.add_argument(
        "--bn-mode",
        default="eval",
        choices=("train", "eval"),
        help="BatchNorm statistics used in curvature products",
    )
    p.add_argument(
        "--subsample",
        type=_count_or_fraction,
        default=None,
        help="use only this many (or this fraction of) training samples, drawn with --seed "
        "(default: the whole training set)",
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="batch size of the curvature products"
    )
    p.add_argument(
        "--out",
        default=None,
        help="report file (default: <checkpoint dir>/compare-<epoch>-<curvature>.npz); the "
        "figure goes beside it, named with .png in place of a final .npz (other dots kept)",
    )
    p.set_defaults(handler=_cmd_compare)


def _add_plot_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``plot`` subcommand and its options."""
    p = sub.add_parser(
        "plot",
        help="figures from saved files (PNG/PDF)",
        formatter_class=fmt,
        description="Draw a saved spectrum (band: with its confidence band and bulk fit), "
        "per-block spectra (blocks: spectrum --blocks), diagonal, training run, landscape, or "
        "the Lanczos-versus-diagonal comparison (the paper's Figure 2).",
    )
    p.add_argument(
        "what",
        choices=(
            "spectrum",
            "band",
            "diag",
            "blocks",
            "training",
            "tracking",
            "landscape",
            "comparison",
        ),
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUTS",
        help="the file (or run directory for 'training' and 'tracking': curvature during "
        "training, with the 2/lr edge of stability)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="figure file, .png or .pdf (default: beside the input, its name with .png in "
        "place of a final .npz/.json/.jsonl, other dots kept: lr0.1.npz -> lr0.1.png; band "
        "and tracking add -band/-tracking, so that the spectrum's and training's figures of "
        "the same file are kept; a run directory: <dir>/training.png or "
        "<dir>/curvature.png; comparison: comparison.png)",
    )
    p.add_argument(
        "--linear-weights",
        dest="log_weights",
        action="store_false",
        help="spectrum/diag: linear weight axis (default: logarithmic, so that outliers of "
        "weight ~1/P stay visible)",
    )
    p.add_argument(
        "--log-weights",
        dest="log_weights",
        action="store_true",
        help="logarithmic weight axis (the default; kept for old scripts)",
    )
    p.add_argument(
        "--smooth",
        type=float,
        default=None,
        help="spectrum: also draw the density smoothed with kernel width sigma (GGN/Fisher: "
        "a Gaussian kernel reflected at 0, so no mass below 0); blocks: the kernel width "
        "in decades of the symmetric log axis (default 0.1)",
    )
    p.add_argument(
        "--metric", default="loss", choices=("loss", "acc", "both"), help="landscape: what to draw"
    )
    p.add_argument("--hessian", default=None, help="comparison: Hessian spectrum file")
    p.add_argument("--ggn", default=None, help="comparison: GGN spectrum file")
    p.add_argument("--diagonal", default=None, help="comparison: GGN diagonal .npz (required)")
    p.add_argument("--linear", action="store_true", help="comparison: linear vertical axis")
    p.add_argument(
        "--confidence", type=float, default=0.95, help="band: confidence of the shaded band"
    )
    p.set_defaults(handler=_cmd_plot)


def _add_demo_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``demo`` subcommand and its options."""
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded digits data",
        formatter_class=fmt,
        description="Train a small BatchNorm CNN on digits (or gpt-tiny on text with --model "
        "gpt-tiny), compute Hessian and GGN spectra (over the full training set; gpt-tiny: "
        "64 training sequences, 16 with --quick), compare with the diagonal GGN (SmallCNN), "
        "build the loss landscape along the top eigenvectors, and write everything "
        "(checkpoints, .npz, PNG) under --out.",
    )
    p.add_argument(
        "--out",
        default="results",
        help="output directory: new, or one a demo wrote before (a directory holding another "
        "training run is refused unless --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a training run found in --out (its checkpoints are deleted)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (default 10, 2 with --quick; gpt-tiny: 1)",
    )
    p.add_argument(
        "--lanczos-iters",
        type=int,
        default=None,
        help="Lanczos iterations (default 50, 8 with --quick; gpt-tiny: 12, 4 with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    p.add_argument("--model", default="SmallCNN", help="SmallCNN (digits) or gpt-tiny (text, Adam)")
    p.add_argument(
        "--exact-diagonal",
        action="store_true",
        help="also compute the exact GGN diagonal (slow: N*C vector-Jacobian products)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:0, ...")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )
    p.set_defaults(handler=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``curvature`` with its six subcommands."""
    parser = _Parser(
        prog="curvature",
        description="Curvature spectra, loss statistics and loss landscapes of neural networks "
        "(Deep Curvature Suite).",
        epilog="Run 'curvature demo --out results' for the whole pipeline on the embedded "
        "digits data.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_train_parser,
        _add_spectrum_parser,
        _add_stats_parser,
        _add_landscape_parser,
        _add_compare_parser,
        _add_plot_parser,
        _add_demo_parser,
    ):
        add(sub, _HelpFormatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvature`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], list[str]] = args.handler
    try:
        tables = handler(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print(
            f"curvature {args.command}: interrupted (a training run continues from its last "
            "checkpoint with --resume, a computation with --state from its state file)",
            file=sys.stderr,
        )
        return 130
    except (UsageError, ValueError, TypeError, OSError, ImportError) as exc:
        message = user_message(exc, _COMMAND_FLAGS.get(args.command))
        print(f"curvature {args.command}: error: {message}", file=sys.stderr)
        return 2
    except ArithmeticError as exc:  # NumericalError: a diverging run, a NaN in a product
        print(f"curvature {args.command}: numerical failure: {exc}", file=sys.stderr)
        return 1
    for table in tables:
        _emit(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
