"""p-values averaged over a dispersion's posterior (``dispersion_prior="trend"``).

A test at a plug-in dispersion treats phi as known. Where a feature's evidence on phi is thin (one
perturbation, 2 vs 2 samples) its posterior is wide, and a p-value at its centre is too small
for features whose true phi lies above it. Averaging the p-value over the posterior,

    p = mean_j p(phi_j),   phi_j = the posterior's equal-probability quantile nodes,

is the posterior predictive probability of a statistic at least as extreme, so the dispersion's
remaining uncertainty reaches the p-value (the role the t and F references with d0 + d degrees of
freedom play in limma and edgeR's quasi-likelihood tests). With thousands of perturbations the
nodes coincide and nothing changes.
"""

from __future__ import annotations

from .backend import host_scalar, namespaces
from .exact import conditional_outputs
from .wald import wald_test, weight_sum

#: Nodes closer than this (log dispersion) to the centre count as one point.
SHARP = 1e-6


def integrated_outputs(out, counts, size_factor, control_counts, control_size_factor, offsets, *,
                       test, engine="auto"):
    """Replace ``p_value`` and ``statistic`` of a kernel's outputs by their posterior average.

    ``offsets`` [G_b, K] are the feature's posterior nodes of log phi minus the dispersion the
    kernel used (its ``log_dispersion`` [P_b, G_b] is the centre, so a ``"shrunk"`` comparison
    keeps its own centre). At each node the Wald test of design §6 (expected information at the
    kernel's mu and beta) runs, replaced by the conditional exact test where ``test`` ("exact"
    or "auto") applies it; ``p_value`` becomes the mean over the nodes and ``statistic`` the
    signed normal quantile with that p. Untestable comparisons stay NaN.
    """
    xp, special = namespaces(counts)
    offsets = xp.asarray(offsets, dtype=xp.float64)
    if not host_scalar(xp.max(xp.abs(offsets))) > SHARP:
        return out
    f64 = xp.float64
    centre = xp.astype(out["log_dispersion"], f64)
    mu = xp.astype(out["log_base_mean"], f64)
    beta = xp.astype(out["log_fold_change"], f64)
    sf = xp.astype(size_factor, f64)
    present = xp.isfinite(sf)
    csf = xp.astype(control_size_factor, f64)
    rate_c, rate_t = xp.exp(mu), xp.exp(mu + beta)
    testable = xp.isfinite(out["p_value"])
    conditional = test if test in ("exact", "auto") else None
    total = xp.zeros_like(centre)
    k = offsets.shape[-1]
    for j in range(k):
        log_phi = centre + offsets[:, j][None, :]
        phi = xp.exp(log_phi)
        info_c = weight_sum(xp, rate_c, phi, csf)
        info_t = weight_sum(xp, rate_t, phi, sf, present)
        _, z, p = wald_test(xp, special, beta, info_c, info_t)
        if conditional is not None:
            node = {"p_value": p, "statistic": xp.astype(z, xp.float32), "log_dispersion": log_phi}
            p = conditional_outputs(node, counts, size_factor, control_counts, control_size_factor,
                                    test=conditional, engine=engine)["p_value"]
        total = total + xp.where(testable, p, 0.0)
    p = xp.where(testable, total / k, xp.nan)
    z = xp.sign(beta) * -special.ndtri(xp.where(testable, p, 1.0) / 2.0)
    return {**out, "p_value": p,
            "statistic": xp.where(testable, xp.astype(z, xp.float32), out["statistic"])}
