"""Which cells (or bulk samples) become which replicate of the cube.

Each (perturbation, sample) pair with at least ``min_cells`` cells is one treated replicate; the
cells of the control label(s) in one sample are one control replicate. A perturbation's kept
samples fill its replicate slots in sample order; the replicate axis is as long as the largest
perturbation needs, and the slots a perturbation does not fill are absent (design §2). A bulk
table is the same with one "cell" per sample.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import OptionError, SourceError


@dataclass(frozen=True)
class Groups:
    """The cube's layout and each cell's destination row.

    Rows of the pseudobulk are numbered ``p * R + r`` for treated replicate r of perturbation p
    and ``P * R + c`` for control replicate c; ``row`` holds each cell's row, -1 for cells that
    go nowhere (unlabelled, or in a group below ``min_cells``).
    """

    perturbation: np.ndarray        # (P,) str labels
    replicate_sample: np.ndarray    # (P, R) str, "" where absent
    replicate_cells: np.ndarray     # (P, R) int64 cells summed, 0 where absent
    control_sample: np.ndarray      # (C,) str
    control_cells: np.ndarray       # (C,) int64
    row: np.ndarray                 # (n_obs,) int64
    summary: dict = field(default_factory=dict)

    @property
    def present(self) -> np.ndarray:
        return self.replicate_cells > 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(P, R, C)."""
        return (*self.replicate_sample.shape, len(self.control_sample))


def _categorical(values, key: str) -> pd.Categorical:
    cat = values.array if isinstance(values, pd.Series) else values
    if not isinstance(cat, pd.Categorical):
        cat = pd.Categorical(np.asarray(values, dtype=object))
    if len(cat.categories) and not all(isinstance(c, str) for c in cat.categories):
        cat = cat.rename_categories([str(c) for c in cat.categories])
    if not cat.categories.is_unique:
        raise SourceError(f"{key}: labels {cat.categories[cat.categories.duplicated()][:3].tolist()} "
                          f"collide once written as text; give them distinct names")
    return cat


def _examples(labels, n: int = 5) -> str:
    labels = list(labels)
    more = f", ... ({len(labels)} in all)" if len(labels) > n else ""
    return ", ".join(repr(x) for x in labels[:n]) + more


def assign_groups(perturbation, sample, *, control, min_cells: int = 1,
                  perturbation_key: str = "perturbation", sample_key: str = "sample",
                  unit: str = "cell") -> Groups:
    """Lay out replicates from one perturbation label and one sample label per cell.

    ``control`` is one label or several (pooled into one control group per sample); missing
    labels (NaN) leave a cell out. Raises ``SourceError`` when the controls are absent, found in
    no sample, or fill fewer than 2 control replicates, and when no treated group is left.
    """
    if int(min_cells) < 1:
        raise OptionError(f"min_cells={min_cells}: must be >= 1")
    controls = [control] if isinstance(control, str) else [str(c) for c in control]
    if not controls:
        raise OptionError("control: give at least one control label")
    pert = _categorical(perturbation, perturbation_key)
    samp = _categorical(sample, sample_key)
    if len(pert) != len(samp):
        raise SourceError(f"{perturbation_key} has {len(pert)} entries but {sample_key} has "
                          f"{len(samp)}; give one of each per {unit}")
    pc, sc = pert.codes.astype(np.int64), samp.codes.astype(np.int64)
    n_p, n_s = len(pert.categories), len(samp.categories)
    seen = np.bincount(pc[pc >= 0], minlength=n_p) > 0
    labels = np.asarray(pert.categories, dtype=object)
    present = [str(x) for x in labels[seen]]
    missing = [c for c in controls if c not in set(present)]
    if missing:
        like = difflib.get_close_matches(missing[0], present, n=3, cutoff=0.5) or [
            x for x in present if re.search(r"(?i)ntc|non.?target|control|ctrl|scram|safe|untreat", x)
        ][:3] or present[:1]
        raise SourceError(f"control: {_examples(missing)} is not a value of {perturbation_key!r} "
                          f"(its values include {_examples(present)}); pass the label(s) of the "
                          f"control {unit}s, e.g. {' '.join(f'--control {x}' for x in sorted(like))}")
    is_control_label = np.isin(labels, controls)
    labelled = (pc >= 0) & (sc >= 0)
    is_control = labelled & is_control_label[np.maximum(pc, 0)]
    treated = labelled & ~is_control

    control_n = np.bincount(sc[is_control], minlength=n_s)
    if not control_n.any():
        raise SourceError(f"control: the {unit}s labelled {_examples(controls)} have no "
                          f"{sample_key!r} label, so they are present in no sample; label them "
                          f"with their sample (a control replicate is one sample's control {unit}s)")
    keep_c = control_n >= min_cells
    if keep_c.sum() < 2 and unit == "sample":
        raise SourceError(f"control: only {int(keep_c.sum())} sample(s) are labelled "
                          f"{_examples(controls)} in {perturbation_key!r}; at least 2 control "
                          f"replicates are needed to estimate dispersion: add control samples")
    if keep_c.sum() < 2:
        found = ", ".join(f"{s!r}: {n}" for s, n in zip(samp.categories, control_n) if n)
        raise SourceError(f"control: only {int(keep_c.sum())} sample(s) have >= {min_cells} "
                          f"control {unit}s ({found}); at least 2 control replicates are needed to "
                          f"estimate dispersion: lower min_cells (--min-cells) or add control samples")

    group_n = np.bincount(pc[treated] * n_s + sc[treated], minlength=n_p * n_s).reshape(n_p, n_s)
    has_cells = (group_n.sum(axis=1) > 0) & ~is_control_label
    group_n, names = group_n[has_cells], labels[has_cells]
    keep_t = group_n >= min_cells
    n_rep = int(keep_t.sum(axis=1).max()) if len(names) else 0
    if n_rep == 0:
        raise SourceError(f"{perturbation_key}: no treated (perturbation, sample) group has "
                          f">= {min_cells} {unit}s (largest: {int(group_n.max()) if group_n.size else 0}); "
                          f"lower min_cells (--min-cells)")
    n_pert = len(names)
    slot = np.cumsum(keep_t, axis=1) - 1
    pert_index = np.full(n_p, -1)
    pert_index[has_cells] = np.arange(n_pert)
    row_of_group = np.full((n_p, n_s), -1, dtype=np.int64)
    row_of_group[has_cells] = np.where(keep_t, np.arange(n_pert)[:, None] * n_rep + slot, -1)
    row_of_control = np.where(keep_c, n_pert * n_rep + np.cumsum(keep_c) - 1, -1)

    row = np.full(len(pc), -1, dtype=np.int64)
    row[treated] = row_of_group[pc[treated], sc[treated]]
    row[is_control] = row_of_control[sc[is_control]]

    sample_names = np.asarray(samp.categories, dtype=object)
    rep_sample = np.full((n_pert, n_rep), "", dtype=object)
    rep_cells = np.zeros((n_pert, n_rep), dtype=np.int64)
    p_idx, s_idx = np.nonzero(keep_t)
    rep_sample[p_idx, slot[p_idx, s_idx]] = sample_names[s_idx]
    rep_cells[p_idx, slot[p_idx, s_idx]] = group_n[p_idx, s_idx]
    dropped_t = (group_n > 0) & ~keep_t
    dropped_c = (control_n > 0) & ~keep_c
    summary = {
        f"n_{unit}s": int(len(pc)),
        f"n_{unit}s_used": int((row >= 0).sum()),
        f"n_{unit}s_unlabelled": int((~labelled).sum()),
        f"n_{unit}s_in_dropped_groups": int(group_n[dropped_t].sum() + control_n[dropped_c].sum()),
        "n_dropped_treated_groups": int(dropped_t.sum()),
        "n_dropped_control_groups": int(dropped_c.sum()),
        "n_perturbations_without_replicates": int((keep_t.sum(axis=1) == 0).sum()),
        "min_cells": int(min_cells),
        "control_labels": controls,
    }
    return Groups(perturbation=np.asarray(names, dtype=str),
                  replicate_sample=rep_sample.astype(str), replicate_cells=rep_cells,
                  control_sample=sample_names[keep_c].astype(str),
                  control_cells=control_n[keep_c].astype(np.int64), row=row, summary=summary)
