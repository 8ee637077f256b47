"""``torchrun`` smoke test: ``compute_eigenspectrum`` on 2 CPU processes (Gloo).

``examples/distributed_spectrum.py --quick --float64 --model SmallCNN`` (a
BatchNorm CNN with P = 278 on 300 digits in 3 batches, BatchNorm in training mode
during products, 10 Lanczos steps of the Hessian) is launched with
``python -m torch.distributed.run --standalone --nproc_per_node=2`` with ``--all``
(spectrum with Ritz vectors, loss statistics, a 5-point landscape along the top
Ritz vector and a random direction with BatchNorm statistics recomputed at each
point from the ranks' shards, and per-layer SLQ spectra).  The files rank 0 writes
(one of each) are compared with those of the same script run in this process (no
process group): every array equal, floats to rounding.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from spectral.io import CHECKSUM_KEY

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distributed_spectrum.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("distributed_spectrum_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.distributed
def test_torchrun_two_processes_write_the_single_process_file(tmp_path: Path) -> None:
    args = ["--quick", "--float64", "--all", "--model", "SmallCNN", "--refresh-bn"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    log = tmp_path / "torchrun.log"
    with log.open("w") as sink:
        job = subprocess.Popen(
            [*launch, str(EXAMPLE), *args, "--out", str(tmp_path / "ddp")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        # the single-process reference runs here while the two ranks work
        example = _example()
        cli = example.parser().parse_args([*args, "--out", str(tmp_path / "one")])
        single = example.run(cli)
        job.wait(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    stdout = log.read_text()
    assert job.returncode == 0, stdout[-4000:]
    assert "2 process(es)" in stdout and "rank 1: done (rank 0 writes)" in stdout
    names = sorted(p.name for p in single.values())
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == names
    spectrum = np.load(tmp_path / "ddp" / "spectrum.npz", allow_pickle=False)
    assert int(spectrum["num_params"]) == 278 and spectrum["w"].shape == (10,)
    for kind, path in single.items():
        _assert_same_arrays(tmp_path / "ddp" / path.name, path, kind)


def _assert_same_arrays(got_path: Path, want_path: Path, kind: str) -> None:
    got = np.load(got_path, allow_pickle=False)
    want = np.load(want_path, allow_pickle=False)
    assert sorted(got.files) == sorted(want.files), kind
    for key in want.files:
        if key == CHECKSUM_KEY:  # of the contents, which agree only to rounding here
            continue
        a, b = got[key], want[key]
        where = f"{kind}: {key}"
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.dtype.kind == "f":
            tol = 1e-5 if a.dtype == np.float32 else 1e-11  # Ritz vectors are stored as float32
            scale = max(1.0, float(np.nanmax(np.abs(b)))) if b.size else 1.0
            np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale, err_msg=where)
        elif key == "pair_id":  # a SHA-256 of the files' contents, equal to rounding only
            assert (str(a) == "") == (str(b) == ""), where
        elif key == "config_json":  # paths of the two runs' own files differ
            text = str(a).replace(str(got_path.parent), str(want_path.parent))
            assert text == str(b), where
        else:
            assert np.array_equal(a, b), where
