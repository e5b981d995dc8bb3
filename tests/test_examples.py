"""The runnable examples, at small size, as a person runs them: laptop quickstart, S3 (moto on
127.0.0.1), a cluster of scheduler and worker processes, the GPU path (which must skip cleanly
without CuPy/CUDA), and the two doors for real data (a bulk count table, Perturb-seq AnnData)."""

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_quickstart(tmp_path):
    r = run("quickstart.py", "--out", str(tmp_path), "--perturbations", "48", "--features", "40",
            "--workers", "1")
    assert "1,920 comparisons" in r.stdout and f"report: {tmp_path / 'report.html'}" in r.stdout
    hits = pd.read_parquet(tmp_path / "hits.parquet")
    assert len(hits) > 0 and (hits["q_value"] <= 0.1).all()
    assert "hits at q <= 0.1" in r.stdout and f"({len(hits):,} rows)" in r.stdout
    assert 'id="volcano"' in (tmp_path / "report.html").read_text()


def test_s3_against_a_local_moto_server(s3):
    pytest.importorskip("s3fs")
    r = run("s3.py", "--bucket", "nbdask", "--prefix", "example", "--endpoint", s3["endpoint"],
            "--key", s3["key"], "--secret", s3["secret"], "--perturbations", "32", "--features", "32",
            "--workers", "1")
    assert r.stdout.startswith("s3://nbdask/example/results.zarr: 1,024 tested")
    assert s3["secret"] not in r.stdout + r.stderr


def test_cluster_of_scheduler_and_worker_processes(tmp_path):
    r = run("cluster.py", "--out", str(tmp_path), "--perturbations", "32", "--features", "24")
    assert "2 workers" in r.stdout and "768 tested" in r.stdout
    assert (tmp_path / "results.zarr").is_dir()


def test_gpu_example_skips_cleanly_without_cupy():
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("a CUDA device is present: the example runs for real (see the gpu marker tests)")
    except Exception:
        pass
    r = run("gpu.py")
    assert r.stdout.startswith("gpu.py: skipped: ") and r.stderr == ""


def test_bulk_example(tmp_path):
    out = run("bulk.py", "--genes", "300", "--workdir", str(tmp_path), "--workers", "1").stdout
    assert "$ nbdask import table" in out and "$ nbdask test" in out
    assert "top hits" in out and "gene000" in out.split("top hits")[1]
    top = out.split("top hits")[1].splitlines()[2:12]  # the 10 rows under the header
    for row in top:  # the strongest hits are the genes each drug changes
        drug, gene = row.split()[:2]
        assert (drug, int(gene[4:]) < 100) in (("drugA", True), ("drugB", False)), row
        assert drug == "drugA" or 100 <= int(gene[4:]) < 150, row
    drug_a = next(line for line in out.splitlines() if line.startswith("drugA:"))
    among = int(re.match(r"drugA: \d+ genes at q < 0.05, (\d+) of them", drug_a).group(1))
    assert among >= 50, drug_a  # drugA changes 100 genes 2x


def test_single_cell_example(tmp_path):
    pytest.importorskip("anndata")
    out = run("single_cell.py", "--cells", "3000", "--genes", "120", "--perturbations", "6",
              "--workdir", str(tmp_path), "--workers", "1").stdout
    assert "cube: 6 perturbations x 120 genes" in out and "top hits" in out
    last = out.strip().splitlines()[-1]
    assert last.endswith("comparisons at q < 0.05 in all") and int(last.split()[0]) >= 4, last
