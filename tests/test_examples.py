"""The runnable examples, at small size, as a person runs them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_bulk_example(tmp_path):
    out = run_example("bulk.py", "--genes", 300, "--workdir", tmp_path, "--workers", 1)
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
    out = run_example("single_cell.py", "--cells", 3000, "--genes", 120, "--perturbations", 6,
                      "--workdir", tmp_path, "--workers", 1)
    assert "cube: 6 perturbations x 120 genes" in out and "top hits" in out
    last = out.strip().splitlines()[-1]
    assert last.endswith("comparisons at q < 0.05 in all") and int(last.split()[0]) >= 4, last
