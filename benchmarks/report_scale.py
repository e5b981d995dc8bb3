"""Client memory of `nbdask export` and `nbdask report --html` against the size of the result.

    python benchmarks/report_scale.py --scale 2000          # 2000 x 2000 comparisons
    python benchmarks/report_scale.py --results results.zarr  # an existing results store

Each command runs in a fresh process with 2 local workers; the script prints the command's
wall time and the peak resident memory of the client process (the workers are separate
processes), side by side with the bytes of the result arrays it reads. Bounded memory means the
client's peak stays flat as the result grows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str]) -> tuple[float, float]:
    """Wall seconds and the child's peak RSS in MiB: VmHWM of its own address space (ru_maxrss
    would carry the parent's peak across fork and exec)."""
    code = ("import sys; from nbdask.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('MAXRSS', hwm, file=sys.stderr); sys.exit(rc)")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(r.stderr)
    rss = [line for line in r.stderr.splitlines() if line.startswith("MAXRSS")][-1].split()[1]
    return wall, int(rss) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=2000, help="perturbations = features")
    parser.add_argument("--results", help="an existing results store (skips simulate and test)")
    args = parser.parse_args()
    import nbdask

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = args.results
        if results is None:
            cube, results = str(tmp / "cube.zarr"), str(tmp / "results.zarr")
            shard = min(2048, max(64, args.scale // 4))
            nbdask.save_cube(nbdask.simulate(perturbations=args.scale, features=args.scale,
                                             effect_fraction=0.05, seed=1, chunks=shard), cube)
            subprocess.run([sys.executable, "-m", "nbdask.cli", "test", cube, results,
                            "--workers", "2", "--no-progress"], check=True, capture_output=True)
        res = nbdask.open_results(results)
        size = sum(res[v].nbytes for v in res.data_vars if res[v].ndim == 2) / 2 ** 20
        print(f"result {res.sizes['perturbation']:,} x {res.sizes['feature']:,} = "
              f"{res['p_value'].size:,} comparisons, {size:,.0f} MiB of 2-D arrays")
        rows = [
            ("export, q <= 0.1 -> parquet", ["export", results, str(tmp / "h.parquet"), "--q-max", "0.1", "--workers", "2"]),
            ("export, every row -> parquet", ["export", results, str(tmp / "all.parquet"), "--workers", "2"]),
            ("report --html", ["report", results, "--html", str(tmp / "r.html"), "--workers", "2"]),
            ("baseline: report (text)", ["report", results]),
        ]
        for name, cmd in rows:
            wall, rss = run(cmd)
            print(f"{name:<32} {wall:7.1f} s   client peak RSS {rss:7.0f} MiB   "
                  f"({rss / size:5.2f}x the result)")


if __name__ == "__main__":
    main()
