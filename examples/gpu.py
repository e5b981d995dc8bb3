"""The GPU path: the same kernels on CuPy arrays, checked against the CPU.

    pip install 'nbdask[gpu]'            # the cupy-cudaXXx wheel that matches the driver
    python examples/gpu.py

Without CuPy or a CUDA device it prints why and exits 0 (skipped), so it is safe to run
anywhere. With one, it moves a simulated cube's blocks to the device, tests them there (the
array-API kernels; Zarr decoding stays on the host), brings the results back and compares them
with the CPU run. For a whole cluster of GPUs, see deploy/gpu/cuda_cluster.py (dask-cuda).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import nbdask
from nbdask.gpu import cube_to_device, cuda_available, results_to_host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perturbations", type=int, default=256)
    parser.add_argument("--features", type=int, default=256)
    args = parser.parse_args(argv)
    reason = cuda_available()
    if reason:
        print(f"gpu.py: skipped: {reason}")
        return 0
    import cupy
    import dask

    cube = nbdask.simulate(perturbations=args.perturbations, features=args.features, seed=4,
                           chunks=min(512, max(16, args.perturbations // 2)))
    res = nbdask.test(cube_to_device(cube))  # array-API kernels on CuPy blocks
    with dask.config.set(scheduler="threads"):
        gpu = results_to_host(res).compute()
    cpu = nbdask.test(cube.load(), engine="array")
    diff = np.nanmax(np.abs(np.log(gpu["p_value"].values) - np.log(cpu["p_value"].values)))
    print(f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}: "
          f"{gpu['p_value'].size:,} comparisons; max |log p(GPU) - log p(CPU)| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
