"""The pre-trained transformer vs statsmodels ML and MoM, side by side on the same cube.

Prints statsmodels' discrete NegativeBinomial time per fit (a sample of fits), the transformer's
time per comparison batched in memory (the block kernel on a 4 vs 8 cube, and the bare network on
prior draws padded to 10 vs 10, its worst case) and through the pipeline (Zarr -> transformer +
BH -> Zarr on a LocalCluster), MoM's in-memory time, the ratios, and the accuracy of each
estimator against the cube's simulated truth.

    python benchmarks/transformer.py --perturbations 400 --features 400 --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

import numpy as np

import nbdask
from nbdask.cluster import local_cluster
from nbdask.kernels import transformer as T
from nbdask.kernels.fused import mom_fused, irls_fused
from nbdask.train import prior

from _common import cached_cube, machine, statsmodels_fits, timer

INPUTS = ("counts", "size_factor", "control_counts", "control_size_factor")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--perturbations", type=int, default=400)
    ap.add_argument("--features", type=int, default=400)
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--statsmodels-fits", type=int, default=200)
    ap.add_argument("--prior-draws", type=int, default=32768)
    args = ap.parse_args()
    from distributed import Client

    path = cached_cube(args.perturbations, args.features, shards=args.shards)
    n = args.perturbations * args.features
    cube = nbdask.open_cube(path).load()
    a = [cube[v].values for v in INPUTS]
    t: dict[str, float] = {}
    small = [x[:2] if k in (0, 1) else x for k, x in enumerate(a)]
    mom_fused(*small), irls_fused(*small), T.transformer_kernel(*small)  # compile, load weights
    with timer("transformer", t):
        out = T.transformer_kernel(*a)
    with timer("mom", t):
        mom = mom_fused(*a)
    irls = irls_fused(*a)
    params, meta = T.load_weights()
    enc = prior.encode(prior.draw(np.random.default_rng(1), args.prior_draws))
    with timer("network", t):
        T.forward(np, params, meta["config"], enc["tokens_c"], enc["mask_c"], enc["tokens_t"],
                  enc["mask_t"], enc["summary"])
    out_dir = tempfile.mkdtemp(prefix="nbdask-bench-")
    try:
        with local_cluster(workers=args.workers) as cluster, Client(cluster) as client:
            warm = nbdask.test(nbdask.open_cube(path).isel(perturbation=slice(0, 2)),
                               method="transformer", dispersion="comparison")
            warm["p_value"].data.sum().compute()
            with timer("pipeline", t):
                nbdask.save_results(nbdask.test(nbdask.open_cube(path), method="transformer",
                                                dispersion="comparison"),
                                    out_dir + "/r.zarr", client=client)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    per_fit, failed = statsmodels_fits(cube, args.statsmodels_fits)
    per = {k: t[k] / n for k in ("transformer", "mom", "pipeline")}
    per["network"] = t["network"] / args.prior_draws
    print(f"nbdask transformer benchmark ({machine()}, {args.workers} workers; "
          f"{meta['parameters']:,}-parameter network)")
    print(f"cube: {args.perturbations} x {args.features} = {n:,} comparisons, 4 vs 8 replicates")
    print(f"statsmodels NegativeBinomial (newton)     {per_fit * 1e3:9.3f} ms/fit ({args.statsmodels_fits} fits, {failed} failed)")
    print(f"transformer kernel, in memory (4 v 8)      {per['transformer'] * 1e6:9.2f} us/comparison")
    print(f"transformer network, prior draws (10 v 10) {per['network'] * 1e6:9.2f} us/comparison ({args.prior_draws:,} draws)")
    print(f"transformer pipeline Zarr -> Zarr          {per['pipeline'] * 1e6:9.2f} us/comparison ({t['pipeline']:.1f} s)")
    print(f"MoM fused kernel, in memory                {per['mom'] * 1e6:9.3f} us/comparison")
    print("speed-up over statsmodels (time per fit / time per comparison)")
    for label, key in (("transformer kernel", "transformer"), ("transformer network, 10 v 10", "network"),
                       ("transformer pipeline", "pipeline"), ("MoM kernel", "mom")):
        print(f"  {label:<30}{per_fit / per[key]:10,.0f}x")
    print(f"  MoM kernel vs transformer kernel{per['transformer'] / per['mom']:8,.0f}x")
    truth = {"log_fold_change": cube["true_log_fold_change"].values,
             "log_dispersion": np.broadcast_to(cube["true_log_dispersion"].values, out["log_dispersion"].shape)}
    print("MAE against the simulated truth on this cube (log fold change, log dispersion)")
    for name, est in (("transformer", out), ("MoM (per comparison)", mom), ("IRLS (ML)", irls)):
        err = [float(np.nanmean(np.abs(np.asarray(est[k], float) - truth[k]))) for k in truth]
        print(f"  {name:<22}{err[0]:8.3f}{err[1]:8.3f}")


if __name__ == "__main__":
    main()
