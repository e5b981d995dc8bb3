"""Bulk count table + sample sheet into a count cube: layout, size factors, CLI, errors."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbdask
from conftest import deseq2_size_factors
from nbdask.importers.table import STAR_ROWS

SAMPLES = ["ctrl1", "ctrl2", "ctrl3", "A1", "A2", "A3", "B1", "B2"]
CONDITION = ["untreated"] * 3 + ["drugA"] * 3 + ["drugB"] * 2


def bulk(n_genes=40, seed=0):
    """A genes x samples table (NB counts, means 20-500, drugA doubles genes 0-4) and its sheet,
    the sheet's rows shuffled so that order cannot be relied upon."""
    rng = np.random.default_rng(seed)
    mean = np.exp(rng.uniform(np.log(20), np.log(500), n_genes))
    depth = rng.uniform(0.6, 1.6, len(SAMPLES))
    effect = np.ones((n_genes, len(SAMPLES)))
    effect[:5, 3:6] = 2.0
    m = mean[:, None] * depth[None, :] * effect
    counts = rng.poisson(rng.gamma(10.0, m / 10.0))
    table = pd.DataFrame(counts, index=[f"ENSG{j:05d}" for j in range(n_genes)], columns=SAMPLES)
    table.index.name = "gene_id"
    sheet = pd.DataFrame({"sample": SAMPLES, "condition": CONDITION,
                          "batch": ["b1", "b2"] * 4}).sample(frac=1, random_state=1)
    return table, sheet


def write(tmp_path, table, sheet, sep="\t", ext="tsv"):
    counts, samples = tmp_path / f"counts.{ext}", tmp_path / "samples.tsv"
    table.to_csv(counts, sep=sep)
    sheet.to_csv(samples, sep="\t", index=False)
    return counts, samples


@pytest.mark.parametrize("ext", ["tsv", "csv"])
def test_every_treatment_becomes_a_perturbation_against_the_control(tmp_path, ext):
    table, sheet = bulk()
    counts, samples = write(tmp_path, table, sheet, "," if ext == "csv" else "\t", ext)
    cube = nbdask.from_table(counts, samples, group_column="condition", control="untreated")
    assert list(cube.perturbation.values) == ["drugA", "drugB"]
    assert cube.sizes["replicate"] == 3 and cube.sizes["control_replicate"] == 3
    np.testing.assert_array_equal(cube.replicate_sample.values, [["A1", "A2", "A3"], ["B1", "B2", ""]])
    np.testing.assert_array_equal(cube.control_sample.values, ["ctrl1", "ctrl2", "ctrl3"])
    np.testing.assert_array_equal(cube.counts.values[0], table[["A1", "A2", "A3"]].to_numpy())
    np.testing.assert_array_equal(cube.counts.values[1, :, :2], table[["B1", "B2"]].to_numpy())
    assert (cube.counts.values[1, :, 2] == 0).all() and np.isnan(cube.size_factor.values[1, 2])
    np.testing.assert_array_equal(cube.control_counts.values, table[["ctrl1", "ctrl2", "ctrl3"]])
    np.testing.assert_array_equal(cube.feature.values, table.index)
    # DESeq2's median of ratios over all 8 samples, from its definition
    expected = pd.Series(deseq2_size_factors(table.to_numpy()), index=table.columns)
    np.testing.assert_allclose(cube.size_factor.values[0], expected[["A1", "A2", "A3"]], rtol=1e-12)
    np.testing.assert_allclose(cube.size_factor.values[1, :2], expected[["B1", "B2"]], rtol=1e-12)
    np.testing.assert_allclose(cube.control_size_factor.values, expected[["ctrl1", "ctrl2", "ctrl3"]],
                               rtol=1e-12)


def test_dataframes_and_given_size_factors(tmp_path):
    table, sheet = bulk(seed=1)
    given = pd.Series(np.linspace(0.5, 1.5, 8), index=SAMPLES).sample(frac=1, random_state=2)
    cube = nbdask.from_table(table, sheet, group_column="condition", control="untreated",
                             sample_column="sample", size_factors=given, shards=1,
                             store=str(tmp_path / "cube.zarr"))
    assert cube.attrs["nbdask_status"] == "complete" and cube.attrs["size_factors"] == "given"
    assert cube["counts"].encoding["shards"] == (1, 1, 3)
    np.testing.assert_allclose(cube.size_factor.values[0], given[["A1", "A2", "A3"]])
    np.testing.assert_allclose(cube.control_size_factor.values, given[["ctrl1", "ctrl2", "ctrl3"]])
    total = nbdask.from_table(table, sheet, group_column="condition", control="untreated",
                              sample_column="sample", size_factors="total")
    lib = table.sum()
    np.testing.assert_allclose(total.control_size_factor.values,
                               (lib / np.exp(np.log(lib).mean()))[["ctrl1", "ctrl2", "ctrl3"]])


def _run(*args):
    return subprocess.run([sys.executable, "-m", "nbdask.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_import_table_on_the_command_line(tmp_path):
    table, sheet = bulk()
    counts, samples = write(tmp_path, table, sheet)
    cube = tmp_path / "bulk.zarr"
    r = _run("import", "table", counts, cube, "--samples", samples, "--group-column", "condition",
             "--control", "untreated")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    sf = np.r_[nbdask.open_cube(str(cube)).size_factor.values.ravel(),
               nbdask.open_cube(str(cube)).control_size_factor.values]
    sf = sf[np.isfinite(sf)]
    lines = r.stdout.splitlines()
    assert lines[:-2] == [
        "",
        "perturbations        2",
        "features             40",
        "treated replicates   5 (2-3 per perturbation; replicate axis 3)",
        "control replicates   3 (samples ctrl1, ctrl2, ctrl3; control label untreated)",
        "samples used         8 of 8 (0 without a label)",
        f"size factors         ratio: {sf.min():.3g}-{sf.max():.3g}",
    ], r.stdout
    assert re.fullmatch(r"wall time +\d+\.\d s", lines[-2])
    assert lines[-1] == f"{counts} -> {cube}; next: nbdask test {cube} RESULTS.zarr"
    info = _run("info", cube)
    assert info.returncode == 0 and "validation: OK" in info.stdout, info.stdout + info.stderr


def featurecounts(table, path):
    """``table`` as featureCounts writes it: its program line, annotation columns and BAM paths
    as sample names (gzipped when ``path`` ends in .gz)."""
    out = table.copy()
    out.columns = [f"/data/run 1/{s}.bam" for s in table.columns]
    for k, column in enumerate(["Chr", "Start", "End", "Strand", "Length"]):
        out.insert(k, column, ["chr1", 1, 100, "+", 100][k])
    out.index.name = "Geneid"
    text = ('# Program:featureCounts v2.0.6; Command:"featureCounts" "-a" "genes.gtf" "-o" '
            '"counts.txt" "/data/run 1/ctrl1.bam"\n' + out.to_csv(sep="\t"))
    if str(path).endswith(".gz"):
        import gzip

        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        Path(path).write_text(text)


@pytest.mark.parametrize("name", ["counts.txt", "counts.txt.gz"])
def test_featurecounts_output_loads_as_written(tmp_path, name):
    table, sheet = bulk(seed=3)
    featurecounts(table, tmp_path / name)
    sheet.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    cube = nbdask.from_table(tmp_path / name, tmp_path / "samples.tsv", group_column="condition",
                             control="untreated")
    plain = nbdask.from_table(table, sheet, group_column="condition", control="untreated",
                              sample_column="sample")
    for name_ in ("counts", "control_counts", "size_factor", "control_size_factor"):
        np.testing.assert_array_equal(cube[name_].values, plain[name_].values, err_msg=name_)
    np.testing.assert_array_equal(cube.control_sample.values, ["ctrl1", "ctrl2", "ctrl3"])
    assert cube.attrs["dropped_columns"] == ["Chr", "Start", "End", "Strand", "Length"]
    assert cube.attrs["sample_ids_from"] == "file names (/data/run 1/ctrl1.bam -> ctrl1)"


def test_rows_of_reads_assigned_to_no_gene_are_dropped(tmp_path):
    """htseq-count's summary rows (at the end) and STAR's (at the start) are not genes."""
    table, sheet = bulk(seed=4)
    star = pd.DataFrame(7, index=["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"],
                        columns=table.columns)
    htseq = pd.DataFrame(100000, columns=table.columns,
                         index=["__no_feature", "__ambiguous", "__too_low_aQual", "__not_aligned",
                                "__alignment_not_unique"])
    counts, samples = write(tmp_path, pd.concat([star, table, htseq]).rename_axis("gene"), sheet)
    r = _run("import", "table", counts, tmp_path / "cube.zarr", "--samples", samples,
             "--group-column", "condition", "--control", "untreated")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert ("dropped rows         9 of reads assigned to no gene (N_unmapped, N_multimapping, "
            "N_noFeature, N_ambiguous, __no_feature, ...)") in r.stdout.splitlines()
    cube = nbdask.open_cube(str(tmp_path / "cube.zarr"))
    np.testing.assert_array_equal(cube.feature.values, table.index)
    expected = pd.Series(deseq2_size_factors(table.to_numpy()), index=table.columns)
    np.testing.assert_allclose(cube.control_size_factor.values, expected[["ctrl1", "ctrl2", "ctrl3"]],
                               rtol=1e-12)


def test_a_commented_header_is_kept_and_file_names_rename_only_when_needed(tmp_path):
    table, sheet = bulk(seed=5)
    path = tmp_path / "counts.tsv"
    path.write_text("#gene_id\t" + table.to_csv(sep="\t").split("\t", 1)[1])
    cube = nbdask.from_table(path, sheet, group_column="condition", control="untreated",
                             sample_column="sample")
    np.testing.assert_array_equal(cube.feature.values, table.index)
    assert "sample_ids_from" not in cube.attrs and "dropped_rows" not in cube.attrs
    # s1.bam and s1.sam would both be s1: no renaming, and the usual one-line error
    clash = table.set_axis([f"{s}.bam" for s in SAMPLES[:-1]] + [f"{SAMPLES[0]}.sam"], axis=1)
    with pytest.raises(nbdask.SourceError, match="are not columns of counts"):
        nbdask.from_table(clash, sheet, group_column="condition", control="untreated",
                          sample_column="sample")


def test_estimated_counts_are_rounded_only_when_asked(tmp_path, nbdask_main):
    table, sheet = bulk(seed=6)
    estimated = table + np.random.default_rng(6).uniform(-0.5, 0.5, table.shape)
    estimated.iloc[0, 0] = 2.5  # half to even, as R's round and DESeq2's tximport path
    counts, samples = write(tmp_path, estimated, sheet)
    code, out, err = nbdask_main("import", "table", counts, tmp_path / "cube.zarr", "--samples",
                                 samples, "--group-column", "condition", "--control", "untreated")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.rstrip().endswith("can be rounded to integers: round_counts=True, --round"), err
    code, out, err = nbdask_main("import", "table", counts, tmp_path / "cube.zarr", "--samples",
                                 samples, "--group-column", "condition", "--control", "untreated",
                                 "--round")
    assert code == 0 and err == "", err
    changed = int((np.round(estimated) != estimated).to_numpy().sum())
    assert f"rounded              {changed:,} non-integer value(s) to the nearest integer" in out
    cube = nbdask.open_cube(str(tmp_path / "cube.zarr"))
    expected = np.round(estimated)
    assert expected.iloc[0, 0] == 2.0
    np.testing.assert_array_equal(cube.control_counts.values, expected[["ctrl1", "ctrl2", "ctrl3"]])
    np.testing.assert_array_equal(cube.counts.values[0], expected[["A1", "A2", "A3"]])


def test_nf_core_merged_counts_load_with_round(tmp_path, nbdask_main):
    """nf-core/rnaseq's salmon.merged.gene_counts.tsv: gene_id, gene_name, then estimated counts."""
    table, sheet = bulk(seed=7)
    merged = (table + 0.25).assign(gene_name=[f"SYM{j}" for j in range(len(table))])
    merged = merged[["gene_name", *table.columns]]
    counts, samples = write(tmp_path, merged, sheet)
    cube = nbdask.from_table(counts, samples, group_column="condition", control="untreated",
                             round_counts=True)
    assert "dropped_columns" not in cube.attrs  # gene_name became the features' names
    assert cube.attrs["feature_names_from"] == "column gene_name"
    assert cube["feature_name"].values.tolist() == merged["gene_name"].tolist()
    assert cube.attrs["n_rounded"] == table.size
    np.testing.assert_array_equal(cube.control_counts.values, table[["ctrl1", "ctrl2", "ctrl3"]])
    code, out, err = nbdask_main("import", "table", counts, tmp_path / "cube.zarr", "--samples",
                                 samples, "--group-column", "condition", "--control", "untreated",
                                 "--round", "--name-column", "gene_name")
    assert code == 0 and err == "", err
    assert f"feature names        from column gene_name (ids from column {table.index.name})" in out
    # names from a column the user names; a gene without one keeps its id; other text columns
    # are still dropped as annotation
    named = merged.assign(biotype="protein_coding", symbol=[None, *merged["gene_name"][1:]])
    cube = nbdask.from_table(named, sheet, group_column="condition", control="untreated",
                             sample_column="sample", round_counts=True, name_column="symbol")
    assert cube["feature_name"].values.tolist() == [table.index[0], *merged["gene_name"][1:]]
    assert cube.attrs["dropped_columns"] == ["gene_name", "biotype"]
    with pytest.raises(nbdask.SourceError, match=r"^name_column='gene': not a column of counts"):
        nbdask.from_table(named, sheet, group_column="condition", control="untreated",
                          sample_column="sample", round_counts=True, name_column="gene")
    # a numeric column the sheet lacks is a missing sample, not annotation
    with pytest.raises(nbdask.SourceError, match=r"column\(s\) \['C9'\] are not samples"):
        nbdask.from_table(table.assign(C9=1), sheet, group_column="condition", control="untreated",
                          sample_column="sample")


def per_sample_files(tmp_path, table, sheet, *, htseq_rows=True):
    """One htseq-count file per sample in tmp_path/counts/ and a sheet naming them (relative to
    the sheet's folder), the last sample's as a featureCounts run on one sample."""
    (tmp_path / "counts").mkdir()
    files = {}
    for k, sample in enumerate(table.columns):
        files[sample] = f"counts/{sample}.txt"
        if k == len(table.columns) - 1:
            featurecounts(table[[sample]], tmp_path / files[sample])
            continue
        column = table[sample]
        if htseq_rows:
            column = pd.concat([column, pd.Series(
                123, index=["__no_feature", "__ambiguous", "__too_low_aQual", "__not_aligned",
                            "__alignment_not_unique"])])
        column.to_csv(tmp_path / files[sample], sep="\t", header=False)
    sheet = sheet.assign(file=sheet["sample"].map(files))
    sheet.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    return tmp_path / "samples.tsv"


def test_one_count_file_per_sample(tmp_path, monkeypatch):
    table, sheet = bulk(seed=8)
    samples = per_sample_files(tmp_path, table, sheet)
    monkeypatch.chdir(tmp_path / "counts")  # file names are relative to the sheet, not here
    cube = nbdask.from_files(samples, file_column="file", group_column="condition",
                             control="untreated")
    plain = nbdask.from_table(table, sheet, group_column="condition", control="untreated",
                              sample_column="sample")
    for name in ("counts", "control_counts", "size_factor", "control_size_factor"):
        np.testing.assert_array_equal(cube[name].values, plain[name].values, err_msg=name)
    np.testing.assert_array_equal(cube.feature.values, table.index)
    assert len(cube.attrs["dropped_rows"]) == 5
    framed = nbdask.from_files(pd.read_csv(samples, sep="\t"), sample_column="sample",
                               file_column="file", directory=tmp_path, group_column="condition",
                               control="untreated")
    np.testing.assert_array_equal(framed.counts.values, plain.counts.values)
    r = _run("import", "files", samples, tmp_path / "cube.zarr", "--file-column", "file",
             "--group-column", "condition", "--control", "untreated")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines()[-1] == (f"{samples} -> {tmp_path / 'cube.zarr'}; next: nbdask "
                                         f"test {tmp_path / 'cube.zarr'} RESULTS.zarr")


@pytest.mark.parametrize("column", [2, 3, 4])
def test_star_reads_per_gene_files_take_the_column_asked_for(tmp_path, column):
    """STAR's ReadsPerGene.out.tab: its 4 rows of no gene first, then unstranded, forward and
    reverse counts; --count-column picks one, as cut -f would."""
    table, sheet = bulk(seed=10)
    strands = {2: table, 3: table // 2, 4: table * 3}
    (tmp_path / "star").mkdir()
    for sample in table.columns:
        star = pd.DataFrame({k: v[sample] for k, v in strands.items()})
        head = pd.DataFrame({k: [9, 8, 7, 6] for k in strands}, index=list(STAR_ROWS))
        pd.concat([head, star]).to_csv(tmp_path / "star" / f"{sample}.tab", sep="\t", header=False)
    sheet = sheet.assign(file=[f"star/{s}.tab" for s in sheet["sample"]])
    cube = nbdask.from_files(sheet, sample_column="sample", file_column="file",
                             directory=tmp_path, count_column=column,
                             group_column="condition", control="untreated")
    chosen = strands[column]
    np.testing.assert_array_equal(cube.control_counts.values, chosen[["ctrl1", "ctrl2", "ctrl3"]])
    np.testing.assert_array_equal(cube.counts.values[0], chosen[["A1", "A2", "A3"]])
    assert cube.attrs["dropped_rows"] == list(STAR_ROWS)


def test_count_file_errors_are_one_line(tmp_path, nbdask_main):
    table, sheet = bulk(seed=9)
    samples = per_sample_files(tmp_path, table, sheet, htseq_rows=False)
    cli = ["import", "files", samples, tmp_path / "cube.zarr", "--group-column", "condition",
           "--control", "untreated"]

    def error(*extra):
        code, out, err = nbdask_main(*cli, *extra)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        return err

    assert "file_column='path': not a column of" in error("--file-column", "path")
    code, out, err = nbdask_main(*cli[:4], "--file-column", "file", "--group-column", "Condition",
                                 "--control", "untreated")
    assert code == 2 and f"group_column='Condition': not a column of {samples} " in err, err
    first = tmp_path / "counts" / "ctrl1.txt"
    first.write_text("\n".join(first.read_text().splitlines()[:-1]) + "\n")  # one gene short
    assert "list different genes (1 in one only, e.g. ['ENSG00039'])" in error("--file-column", "file")
    pd.DataFrame({"u": 1, "f": 2, "r": 3}, index=table.index).to_csv(first, sep="\t", header=False)
    assert "3 count columns; pick one with count_column (--count-column; STAR's" in error(
        "--file-column", "file")
    assert "count_column=9: " in error("--file-column", "file", "--count-column", "9")
    text = table["ctrl1"].astype(str)
    text.iloc[2] = ""  # an empty cell is no count
    text.to_csv(first, sep="\t", header=False)
    assert "at gene 'ENSG00002' is not a number" in error("--file-column", "file")
    pd.concat([table["ctrl1"], table["ctrl1"].iloc[:1]]).to_csv(first, sep="\t", header=False)
    assert "gene id(s) ['ENSG00000'] appear more than once" in error("--file-column", "file")
    first.unlink()
    assert "ctrl1.txt: no such file; pass the count file" in error("--file-column", "file")
    assert not (tmp_path / "cube.zarr").exists()


def test_every_table_error_is_one_line_with_its_fix(tmp_path, nbdask_main):
    """Two cases (a missing file, a bad value read from the table) through the console's process
    (its whole stderr); the others through the CLI's main() here."""
    table, sheet = bulk()
    counts, samples = write(tmp_path, table, sheet)
    variants = {
        "missing.tsv": table.drop(columns=["B2"]),
        "extra.tsv": table.assign(C1=table["A1"]),
        "dupgenes.tsv": pd.concat([table, table.iloc[:1]]),
        "fraction.tsv": table.astype(float).assign(A2=table["A2"] / 3),
        "negative.tsv": table.assign(B1=-table["B1"]),
    }
    for name, frame in variants.items():
        frame.to_csv(tmp_path / name, sep="\t")
    one_control = tmp_path / "one_control.tsv"
    sheet.assign(condition=sheet["condition"].replace({"untreated": "drugB"}).where(
        sheet["sample"] != "ctrl1", "untreated")).to_csv(one_control, sep="\t", index=False)
    dup_sheet = tmp_path / "dup_sheet.tsv"
    pd.concat([sheet, sheet.iloc[:1]]).to_csv(dup_sheet, sep="\t", index=False)

    def case(table_file, *extra, sheet_file=samples, control="untreated"):
        return ["import", "table", tmp_path / table_file, tmp_path / "out.zarr", "--samples",
                sheet_file, "--group-column", "condition", "--control", control, *extra]

    cases = {
        "sheet sample missing from the table": (
            case("missing.tsv"), "sample(s) ['B2'] are not columns of", "drop those rows"),
        "table column missing from the sheet": (
            case("extra.tsv"), "column(s) ['C1'] are not samples in", "add them to the sheet"),
        "duplicated gene ids": (case("dupgenes.tsv"), "gene id(s) ['ENSG00000'] appear more than once",
                                "give every row its own gene id"),
        "duplicated sample ids": (case("counts.tsv", sheet_file=dup_sheet),
                                  "sample id(s) ['", "give every sample one row"),
        "missing group column": (case("counts.tsv")[:-4] + ["--group-column", "treatment",
                                                            "--control", "untreated"],
                                 "group_column='treatment': not a column of", "condition"),
        "control absent": (case("counts.tsv", control="DMSO"),
                           "control: 'DMSO' is not a value of 'condition'", "--control untreated"),
        "one control sample": (case("counts.tsv", sheet_file=one_control),
                               "only 1 sample(s) are labelled 'untreated'", "add control samples"),
        "non-integer": (case("fraction.tsv"), "non-integer value(s), e.g. ", "raw read counts"),
        "negative": (case("negative.tsv"), "negative value(s), e.g. ", "raw read counts"),
        "no such table": (case("nothere.tsv"), "nothere.tsv: no such file", "count table"),
    }
    in_a_process = ("non-integer", "no such table")
    runs = {name: subprocess.Popen([sys.executable, "-m", "nbdask.cli", *map(str, cases[name][0])],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in in_a_process}
    results = {name: nbdask_main(*args) for name, (args, *_) in cases.items()
               if name not in in_a_process}
    for name, run in runs.items():
        out, err = run.communicate(timeout=300)
        results[name] = (run.returncode, out, err)
    for name, (args, problem, fix) in cases.items():
        code, out, err = results[name]
        assert code == 2 and out == "", (name, out, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("nbdask import: error: "), (name, err)
        assert problem in lines[0] and fix in lines[0], (name, lines[0])
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("words", [["import"], ["import", "anndata"], ["import", "table"],
                                   ["import", "files"]])
def test_import_help_ends_with_an_example(words, capsys):
    from nbdask.cli import main

    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    tail = "\n".join(lines[-7:])
    assert re.search(r"examples?:\n  nbdask import ", tail) and lines[-1].startswith("      --"), tail


REALDATA = Path(__file__).resolve().parent / "fixtures" / "realdata"


@pytest.mark.parametrize("dataset, contrast, column, control", [
    ("airway", "airway_dex", "dex", "untrt"), ("pasilla", "pasilla_knockdown", "condition", "untreated")])
def test_size_factors_equal_deseq2s_on_real_counts(dataset, contrast, column, control):
    """DESeq2's own sizeFactors (R, committed with the fixtures) for every sample of the table."""
    cube = nbdask.from_table(REALDATA / f"{dataset}_counts.tsv.gz", REALDATA / f"{dataset}_samples.tsv",
                             group_column=column, control=control)
    reference = pd.read_csv(REALDATA / "size_factors.tsv", sep="\t")
    reference = reference[reference["contrast"] == contrast].set_index("sample")["deseq2_size_factor"]
    got = dict(zip(cube.control_sample.values, cube.control_size_factor.values))
    got.update((s, f) for s, f in zip(cube.replicate_sample.values[0], cube.size_factor.values[0]) if s)
    assert sorted(got) == sorted(reference.index)
    np.testing.assert_allclose([got[s] for s in reference.index], reference.values, rtol=1e-10)
