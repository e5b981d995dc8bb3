"""Streamed Perturb-seq import, side by side with a raw read of the same X.

Writes (once, into the benchmark cache) an .h5ad of CSR counts, then on one LocalCluster:

- raw read: every chunk of X read on the workers with anndata's lazy reader, the same chunks
  the import uses, and only its stored values counted;
- import: ``nbdask.from_anndata(..., store=...)``: read, check, pseudobulk and write the cube,
  then the size factors from the stored counts, the cube marked complete.

Prints seconds, cells per second, the ratio import / raw read and the peak memory of the
cluster's processes.

    python benchmarks/import_anndata.py --cells 1000000 --genes 2000 --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

import numpy as np

from _common import CACHE, machine, timer


def cached_h5ad(cells: int, genes: int, perturbations: int, donors: int, seed: int = 0) -> str:
    """A screen of ``cells`` x ``genes`` Poisson-gamma counts (about 9% nonzero), one guide of
    ``perturbations`` + 2 non-targeting ones and a donor per cell, written in CSR chunks."""
    import anndata as ad
    import dask
    import dask.array as da
    import pandas as pd
    from scipy import sparse

    path = CACHE / f"screen_{cells}x{genes}_p{perturbations}_d{donors}_seed{seed}.h5ad"
    if path.exists():
        return str(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(np.log(0.05), 1.0, genes)).clip(0.002, 20)
    chunk = 10_000

    def block(i):
        r = np.random.default_rng([seed, i])
        n = min(chunk, cells - i * chunk)
        rate = base[None, :] * np.exp(r.normal(0, 0.4, (n, 1)))
        return sparse.csr_matrix(r.poisson(r.gamma(2.0, rate / 2.0)).astype(np.float32))

    blocks = [da.from_delayed(dask.delayed(block)(i), shape=(min(chunk, cells - i * chunk), genes),
                              dtype=np.float32, meta=sparse.csr_matrix((0, 0), dtype=np.float32))
              for i in range(-(-cells // chunk))]
    labels = ["NTC-1", "NTC-2"] + [f"KO-{k}" for k in range(perturbations)]
    obs = pd.DataFrame({"guide": pd.Categorical(rng.choice(labels, cells)),
                        "donor": pd.Categorical(rng.choice([f"d{k}" for k in range(donors)], cells))},
                       index=pd.RangeIndex(cells).astype(str))
    tmp = path.with_suffix(".partial")
    ad.AnnData(X=da.concatenate(blocks), obs=obs,
               var=pd.DataFrame(index=[f"g{j}" for j in range(genes)])).write_h5ad(tmp)
    tmp.rename(path)
    return str(path)


def raw_read(path: str, chunk_cells: int) -> int:
    """Stored values of X, read chunk by chunk on the workers (the import's reads, no sums)."""
    import anndata as ad
    import h5py

    with h5py.File(path, "r") as f:
        n_vars = int(f["X"].attrs["shape"][1])
        x = ad.experimental.read_elem_lazy(f["X"], chunks=(chunk_cells, n_vars))
        return int(x.map_blocks(lambda b: np.array([[b.nnz]]), dtype=np.int64,
                                chunks=(1, 1)).sum().compute())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--perturbations", type=int, default=200)
    ap.add_argument("--donors", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="4GiB", help="per worker")
    ap.add_argument("--chunk-cells", type=int, help="default: nbdask's (about 64 MiB of float64)")
    args = ap.parse_args()

    from distributed import Client
    from distributed.diagnostics import MemorySampler

    import nbdask
    from nbdask.cluster import local_cluster
    from nbdask.importers.anndata import CHUNK_BYTES

    t: dict[str, float] = {}
    with timer("write_h5ad", t):
        path = cached_h5ad(args.cells, args.genes, args.perturbations, args.donors)
    chunk_cells = args.chunk_cells or CHUNK_BYTES // (8 * args.genes) * 8
    out = tempfile.mkdtemp(prefix="nbdask-bench-")
    sampler = MemorySampler()
    try:
        with local_cluster(workers=args.workers, memory_limit=args.memory_limit) as cluster, \
                Client(cluster) as client:
            raw_read(path, chunk_cells)  # warm: imports on the workers, page cache
            with timer("raw_read", t):
                nnz = raw_read(path, chunk_cells)
            with timer("import", t), sampler.sample("import", client=client, measure="process"):
                cube = nbdask.from_anndata(path, perturbation_key="guide", sample_key="donor",
                                           control=["NTC-1", "NTC-2"], store=out + "/cube.zarr",
                                           chunk_cells=args.chunk_cells, client=client)
        peak = sampler.to_pandas()["import"].max()
    finally:
        shutil.rmtree(out, ignore_errors=True)

    n = args.cells
    print(f"machine: {machine()}; {args.workers} workers x {args.memory_limit}")
    print(f"{n:,} cells x {args.genes:,} genes, CSR float32, {nnz:,} stored values "
          f"({nnz / (n * args.genes):.1%}), {chunk_cells:,} cells per chunk"
          + (f"; file written in {t['write_h5ad']:.1f} s" if t["write_h5ad"] > 1 else ""))
    print(f"cube: {cube.sizes['perturbation']} perturbations x {cube.sizes['feature']} features x "
          f"{cube.sizes['replicate']} replicates, {cube.sizes['control_replicate']} control replicates")
    print(f"raw read of X (workers)          {t['raw_read']:8.1f} s   {n / t['raw_read']:12,.0f} cells/s")
    print(f"import to cube (pseudobulk, sf)  {t['import']:8.1f} s   {n / t['import']:12,.0f} cells/s")
    print(f"ratio import / raw read          {t['import'] / t['raw_read']:8.2f}x")
    print(f"peak cluster process memory      {peak / 2**30:8.2f} GiB")


if __name__ == "__main__":
    main()
