"""Dispersion borrowed across features: the new default beside the old ones, on real and simulated data.

Part 1, real RNA-seq (tests/fixtures/realdata: airway, pasilla, Marioni, Li; DESeq2's size factors
given to nbdask): genes called at q < 0.1 by nbdask's default (``dispersion_prior="trend"``),
the previous default (``dispersion_prior="none"``: pooled over perturbations only), the paper's
per-comparison Wald test, DESeq2, edgeR's quasi-likelihood F-test and edgeR's exact test; for
the treatments, the share of DESeq2's genes recovered.

Part 2, simulated cubes around a mean-dispersion trend (``nbdask.bench.generator.trended_cube``:
log-normal scatter 0.8, median-of-ratios size factors): per design, the null rate at p < 0.05 and
p < 0.001 over features with mean >= 3 counts (as a multiple of the level), the same for the
exact test at the true dispersion (oracle), and the FDP and power at q < 0.1 with 10% effects.

Part 3, the committed simulated cubes beside DESeq2 and edgeR (tests/fixtures/simulated: trended
cubes, bulk 2v2/3v3/5v5 and 10 perturbations x 3v3, two seeds each, every tool given the same size
factors): per design, the null rate at p < 0.05 over all null comparisons and over those with a
true mean >= 3 counts (with SEs clustered by feature), the power at a matched FPR of 0.05 (each
method's own 5% quantile of its null p-values; a missing p-value is not a rejection) over every
comparison and over the features edgeR's filterByExpr keeps, and the FDP and power at q < 0.1.

    python benchmarks/borrowing.py [--features 20000] [--seeds 2] [--parts 1,2,3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import nbdask
from nbdask.bench.generator import trended_cube
from nbdask.kernels.exact import conditional_outputs
from nbdask.kernels.mom import mom_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_realdata import CONTRASTS, DATA, contrast_cube  # noqa: E402
from test_simulated_reference import comparisons, measure  # noqa: E402

from _common import machine  # noqa: E402

SETTINGS = {"default": {}, "prior none": {"dispersion_prior": "none"},
            "paper (comparison, wald)": {"dispersion": "comparison", "test": "wald"}}
DESIGNS = {"bulk 2v2": (1, 2, 2), "bulk 3v3": (1, 3, 3), "bulk 5v5": (1, 5, 5),
           "10 x 3v3": (10, 3, 3), "1000 x 3v6": (1000, 3, 6)}


def real_data() -> None:
    ref = pd.read_csv(DATA / "reference_results.tsv.gz", sep="\t")
    print(f"{'contrast':<26}{'kind':<10}" + "".join(f"{s:>26}" for s in SETTINGS)
          + f"{'DESeq2':>8}{'edgeR QL':>10}{'edgeR exact':>12}")
    for name, row in CONTRASTS.iterrows():
        cube = contrast_cube(name)
        r = ref[ref["contrast"] == name].set_index("gene").reindex(cube["feature"].values)
        deseq2 = (r["deseq2_padj"] < 0.1).to_numpy()
        cells = []
        for opts in SETTINGS.values():
            q = nbdask.test(cube, **opts)["q_value"].values[0]
            n = int((q < 0.1).sum())
            cells.append(f"{n} ({np.mean(q[deseq2] < 0.1):.0%})" if row["kind"] == "treatment" else str(n))
        print(f"{name:<26}{row['kind']:<10}" + "".join(f"{c:>26}" for c in cells)
              + f"{row['deseq2_q10']:>8}{row['edger_ql_q10']:>10}{row['edger_exact_q10']:>12}", flush=True)
    print("(treatments: genes called, and in brackets the share of DESeq2's genes among them)")


def rates(p, mean):
    sel = mean >= 3
    return [float(np.nanmean(p[:, sel] < a)) / a for a in (0.05, 0.001)]


def simulations(features: int, seeds: int) -> None:
    print(f"\n{'design':<14}{'setting':<26}{'FPR.05/0.05':>12}{'FPR.001/0.001':>15}{'FDP q<.1':>10}{'power':>8}")
    for design, (p_, r, c) in DESIGNS.items():
        g = max(200, features // p_ if p_ > 1 else features)
        g = min(g, features)
        table: dict[str, list] = {}
        for seed in range(seeds):
            rng = np.random.default_rng(1000 + seed)
            null = trended_cube(rng, perturbations=p_, features=g, replicates=r, control_replicates=c)
            alt = trended_cube(rng, perturbations=p_, features=g, replicates=r, control_replicates=c,
                               effect_fraction=0.1)
            mean = np.exp(null["true_log_base_mean"].values)
            truth = alt["true_log_fold_change"].values != 0
            for label, opts in SETTINGS.items():
                p0 = nbdask.test(null, fdr="none", **opts)["p_value"].values
                q1 = nbdask.test(alt, **opts)["q_value"].values
                hit = q1 < 0.1
                table.setdefault(label, []).append(rates(p0, mean) + [
                    (hit & ~truth).sum() / max(hit.sum(), 1), (hit & truth).sum() / truth.sum()])
            arrays = [null[v].values for v in ("counts", "size_factor", "control_counts", "control_size_factor")]
            est = mom_kernel(*arrays, feature_dispersion=np.exp(null["true_log_dispersion"].values.astype(float)))
            oracle = conditional_outputs(est, *arrays, test="auto")["p_value"]
            table.setdefault("oracle (true phi)", []).append(rates(oracle, mean) + [np.nan, np.nan])
        for label, values in table.items():
            v = np.nanmean(np.asarray(values, float), axis=0)
            fdp = "" if np.isnan(v[2]) else f"{v[2]:.3f}"
            power = "" if np.isnan(v[3]) else f"{v[3]:.3f}"
            print(f"{design:<14}{label:<26}{v[0]:>12.2f}{v[1]:>15.2f}{fdp:>10}{power:>8}", flush=True)


def references_on_simulations() -> None:
    m = measure(comparisons(), {f"nbdask {k}": v for k, v in SETTINGS.items()})
    kept = m["kept"]["power_matched"]
    print(f"\n{'design':<15}{'method':<32}{'FPR .05 (all)':>16}{'FPR .05 (mean>=3)':>19}"
          f"{'power@FPR.05':>14}{'(edgeR kept)':>14}{'FDP q<.1':>16}{'power q<.1':>12}")
    for (design, method), r in m["all"].iterrows():
        print(f"{design:<15}{method:<32}{r['fpr']:>9.4f} ±{r['fpr_se']:.4f}{r['fpr3']:>12.4f} ±{r['fpr3_se']:.4f}"
              f"{r['power_matched']:>14.3f}{kept[(design, method)]:>14.3f}{r['fdp']:>9.3f} ±{r['fdp_se']:.3f}"
              f"{r['power']:>12.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=int, default=20000, help="features of the bulk designs")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--skip-real", action="store_true", help="leave part 1 out (as --parts 2,3)")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 3")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")} - ({1} if args.skip_real else set())
    print(f"nbdask dispersion borrowing benchmark ({machine()})")
    start = time.perf_counter()
    if 1 in parts:
        real_data()
    if 2 in parts:
        simulations(args.features, args.seeds)
    if 3 in parts:
        references_on_simulations()
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
