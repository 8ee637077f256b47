"""The Lanczos spectrum of a network's curvature on several processes with torch.distributed.
==================================================================================================

Each process takes every W-th batch of the training set; the curvature products
are summed over the processes with one ``all_reduce`` each, every process runs
the same Lanczos recurrence and only rank 0 writes ``<out>/spectrum.npz``.  The
same script runs as a single process (identical file, up to rounding)::

    python examples/distributed_spectrum.py --out results/ddp            # one process
    torchrun --standalone --nproc_per_node=2 examples/distributed_spectrum.py --out results/ddp
    torchrun --standalone --nproc_per_node=4 examples/distributed_spectrum.py \\
        --checkpoint runs/vgg/checkpoint-00100.pt --dataset CIFAR100 --data-path data \\
        --curvature ggn --lanczos-iters 100 --out results/vgg-ggn   # one node, 4 GPUs (NCCL)

``--all`` also writes ``loss-stats.npz`` (:func:`nets.compute_loss_stats`),
``landscape.npz`` (:func:`nets.build_loss_landscape` along the top Ritz vector and
a random direction) and ``blocks.npz`` (:func:`nets.compute_block_spectra`, one SLQ
spectrum per layer), each computed on the shards and written by rank 0 only.
Without ``--checkpoint`` a small tanh MLP (``--hidden`` units) or a BatchNorm
``SmallCNN`` (``--widths``), seeded, on the embedded digits data is analysed.
Backend: NCCL when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``),
Gloo on CPUs (``--backend`` overrides).

Time (``time python examples/distributed_spectrum.py``, one process, default settings,
on 2 cores shared with other jobs at load average 8-12): 43 s of CPU time (user + sys),
413 s wall.

This example is shown but not executed when the documentation is built (it needs a
launcher). Two CPU processes with Gloo on a 2-core machine (tanh MLP on digits, quick
settings) printed::

    $ OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 \\
          examples/distributed_spectrum.py --quick --out ddp
    rank 1: done (rank 0 writes)
    2 process(es), P = 460, 0.3 s: top 3.95205, bottom -1.92342, trace 0.438961 -> ddp/spectrum.npz

and the same command without ``torchrun`` (one process) writes the same file up to the
order of floating-point summation (``tests/nets/test_torchrun_spectrum.py`` checks it).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from curvops.distributed import get_rank, get_world_size, init_from_env, is_main_process
from nets.data import load_dataset
from nets.models import get_model
from nets.plots import spectrum_summary
from nets.workflow import (
    SpectrumResult,
    build_loss_landscape,
    compute_block_spectra,
    compute_eigenspectrum,
    compute_loss_stats,
)


def parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--out", default="results/distributed", help="output directory")
    cli.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    cli.add_argument("--dataset", default="digits")
    cli.add_argument("--data-path", default=None)
    cli.add_argument("--checkpoint", default=None, help="analyse this checkpoint")
    cli.add_argument("--model", default="MLP", choices=["MLP", "SmallCNN"], help="no checkpoint")
    cli.add_argument("--hidden", type=int, default=32, help="MLP width")
    cli.add_argument("--widths", type=int, nargs=2, default=(8, 16), help="SmallCNN widths")
    cli.add_argument("--curvature", default="hessian", help="hessian, ggn, fisher, ...")
    cli.add_argument("--lanczos-iters", type=int, default=40)
    cli.add_argument("--num-probes", type=int, default=1)
    cli.add_argument("--batch-size", type=int, default=128)
    cli.add_argument("--subsample", type=int, default=None, help="use this many samples")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--float64", action="store_true", help="MLP in double precision")
    cli.add_argument("--all", action="store_true", help="also stats, landscape, blocks")
    cli.add_argument("--refresh-bn", action="store_true", help="landscape: recompute BN stats")
    cli.add_argument("--backend", default=None, help="nccl or gloo (default: by device)")
    return cli


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Build the model (unless a checkpoint is given); write the spectrum (and with
    ``--all`` the loss statistics and a landscape along the top Ritz vector and a
    random direction).  Returns the files rank 0 wrote, by kind."""
    if args.quick:
        args.hidden, args.widths, args.lanczos_iters, args.subsample = 6, (2, 4), 10, 300
    splits = load_dataset(args.dataset, args.data_path, seed=args.seed)
    model = None
    if args.checkpoint is None:
        shape = (splits.num_classes, splits.in_channels, splits.input_size)
        if args.model == "MLP":
            kw: dict[str, Any] = {"hidden": (args.hidden,), "activation": "tanh"}
        else:
            kw = {"widths": tuple(args.widths)}
        model = get_model(args.model, *shape, seed=args.seed, **kw)
        if args.float64:
            model = model.double()
    out = Path(args.out)
    common = {"checkpoint_path": args.checkpoint, "subsample": args.subsample, "seed": args.seed}
    start = time.perf_counter()
    result = compute_eigenspectrum(
        splits,
        model=model,
        save_spectrum_path=out / "spectrum.npz",
        save_eigvec=args.all,
        lanczos_iters=args.lanczos_iters,
        curvature_matrix=args.curvature,
        num_probes=args.num_probes,
        batch_size=args.batch_size,
        **common,
    )
    _report(result, time.perf_counter() - start)
    files = {"spectrum": out / "spectrum.npz"}
    if args.all:
        files["eigvec"] = out / "spectrum-eigvec.npz"
        files["stats"] = out / "loss-stats.npz"
        files["landscape"] = out / "landscape.npz"
        files["blocks"] = out / "blocks.npz"
        compute_loss_stats(
            splits,
            model=model,
            save_path=files["stats"],
            batch_size=args.batch_size,
            frobenius_probes=2,
            **common,
        )
        build_loss_landscape(
            splits,
            model=model,
            dist=0.5,
            n_points=5,
            spectrum_path=files["spectrum"],
            save_path=files["landscape"],
            directions=["ritz-top-1"],
            random_directions=1,
            refresh_bn=args.refresh_bn,
            batch_size=args.batch_size,
            **common,
        )
        compute_block_spectra(
            splits,
            model=model,
            save_path=files["blocks"],
            lanczos_iters=args.lanczos_iters,
            curvature_matrix=args.curvature,
            num_probes=args.num_probes,
            batch_size=args.batch_size,
            **common,
        )
    return files


def _report(result: SpectrumResult, seconds: float) -> None:
    if is_main_process():
        summary = spectrum_summary(result)
        print(
            f"{get_world_size()} process(es), P = {result.num_params}, {seconds:.1f} s: "
            f"top {summary['top']:.6g}, bottom {summary['bottom']:.6g}, "
            f"trace {summary['trace']:.6g} -> {result.path}"
        )
    else:
        print(f"rank {get_rank()}: done (rank 0 writes)")


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads() // _local_world()))
    launched = init_from_env(args.backend)
    try:
        run(args)
    finally:
        if launched:
            dist.destroy_process_group()


def _local_world() -> int:
    """Processes on this node (``torchrun`` sets ``LOCAL_WORLD_SIZE``)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


if __name__ == "__main__":
    main()
