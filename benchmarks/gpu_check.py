"""One-shot GPU check (issue 9, item 4): correctness on CUDA, then VGG16 full-dataset timing.

Usage::

    python benchmarks/gpu_check.py [--out gpu_check.json]     # one GPU, <= 5 minutes
    python benchmarks/gpu_check.py --cpu-smoke                 # everything shrunk, CPU, < 30 s

Checks (each printed as ``CHECK <name>: PASS|FAIL|SKIP (detail)``; the exit status is
1 when any check fails):

1. ``products-float64``: Hessian and GGN products of a small MLP and a small CNN with
   BatchNorm (``bn_mode`` "eval" and "train"), data in two unequal batches, on the
   device in float64, against the dense float64 references of
   :mod:`curvops.testing` (relative error <= 1e-10).
2. ``products-float32``: the same operators in float32 (strict IEEE float32, TF32
   off) against the float64 references (relative error <= 1e-4).
3. ``lanczos-device``: ``spectral.lanczos`` with full reorthogonalisation on the
   float64 CNN Hessian, ``m = P`` steps: basis on the device, orthogonality loss
   and Ritz values against ``numpy.linalg.eigh`` of the dense reference.
4. ``no-host-copies``: during a float32 Lanczos run, every device-to-host transfer
   (``Tensor.cpu``/``.numpy``/``.tolist``/``.item``/``bool``/``.to("cpu")``) is
   intercepted: no vector may reach the host (at most 3 entries: the one status
   transfer of a product holds the first non-finite batch, the parameter flag and,
   for several batches, their total weight counted on the device); the number of
   scalar conversions per step is reported (each is a device synchronisation on a
   GPU; ``.cpu().numpy()`` of the same tensor counts twice).
5. ``cupy-interop``: a cupy vector in gives a cupy vector out equal to the torch
   path (SKIP when cupy is not installed or the device is the CPU).
6. ``distributed`` (issue 10): ``min(torch.cuda.device_count(), 4)`` processes with the
   NCCL backend, one GPU each (SKIP with fewer than 2 GPUs); with ``--cpu-smoke`` (or
   ``--device cpu``) 2 CPU processes with Gloo.  Rendezvous through a ``file://``
   store in a temporary directory; each rank holds its shard
   (:func:`curvops.distributed.shard_batches`, unequal shards) of a small synthetic
   dataset.  Hessian and GGN products of a float64 CNN with BatchNorm (train mode;
   P = 3,450 on GPUs, 438 in the smoke mode) must equal the single-process
   full-data products (relative error <= 1e-10), the ``spectral.lanczos``
   coefficients must be bitwise equal across ranks (compared in the parent and by
   :func:`curvops.distributed.check_replicated`) and the Ritz values must match a
   single-process run (<= 1e-8 of the largest).  Reported with the job's wall time,
   the distributed product time and the Lanczos time per step.

Timing: a Hessian and a GGN Lanczos step of VGG16 (15.3M parameters) over a
CIFAR-100-shaped synthetic dataset of 50,000 images, in strict float32 and with TF32
matrix products (cuBLAS and cuDNN), channels-last on CUDA; each run is
``--lanczos-iters`` steps from the same start vector, after one warm-up product.
Reported: seconds per step, the goals of issue 9 (<= 3 s strict float32, <= 1.5 s
TF32 for the Hessian; the paper's GTX 1080 Ti took 27.9 s and 26.5 s), and the
relative differences of the top Ritz values between the float32 and TF32 runs.
``--cpu-smoke`` replaces VGG16 by a small CNN and 50,000 images by 64 (TF32 is then
a no-op, reported as such).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curvops import GGNOperator, HessianOperator
from curvops.testing import dense_ggn, dense_hessian
from spectral.krylov import lanczos
from spectral.operator import as_operator

PAPER_SECONDS = {"hessian": 27.9, "ggn": 26.5}
GOAL_SECONDS = {"fp32": 3.0, "tf32": 1.5}
RESULTS: list[dict[str, Any]] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def record(name: str, status: str, detail: str, **extra: Any) -> bool:
    RESULTS.append({"check": name, "status": status, "detail": detail, **extra})
    log(f"CHECK {name}: {status} ({detail})")
    return status != "FAIL"


@contextlib.contextmanager
def fp32_precision(mode: str) -> Iterator[None]:
    """``"ieee"``: strict float32 matrix products and convolutions; ``"tf32"``: TF32."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = mode
    conv.fp32_precision = mode
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.double().cpu(), want.double().cpu()
    return float((got64 - want64).norm() / want64.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------- small models
class _TinyCNN(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 4),
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            bn = self.body[1]
            bn.running_mean.uniform_(-0.2, 0.2, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def small_problems(device: torch.device, dtype: torch.dtype) -> list[tuple[str, Any]]:
    """``(name, (model, loss, data, bn_mode))`` on ``device``; data in two unequal batches."""
    gen = torch.Generator().manual_seed(0)
    out: list[tuple[str, Any]] = []
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(11, 6, generator=gen)
    y = torch.randint(0, 3, (11,), generator=gen)
    data = [(x[:7], y[:7]), (x[7:], y[7:])]
    out.append(("mlp", (mlp, data, None)))
    for mode in ("eval", "train"):
        cnn = _TinyCNN(seed=1)
        xi = torch.randn(9, 1, 6, 6, generator=gen)
        yi = torch.randint(0, 4, (9,), generator=gen)
        out.append((f"cnn-bn-{mode}", (cnn, [(xi[:5], yi[:5]), (xi[5:], yi[5:])], mode)))
    moved = []
    for name, (model, batches, mode) in out:
        model = model.to(device=device, dtype=dtype)
        batches = [(xb.to(device, dtype), yb.to(device)) for xb, yb in batches]
        moved.append((name, (model, nn.CrossEntropyLoss(), batches, mode)))
    return moved


def check_products(device: torch.device) -> bool:
    ok = True
    worst64, worst32 = 0.0, 0.0
    gen = torch.Generator().manual_seed(5)
    for (name, (m64, loss, d64, mode)), (_, (m32, _, d32, _)) in zip(
        small_problems(device, torch.float64), small_problems(device, torch.float32)
    ):
        for label, op_cls, dense_fn in [
            ("hessian", HessianOperator, dense_hessian),
            ("ggn", GGNOperator, dense_ggn),
        ]:
            ref = dense_fn(m64, loss, d64, bn_mode=mode).cpu()
            v = torch.randn(ref.shape[0], generator=gen, dtype=torch.float64)
            want = ref @ v
            op64 = op_cls(m64, loss, d64, bn_mode=mode)
            got64 = op64.matvec(v.to(device))
            if got64.device.type != device.type:
                ok = record(f"products-float64[{name}/{label}]", "FAIL", "output left device")
            worst64 = max(worst64, rel_err(got64, want))
            with fp32_precision("ieee"):
                op32 = op_cls(m32, loss, d32, bn_mode=mode)
                got32 = op32.matvec(v.to(device, torch.float32))
            worst32 = max(worst32, rel_err(got32, want))
    ok &= record(
        "products-float64",
        "PASS" if worst64 <= 1e-10 else "FAIL",
        f"max rel. error {worst64:.2e} <= 1e-10 over MLP, CNN-BN eval/train, Hessian and GGN",
        value=worst64,
    )
    ok &= record(
        "products-float32",
        "PASS" if worst32 <= 1e-4 else "FAIL",
        f"max rel. error {worst32:.2e} <= 1e-4 (strict float32)",
        value=worst32,
    )
    return ok


def check_lanczos(device: torch.device) -> bool:
    _, (model, loss, data, mode) = small_problems(device, torch.float64)[1]
    H = HessianOperator(model, loss, data, bn_mode=mode)
    dense = dense_hessian(model, loss, data, bn_mode=mode).cpu().numpy()
    evals = np.linalg.eigvalsh(dense)
    n = dense.shape[0]
    res = lanczos(H, n, reorth="full", seed=0)
    basis_ok = isinstance(res.basis, torch.Tensor) and res.basis.device.type == device.type
    ritz = res.ritz().values
    scale = float(np.max(np.abs(evals)))
    tol = 1e-8 * scale
    if res.num_iters == n:
        err = float(np.max(np.abs(np.sort(ritz) - evals)))
        what = "all Ritz values"
    else:  # exact breakdown: the extreme Ritz values still converge
        err = float(max(abs(ritz[-1] - evals[-1]), abs(ritz[0] - evals[0])))
        what = f"extreme Ritz values (breakdown after {res.num_iters} steps)"
    orth = res.orthogonality_loss
    passed = basis_ok and err <= tol and orth <= 1e-10
    return record(
        "lanczos-device",
        "PASS" if passed else "FAIL",
        f"P={n}, basis on {device.type}: {basis_ok}, {what} vs eigh: {err:.1e} "
        f"(tol {tol:.1e}), orthogonality loss {orth:.1e}",
    )


@contextlib.contextmanager
def count_host_transfers() -> Iterator[list[int]]:
    """Intercept transfers of torch tensors to host objects; yield the list of their sizes.

    On the CPU nothing moves, but the same calls are the ones that would copy from a
    GPU, so the check means the same on both.
    """
    sizes: list[int] = []
    T = torch.Tensor
    originals = {name: getattr(T, name) for name in ("cpu", "numpy", "tolist", "item", "__bool__")}
    original_to = T.to

    def wrap(name: str) -> Callable[..., Any]:
        fn = originals[name]

        def inner(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            sizes.append(int(self.numel()))
            return fn(self, *args, **kwargs)

        return inner

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        target = kwargs.get("device", args[0] if args else None)
        to_host = isinstance(target, str | torch.device) and torch.device(target).type == "cpu"
        if to_host and self.device.type != "cpu":
            sizes.append(int(self.numel()))
        return original_to(self, *args, **kwargs)

    try:
        for name in originals:
            setattr(T, name, wrap(name))
        T.to = to  # type: ignore[method-assign]
        yield sizes
    finally:
        for name, fn in originals.items():
            setattr(T, name, fn)
        T.to = original_to  # type: ignore[method-assign]


def check_host_copies(device: torch.device) -> bool:
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    x = torch.randn(64, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (64,), generator=gen).to(device)
    m = 12
    results = {}
    for layout, data in [
        ("single", (x, y)),
        ("full-4-batches", list(zip(x.split(16), y.split(16)))),
    ]:
        H = HessianOperator(model, nn.CrossEntropyLoss(), data, bn_mode="eval")
        v0 = H.template_vector() + 1.0
        with count_host_transfers() as sizes:
            res = lanczos(H, m, reorth="full", v0=v0)
        results[layout] = (len(sizes), max(sizes, default=0), res.num_iters)
    vectors = max(r[1] for r in results.values())
    allowed = 3  # a product's status: first non-finite batch, parameter flag, total weight
    detail = ", ".join(
        f"{k}: {n / it:.1f} scalar host conversions per step" for k, (n, _, it) in results.items()
    )
    return record(
        "no-host-copies",
        "PASS" if vectors <= allowed else "FAIL",
        f"largest host transfer {vectors} entries (<= {allowed} allowed); {detail}",
        transfers=results,
    )


def check_cupy(device: torch.device) -> bool:
    if device.type != "cuda":
        return record("cupy-interop", "SKIP", "needs CUDA")
    try:
        import cupy  # type: ignore[import-not-found]
    except Exception as exc:
        return record("cupy-interop", "SKIP", f"cupy not importable: {type(exc).__name__}")
    _, (model, loss, data, mode) = small_problems(device, torch.float32)[0]
    H = HessianOperator(model, loss, data, bn_mode=mode)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    want = H.matvec(v)
    got = H.matvec(cupy.from_dlpack(v))
    same_type = isinstance(got, cupy.ndarray)
    err = rel_err(torch.from_dlpack(got), want) if same_type else math.inf
    return record(
        "cupy-interop",
        "PASS" if same_type and err <= 1e-6 else "FAIL",
        f"cupy in -> {type(got).__module__}.{type(got).__name__} out, rel. diff {err:.1e}",
    )


# ---------------------------------------------------------------------------- distributed
#: Per size: CNN width, image side, batch sizes (the last one smaller), Lanczos steps.
DIST_PROBLEMS: dict[str, dict[str, Any]] = {
    "smoke": {"width": 4, "side": 6, "sizes": [4, 4, 4, 4, 3], "iters": 8},
    "gpu": {"width": 16, "side": 8, "sizes": [16] * 9 + [7], "iters": 20},
}
DIST_TIMEOUT_S = {"smoke": 90.0, "gpu": 240.0}
DIST_NUM_VECTORS = 2


class _DistCNN(nn.Module):
    """Conv-BN-ReLU-Conv-ReLU-pool-Linear, float64; P = 438 (width 4) or 3,450 (width 16)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * width, 10),
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.double().train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def _dist_batches(size: str, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The full data stream (same on every rank): batches of ``DIST_PROBLEMS[size]["sizes"]``."""
    spec = DIST_PROBLEMS[size]
    gen = torch.Generator().manual_seed(8)
    out = []
    for b in spec["sizes"]:
        x = torch.randn(b, 3, spec["side"], spec["side"], generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (b,), generator=gen)
        out.append((x.to(device), y.to(device)))
    return out


def dist_worker(
    rank: int, world: int, backend: str, init_file: str, out_dir: str, size: str
) -> None:
    """One rank of the ``distributed`` check: products, Lanczos, results to ``rank{r}.npz``."""
    import torch.distributed as dist

    from curvops import distributed as cd

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=DIST_TIMEOUT_S[size] / 2)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout
    )
    spec = DIST_PROBLEMS[size]
    model = _DistCNN(spec["width"]).to(device)
    batches = _dist_batches(size, device)
    loss = nn.CrossEntropyLoss()
    P = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(9)
    V = [
        torch.randn(P, generator=gen, dtype=torch.float64).to(device)
        for _ in range(DIST_NUM_VECTORS)
    ]
    shard = cd.shard_batches(batches)
    out: dict[str, Any] = {"num_params": P, "shard_batches": len(shard.source)}
    product_times = []
    for label, cls in (("hessian", HessianOperator), ("ggn", GGNOperator)):
        ref = cls(model, loss, batches, bn_mode="train", process_group=False)
        op = cls(model, loss, shard, bn_mode="train")
        worst = 0.0
        for v in V:
            want = ref.matvec(v)
            sync(device)
            t0 = time.perf_counter()
            got = op.matvec(v)
            sync(device)
            product_times.append(time.perf_counter() - t0)
            worst = max(worst, rel_err(got, want))
        out[f"{label}_rel_err"] = worst
    out["product_seconds"] = float(np.median(product_times))
    H = HessianOperator(model, loss, shard, bn_mode="train")
    sync(device)
    t0 = time.perf_counter()
    run = lanczos(H, spec["iters"], seed=0)
    sync(device)
    out["lanczos_seconds_per_step"] = (time.perf_counter() - t0) / max(run.num_iters, 1)
    out["alpha"], out["beta"] = np.asarray(run.alpha), np.asarray(run.beta)
    out["ritz"] = np.asarray(run.ritz().values)
    out["replicated"] = cd.check_replicated(out["alpha"]) and cd.check_replicated(out["beta"])
    if rank == 0:  # no collectives in the reference, so rank 0 alone may run it
        H_ref = HessianOperator(model, loss, batches, bn_mode="train", process_group=False)
        out["ritz_ref"] = np.asarray(lanczos(H_ref, spec["iters"], seed=0).ritz().values)
    np.savez(Path(out_dir) / f"rank{rank}.npz", **out)
    # every rank leaves together: a rank tearing its Gloo group down while rank 0 still
    # ran the reference aborted ("terminate called without an active exception": 2 in 8
    # CPU smoke runs)
    dist.barrier()
    dist.destroy_process_group()


def _run_dist_job(
    world: int, backend: str, size: str, tmp: Path
) -> tuple[list[dict[str, np.ndarray]] | None, str]:
    """Spawn the ranks (this script with ``--dist-worker``); their results, or None and logs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    init_file = str(tmp / "rendezvous")
    worker = [sys.executable, __file__, "--dist-worker"]
    procs = [
        subprocess.Popen(
            [*worker, str(r), str(world), backend, init_file, str(tmp), size],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + DIST_TIMEOUT_S[size]
    logs: list[str] = []
    for r, p in enumerate(procs):
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            for q in procs:
                q.communicate()
            return None, f"rank {r} timed out after {DIST_TIMEOUT_S[size]:.0f} s"
    for r, (p, text) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            return None, f"rank {r} exited with {p.returncode}: {text[-2000:]}"
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(world)], ""


def check_distributed(device: torch.device, smoke: bool) -> bool:
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count < 2:
            return record("distributed", "SKIP", f"needs >= 2 GPUs, {count} visible")
        backend, world, size = "nccl", min(count, 4), "gpu"
    else:
        backend, world, size = "gloo", 2, "smoke" if smoke else "gpu"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_dist_") as tmp:
        job, why = _run_dist_job(world, backend, size, Path(tmp))
    wall = time.perf_counter() - t0
    if job is None:
        return record("distributed", "FAIL", f"{backend}, {world} processes: {why}", seconds=wall)
    worst = {k: max(float(r[f"{k}_rel_err"]) for r in job) for k in ("hessian", "ggn")}
    bitwise = all(
        np.array_equal(r["alpha"], job[0]["alpha"]) and np.array_equal(r["beta"], job[0]["beta"])
        for r in job[1:]
    )
    replicated = all(bool(r["replicated"]) for r in job)
    ref = job[0]["ritz_ref"]
    ritz_err = max(
        float(np.max(np.abs(r["ritz"] - ref))) if r["ritz"].shape == ref.shape else math.inf
        for r in job
    )
    ritz_tol = 1e-8 * float(np.max(np.abs(ref)))
    product_s = max(float(r["product_seconds"]) for r in job)
    step_s = max(float(r["lanczos_seconds_per_step"]) for r in job)
    passed = max(worst.values()) <= 1e-10 and bitwise and replicated and ritz_err <= ritz_tol
    shards = "/".join(str(int(r["shard_batches"])) for r in job)
    return record(
        "distributed",
        "PASS" if passed else "FAIL",
        f"{backend}, {world} processes, P={int(job[0]['num_params'])}, shards of {shards} "
        f"batches: max rel. error Hessian {worst['hessian']:.1e}, GGN {worst['ggn']:.1e} "
        f"(<= 1e-10); Lanczos alpha/beta bitwise equal across ranks: {bitwise and replicated}; "
        f"Ritz vs single process {ritz_err:.1e} (tol {ritz_tol:.1e}); "
        f"{product_s * 1e3:.1f} ms per product, {step_s * 1e3:.1f} ms per Lanczos step, "
        f"job {wall:.1f} s",
        backend=backend,
        world_size=world,
        rel_err=worst,
        lanczos_bitwise_equal=bool(bitwise and replicated),
        ritz_abs_err=ritz_err,
        seconds_per_product=product_s,
        seconds_per_lanczos_step=step_s,
        seconds=wall,
    )


# ---------------------------------------------------------------------------- timing
def synthetic_dataset(
    num_images: int, batch_size: int, device: torch.device, channels_last: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CIFAR-100-shaped images (standard normal pixels), generated on ``device``."""
    gen = torch.Generator(device=device).manual_seed(0)
    batches = []
    for start in range(0, num_images, batch_size):
        b = min(batch_size, num_images - start)
        x = torch.randn(b, 3, 32, 32, generator=gen, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 100, (b,), generator=gen, device=device)
        batches.append((x, y))
    return batches


def time_lanczos(
    op: Any, m: int, device: torch.device, v0: torch.Tensor
) -> tuple[float, float, np.ndarray]:
    """``(seconds per step, seconds per product, top Ritz values)`` of ``m`` steps."""
    times: list[float] = []

    def timed(x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = op.matvec(x)
        sync(device)
        times.append(time.perf_counter() - t0)
        return out  # type: ignore[no-any-return]

    wrapped = as_operator(timed, size=op.shape[0], like=op.template_vector())
    sync(device)
    t0 = time.perf_counter()
    res = lanczos(wrapped, m, reorth="full", v0=v0)
    sync(device)
    total = time.perf_counter() - t0
    top = np.sort(res.ritz().values)[::-1][:3]
    return total / res.num_iters, float(np.median(times)), top


def run_timing(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from nets.models import get_model

    smoke = args.cpu_smoke
    name = "SmallCNN" if smoke else "VGG16"
    model = get_model(name, num_classes=100, in_channels=3, input_size=32, seed=0)
    channels_last = device.type == "cuda" and not args.no_channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    batches = synthetic_dataset(args.num_images, args.batch_size, device, channels_last)
    loss = nn.CrossEntropyLoss()
    P = sum(p.numel() for p in model.parameters())
    log(
        f"timing: {name} (P={P:,}) on {device}, {args.num_images:,} images in "
        f"{len(batches)} batches, channels_last={channels_last}, m={args.lanczos_iters}"
    )
    v0 = torch.randn(P, generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {
        "model": name,
        "num_params": P,
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "channels_last": channels_last,
        "lanczos_iters": args.lanczos_iters,
        "runs": {},
    }
    t_start = time.perf_counter()
    for precision in ("fp32", "tf32"):
        for kind, cls in (("hessian", HessianOperator), ("ggn", GGNOperator)):
            if time.perf_counter() - t_start > args.time_budget:
                out["runs"][f"{kind}-{precision}"] = {"skipped": "time budget exhausted"}
                log(f"timing {kind} {precision}: skipped (time budget)")
                continue
            with fp32_precision("ieee" if precision == "fp32" else "tf32"):
                op = cls(model, loss, batches, bn_mode="eval")
                sync(device)
                t0 = time.perf_counter()
                op.matvec(v0)  # warm-up: cuDNN algorithm selection, allocator
                sync(device)
                warm = time.perf_counter() - t0
                step, product, top = time_lanczos(op, args.lanczos_iters, device, v0)
            rec = {
                "seconds_per_step": step,
                "seconds_per_product": product,
                "warmup_product_seconds": warm,
                "top_ritz": top.tolist(),
                "paper_seconds_1080ti": PAPER_SECONDS[kind],
            }
            if kind == "hessian" and not smoke:
                rec["goal_seconds"] = GOAL_SECONDS[precision]
                rec["goal_met"] = bool(step <= GOAL_SECONDS[precision])
            out["runs"][f"{kind}-{precision}"] = rec
            log(
                f"timing {kind} {precision}: {step:.3f} s per Lanczos step "
                f"({product:.3f} s per product), top Ritz {np.array2string(top, precision=6)}"
            )
    for kind in ("hessian", "ggn"):
        a, b = out["runs"].get(f"{kind}-fp32", {}), out["runs"].get(f"{kind}-tf32", {})
        if "top_ritz" in a and "top_ritz" in b:
            ta, tb = np.asarray(a["top_ritz"]), np.asarray(b["top_ritz"])
            diff = np.abs(ta - tb) / np.maximum(np.abs(ta), 1e-30)
            out[f"{kind}_top_ritz_rel_diff_fp32_vs_tf32"] = diff.tolist()
            shown = np.array2string(diff, precision=2)
            log(f"timing {kind}: top Ritz rel. diff fp32 vs TF32 {shown}")
    if device.type != "cuda":
        out["note"] = "CPU: TF32 settings have no effect; timings are a smoke test only"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="shrink everything, run on CPU")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --cpu-smoke)")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lanczos-iters", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=200.0, help="seconds for timing")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--dist-worker", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dist_worker is not None:  # one rank of the ``distributed`` check
        rank, world, backend, init_file, out_dir, size = args.dist_worker
        dist_worker(int(rank), int(world), backend, init_file, out_dir, size)
        return 0
    smoke = args.cpu_smoke
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available: run with --cpu-smoke (or --device cpu)")
        return 2
    args.num_images = args.num_images or (64 if smoke else 50_000)
    args.batch_size = args.batch_size or (16 if smoke else 1_000)
    args.lanczos_iters = args.lanczos_iters or (3 if smoke else 5)
    if smoke:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"gpu_check on {name} (torch {torch.__version__}), smoke={smoke}")
    ok = check_products(device)
    ok &= check_lanczos(device)
    ok &= check_host_copies(device)
    ok &= check_cupy(device)
    ok &= check_distributed(device, smoke)
    timing = None if args.skip_timing else run_timing(args, device)
    total = time.perf_counter() - t0
    log(f"gpu_check: {'all checks passed' if ok else 'SOME CHECKS FAILED'} in {total:.1f} s")
    if args.out is not None:
        payload = {"device": name, "torch": torch.__version__, "checks": RESULTS}
        payload.update(timing=timing, seconds=total, passed=ok)
        args.out.write_text(json.dumps(payload, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
