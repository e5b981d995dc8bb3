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

import numpy as np

from nbdask.kernels import transformer as T
from nbdask.kernels.fused import irls_fused, mom_fused
from nbdask.train import prior

from _common import cube_arguments, loaded_cube, machine, pipeline_seconds, statsmodels_fits, timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cube_arguments(ap, size=400, shards=200)
    ap.add_argument("--prior-draws", type=int, default=32768)
    args = ap.parse_args()

    path, cube, a, head = loaded_cube(args)
    n = args.perturbations * args.features
    t: dict[str, float] = {}
    mom_fused(*head), irls_fused(*head), T.transformer_kernel(*head)  # compile, load weights
    with timer("transformer", t):
        out = T.transformer_kernel(*a)
    with timer("mom", t):
        mom = mom_fused(*a)
    irls = irls_fused(*a)
    params, meta = T.load_weights()
    enc = prior.encode(prior.draw(np.random.default_rng(1), args.prior_draws))
    keys = ("tokens_c", "mask_c", "tokens_t", "mask_t", "summary")
    with timer("network", t):  # in the kernel's batches
        for s in range(0, args.prior_draws, T.BATCH):
            T.forward(np, params, meta["config"], *(enc[k][s:s + T.BATCH] for k in keys))
    t["pipeline"] = pipeline_seconds(path, workers=args.workers, warm_perturbations=2,
                                     method="transformer", dispersion="comparison")
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
