import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared"
#: The one line distributed may add on a loaded machine when a LocalCluster's worker is slow to
#: exit at shutdown; not nbdask's output.
NANNY = "distributed.nanny: Worker process still alive after"


@pytest.fixture(scope="session")
def client():
    """A real distributed cluster: scheduler plus 2 worker processes on 127.0.0.1."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", memory_limit="3GiB",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture
def nbdask_main(capsys, caplog):
    """``nbdask ARGS`` run in this process through ``nbdask.cli.main``: (exit code, stdout, stderr).

    For the cases where the process around the CLI does not matter (bad input found before a
    cluster starts); each command keeps a subprocess case of its own. Log records nbdask emits at
    WARNING or above (the console script prints them as "name: message") count as stderr, and
    the logger levels main() sets are restored after.
    """
    from nbdask.cli import main

    def run(*args):
        levels = {name: logging.getLogger(name).level for name in ("distributed", "nbdask")}
        capsys.readouterr()
        caplog.clear()
        try:
            code = main([str(a) for a in args])
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
        out, err = capsys.readouterr()
        logged = "".join(f"{r.name}: {r.getMessage()}\n" for r in caplog.records
                         if r.levelno >= logging.WARNING and r.name.startswith("nbdask"))
        return code, out, err + logged

    return run


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server (IAM auth on) on 127.0.0.1 (tests/s3server.py): endpoint, key, secret,
    and the s3fs ``options`` that reach it. One for the session (moto and boto3 take seconds
    to import): each test writes stores of its own names into the bucket ``nbdask``."""
    pytest.importorskip("moto")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("s3server.py"))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"})
    try:
        info = json.loads(proc.stdout.readline())
        info["options"] = {"key": info["key"], "secret": info["secret"],
                           "client_kwargs": {"endpoint_url": info["endpoint"]}}
        yield info
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def make_cube(counts, size_factor, control_counts, control_size_factor):
    """A count cube Dataset from plain arrays, with string labels."""
    import xarray as xr  # here, not at import: the training venv runs tests without xarray

    counts = np.asarray(counts)
    p, g, _ = counts.shape
    return xr.Dataset(
        {
            "counts": (("perturbation", "feature", "replicate"), counts),
            "size_factor": (("perturbation", "replicate"), np.asarray(size_factor, float)),
            "control_counts": (("feature", "control_replicate"), np.asarray(control_counts)),
            "control_size_factor": ("control_replicate", np.asarray(control_size_factor, float)),
        },
        coords={"perturbation": [f"p{i}" for i in range(p)], "feature": [f"g{i}" for i in range(g)]},
    )


def edge_case_cube(seed: int = 3, p: int = 24, g: int = 20, r: int = 5, c: int = 6):
    """Small counts with many zeros, ragged replicates, extreme size factors and special rows.

    Special cases: feature 0 all-zero in every group; feature 1 all-zero in the control only;
    perturbation 0 all-zero for feature 2; perturbation 1 has one present replicate;
    perturbation 2 has none; perturbation 3 has size factors spanning 0.01–100.
    """
    rng = np.random.default_rng(seed)
    sf = np.exp(rng.normal(0, 0.5, (p, r)))
    n_present = rng.integers(2, r + 1, p)
    sf[np.arange(r)[None, :] >= n_present[:, None]] = np.nan
    sf[1, 1:] = np.nan
    sf[2, :] = np.nan
    sf[3, :] = [0.01, 0.1, 1.0, 10.0, 100.0][:r]
    csf = np.exp(rng.normal(0, 0.5, c))
    csf[0] = 0.05
    mean = np.exp(rng.uniform(np.log(0.3), np.log(30), g))
    phi = np.exp(rng.uniform(np.log(0.01), np.log(2), g))
    lfc = np.where(rng.random((p, g)) < 0.3, rng.normal(0, 1.5, (p, g)), 0.0)
    m = np.nan_to_num(sf)[:, None, :] * (mean[None, :] * np.exp(lfc))[:, :, None]
    counts = rng.poisson(rng.gamma(1 / phi[None, :, None], phi[None, :, None] * np.maximum(m, 1e-12)))
    counts[np.broadcast_to(~np.isfinite(sf)[:, None, :], counts.shape)] = 0
    ctrl = rng.poisson(rng.gamma(1 / phi[:, None], phi[:, None] * mean[:, None] * csf[None, :]))
    counts[:, 0, :] = 0
    ctrl[0, :] = 0
    ctrl[1, :] = 0
    counts[0, 2, :] = 0
    return make_cube(counts.astype(np.int32), sf, ctrl.astype(np.int32), csf)


def deseq2_size_factors(k, kind="ratio"):
    """DESeq2's estimateSizeFactorsForMatrix written from its definition, for a genes x samples
    matrix: exp(median over genes of log K - log geometric mean). "ratio": genes positive in
    every sample; "poscounts": geometric means over positive counts (divided by all samples),
    each sample's positive genes, then scaled to geometric mean 1."""
    from scipy import stats

    k = np.asarray(k, dtype=float)
    if kind == "ratio":
        keep = (k > 0).all(axis=1)
        return np.exp(np.median(np.log(k[keep] / stats.gmean(k[keep], axis=1)[:, None]), axis=0))
    n = k.shape[1]
    geo = np.array([np.exp(np.log(row[row > 0]).sum() / n) if (row > 0).any() else 0.0
                    for row in k])
    sf = np.array([np.exp(np.median(np.log(k[(geo > 0) & (k[:, j] > 0), j]
                                           / geo[(geo > 0) & (k[:, j] > 0)])))
                   for j in range(n)])
    return sf / stats.gmean(sf)
