"""nbdask on GPUs: one dask-cuda worker per GPU, CuPy kernels on every block.

    pip install 'nbdask[gpu]' dask-cuda            # the cupy-cudaXXx wheel matching the driver
    python deploy/gpu/cuda_cluster.py screen.zarr results.zarr

Blocks are read on the host (Zarr decoding runs on the CPU) and moved to the device inside the
graph; the array-API kernels then run on CuPy (``engine="auto"`` picks them for CuPy blocks) and
results come back to the host for writing.
"""

from __future__ import annotations

import sys


def main(cube_url: str, results_url: str) -> None:
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    import nbdask
    from nbdask.gpu import cube_to_device, results_to_host

    with LocalCUDACluster(rmm_pool_size="24GB", threads_per_worker=1) as cluster, Client(cluster):
        res = nbdask.test(cube_to_device(nbdask.open_cube(cube_url)), method="mom")
        nbdask.save_results(results_to_host(res), results_url, progress=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
