"""The default beside DESeq2 and edgeR on simulated trended cubes, at matched false-positive rate.

The cubes and the DESeq2/edgeR results are fixtures made once by ``tests/fixtures/simulated/
export_cubes.py`` and ``reference.R`` (see its README): ``nbdask.bench.generator.trended_cube``
draws (DESeq2-type mean-dispersion trend, log-normal scatter around it, 10% of the comparisons
with an effect), two seeds per design: bulk 2 vs 2, 3 vs 3, 5 vs 5, and 10 perturbations x 3
replicates sharing one control group of 3. Every tool is given the same size factors; nbdask
enters through the bulk door (``nbdask.from_table``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbdask

DATA = Path(__file__).parent / "fixtures" / "simulated"
EXPERIMENTS = pd.read_csv(DATA / "experiments.tsv", sep="\t").set_index("experiment")
SAMPLES = pd.read_csv(DATA / "samples.tsv", sep="\t")
DESIGNS = list(dict.fromkeys(EXPERIMENTS["design"]))
#: The references' p-value and adjusted p-value columns in reference_results.tsv.gz.
REFERENCES = {"DESeq2": ("deseq2_pvalue", "deseq2_padj"), "edgeR QL": ("edger_ql_pvalue", "edger_ql_fdr"),
              "edgeR exact": ("edger_exact_pvalue", "edger_exact_fdr")}
ALPHA, LEVEL = 0.05, 0.1
#: The issue's band for the null rate at p < ALPHA, where a test can reach ALPHA (true mean >= 3).
BAND = (0.04, 0.06)
MEAN_BINS = [0.0, 1.0, 3.0, 10.0, 100.0, np.inf]
#: nbdask's power at matched FPR over DESeq2's and edgeR QL's: measured 1.01-1.04 (DESeq2) and
#: 1.07-1.28 (edgeR QL, whose filterByExpr leaves 26-39% of the features untested) over every
#: comparison, 1.00-1.02 and 1.00 on the features edgeR keeps; the bound leaves 5%.
POWER_RATIO = 0.95


def experiment_cube(name):
    """The experiment's table and sample sheet through ``nbdask.from_table``, with its size factors."""
    sheet = SAMPLES[SAMPLES["experiment"] == name].set_index("sample")
    table = pd.read_csv(DATA / f"{name}_counts.tsv.gz", sep="\t", index_col=0)[list(sheet.index)]
    return nbdask.from_table(table, sheet[["group"]], group_column="group", control="control",
                             size_factors=sheet["size_factor"])


def comparisons() -> pd.DataFrame:
    """Every (experiment, perturbation, feature) comparison: truth, the feature's true mean and
    dispersion, and the references' p-values and adjusted p-values (NaN where a tool gives none)."""
    key = ["experiment", "perturbation", "feature"]
    truth = pd.read_csv(DATA / "truth.tsv.gz", sep="\t")
    features = pd.read_csv(DATA / "features.tsv.gz", sep="\t")
    ref = pd.read_csv(DATA / "reference_results.tsv.gz", sep="\t")
    table = truth.merge(features, on=["experiment", "feature"]).merge(ref, on=key, how="left")
    table["design"] = EXPERIMENTS.loc[table["experiment"], "design"].to_numpy()
    return table.set_index(key)


def nbdask_columns(name, **options) -> pd.DataFrame:
    """nbdask's p- and q-values for an experiment, indexed like ``comparisons()``."""
    res = nbdask.test(experiment_cube(name), **options)
    index = pd.MultiIndex.from_product([[name], res["perturbation"].values.astype(str),
                                        res["feature"].values.astype(str)], names=["experiment", "perturbation",
                                                                                   "feature"])
    return pd.DataFrame({"p": res["p_value"].values.ravel(), "q": res["q_value"].values.ravel()}, index=index)


def _rate(hit, cluster):
    """A share of comparisons and its standard error, clustered by feature (a feature's
    comparisons share its control samples)."""
    hit = np.asarray(hit, float)
    r = hit.mean() if hit.size else np.nan
    sums = pd.DataFrame({"x": hit, "c": cluster}).groupby("c")["x"].agg(["sum", "size"])
    se = np.sqrt(((sums["sum"] - r * sums["size"]) ** 2).sum()) / max(hit.size, 1)
    return float(r), float(se)


def design_metrics(p, q, lfc, mean, cluster) -> dict:
    """One method on one design (arrays over its comparisons; NaN p or q = not rejected).

    ``fpr``/``fpr_se``: null comparisons (lfc = 0) with p < ALPHA; ``fpr3``: the same over the
    nulls whose feature has a true mean of at least 3 counts (where a test can reach ALPHA);
    ``power_matched``: effects rejected at the method's own threshold that rejects ALPHA of the
    nulls (p < the (ALPHA n0 + 1)-th smallest null p, so at most ALPHA n0 nulls under ties);
    ``fdp``/``fdp_se`` (binomial over the calls) and ``power``: at q < LEVEL.
    """
    p = np.where(np.isnan(p), np.inf, p)
    q = np.where(np.isnan(q), np.inf, q)
    null = lfc == 0
    fpr, fpr_se = _rate(p[null] < ALPHA, cluster[null])
    fpr3, fpr3_se = _rate(p[null & (mean >= 3)] < ALPHA, cluster[null & (mean >= 3)])
    k = int(np.floor(ALPHA * null.sum()))
    threshold = np.sort(p[null])[k]
    hit = q < LEVEL
    fdp = (hit & null).sum() / max(hit.sum(), 1)
    return {"fpr": fpr, "fpr_se": fpr_se, "fpr3": fpr3, "fpr3_se": fpr3_se,
            "power_matched": float(np.mean(p[~null] < threshold)),
            "fdp": float(fdp), "fdp_se": float(np.sqrt(fdp * (1 - fdp) / max(hit.sum(), 1))),
            "power": float(np.mean(hit[~null])), "calls": int(hit.sum())}


def metrics_table(table: pd.DataFrame, methods: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """``design_metrics`` for every design (pooled over its experiments) and method (its p and q columns)."""
    rows = []
    for design, sub in table.groupby("design", sort=False):
        cluster = (sub.index.get_level_values("experiment") + "/"
                   + sub.index.get_level_values("feature")).to_numpy()
        for method, (pc, qc) in methods.items():
            rows.append({"design": design, "method": method,
                         **design_metrics(sub[pc].to_numpy(float), sub[qc].to_numpy(float),
                                          sub["true_log_fold_change"].to_numpy(float),
                                          sub["true_mean"].to_numpy(float), cluster)})
    return pd.DataFrame(rows)


def measure(table: pd.DataFrame, settings: dict[str, dict]) -> dict[str, pd.DataFrame]:
    """nbdask under each of ``settings`` (label -> options of ``nbdask.test``) beside the references:
    ``metrics_table`` over every comparison ("all") and over the features edgeR's ``filterByExpr``
    keeps ("kept", where every tool gives a p-value), indexed by (design, method); "table": the
    comparisons with nbdask's p- and q-values as ``<label>_p``/``<label>_q``."""
    methods = {}
    for label, options in settings.items():
        ours = pd.concat([nbdask_columns(name, **options) for name in EXPERIMENTS.index])
        table = table.join(ours.add_prefix(f"{label}_"))
        methods[label] = (f"{label}_p", f"{label}_q")
    methods.update(REFERENCES)
    kept = table["edger_ql_pvalue"].notna()
    return {"all": metrics_table(table, methods).set_index(["design", "method"]),
            "kept": metrics_table(table[kept], methods).set_index(["design", "method"]),
            "table": table}


@pytest.fixture(scope="module")
def default():
    return measure(comparisons(), {"nbdask": {}})


def _null_rate_bins(table):
    """nbdask's null rate at p < ALPHA (and its SE) per design and true-mean bin: [(design, bin, rate, se)]."""
    null = table[table["true_log_fold_change"] == 0]
    out = []
    for (design, label), sub in null.groupby([null["design"], pd.cut(null["true_mean"], MEAN_BINS)],
                                             observed=True, sort=False):
        cluster = (sub.index.get_level_values("experiment") + "/" + sub.index.get_level_values("feature")).to_numpy()
        out.append((design, label, *_rate(sub["nbdask_p"].fillna(1.0).to_numpy() < ALPHA, cluster)))
    return out


@pytest.mark.parametrize("design", DESIGNS)
def test_power_at_matched_fpr_matches_deseq2_and_edger(design, default):
    for subset in ("all", "kept"):
        m = default[subset].loc[design]
        print(f"\n{design} ({subset}): power at matched FPR "
              + ", ".join(f"{k} {v:.3f}" for k, v in m["power_matched"].items()))
        for ref in ("DESeq2", "edgeR QL"):
            assert m.loc["nbdask", "power_matched"] >= POWER_RATIO * m.loc[ref, "power_matched"], (subset, ref)


@pytest.mark.parametrize("design", DESIGNS)
def test_null_rate_holds_its_level_and_fdp_its_bound(design, default):
    m = default["all"].loc[(design, "nbdask")]
    print(f"\n{design}: FPR {m['fpr']:.4f} +- {m['fpr_se']:.4f}, mean >= 3: {m['fpr3']:.4f} +- "
          f"{m['fpr3_se']:.4f}; FDP {m['fdp']:.4f} +- {m['fdp_se']:.4f}")
    assert m["fpr"] <= BAND[1] + 2 * m["fpr_se"]
    assert BAND[0] - 2 * m["fpr3_se"] <= m["fpr3"] <= BAND[1] + 2 * m["fpr3_se"]
    assert m["fdp"] <= LEVEL + 2 * m["fdp_se"]
    for d, label, rate, se in _null_rate_bins(default["table"]):
        if d == design and label.left >= 3:
            assert BAND[0] - 2 * se <= rate <= BAND[1] + 2 * se, (label, rate, se)


def test_the_claims_fail_without_the_trend_prior():
    """The previous default (no borrowing across features) breaks the level on the bulk designs."""
    m = measure(comparisons(), {"nbdask": {"dispersion_prior": "none"}})["all"]
    for design in ("bulk_2v2", "bulk_3v3"):
        row = m.loc[(design, "nbdask")]
        assert row["fpr3"] > BAND[1] + 2 * row["fpr3_se"]
        assert row["fdp"] > LEVEL + 2 * row["fdp_se"]
