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
    import cupy
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    import nbdask

    with LocalCUDACluster(rmm_pool_size="24GB", threads_per_worker=1) as cluster, Client(cluster):
        cube = nbdask.open_cube(cube_url)
        on_gpu = cube.copy()
        for name in ("counts", "size_factor", "control_counts", "control_size_factor"):
            data = cube[name].data
            on_gpu[name] = cube[name].copy(data=data.map_blocks(
                cupy.asarray, meta=cupy.empty((0,) * data.ndim, data.dtype)))
        res = nbdask.test(on_gpu, method="mom")
        host = res.map(lambda v: v.copy(data=v.data.map_blocks(
            cupy.asnumpy, meta=__import__("numpy").empty((0,) * v.ndim, v.dtype)))
            if hasattr(v.data, "map_blocks") else v)
        nbdask.save_results(host.assign_attrs(res.attrs), results_url, progress=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
