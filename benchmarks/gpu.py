"""Verify a lent GPU in one command: the GPU tests, then the screen benchmark on CuPy blocks.

    pip install -e '.[gpu,dev]'          # on the CUDA machine (cupy-cuda13x for a 580.x driver)
    python benchmarks/gpu.py             # options after it go to screen_scale.py, e.g.
    python benchmarks/gpu.py --perturbations 20000 --features 20000 --memory-limit 32GiB

Runs ``pytest -m gpu`` (the CuPy-parametrised kernel tests, held to the NumPy results), then
``benchmarks/screen_scale.py --cupy``: the same table as the CPU benchmark, with the blocks moved
to the device inside the graph and the array-API kernels on CuPy. Exits non-zero if a GPU test
fails or is skipped for want of CuPy. Without CuPy or a CUDA device it says so in one line and exits with 2.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        from nbdask.gpu import cuda_available

        why = cuda_available()
    except ImportError as err:
        why = f"nbdask cannot be imported here ({err})"
    if why:
        print(f"benchmarks/gpu.py: no GPU to verify: {why}", file=sys.stderr)
        return 2
    tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs",
                            "-p", "no:cacheprovider", str(ROOT / "tests")],
                           cwd=ROOT, capture_output=True, text=True)
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr
    print(f"GPU tests (pytest -m gpu): {summary}")
    # A skip for want of CuPy or CUDA means the GPU was not exercised (others are by design).
    unverified = re.findall(r"^SKIPPED .*(?:cupy|cuda).*$", tests.stdout, re.I | re.M)
    if tests.returncode or unverified:
        print(tests.stdout[-4000:], tests.stderr[-2000:], sep="\n")
        print("benchmarks/gpu.py: the GPU tests did not all pass", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import screen_scale

    screen_scale.main(["--cupy", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
