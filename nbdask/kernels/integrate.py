"""p-values averaged over a dispersion's posterior (``dispersion_prior="trend"``).

A test at a plug-in dispersion treats phi as known. Where a feature's evidence on phi is thin (one
perturbation, 2 vs 2 samples) its posterior is wide, and a p-value at its centre is too small
for features whose true phi lies above it. Averaging the p-value over the posterior,

    p = sum_j w_j p(phi_j),   (phi_j, w_j) the posterior's nodes and their masses,

is the posterior predictive probability of a statistic at least as extreme, so the dispersion's
remaining uncertainty reaches the p-value (the role the t and F references with d0 + d degrees of
freedom play in limma and edgeR's quasi-likelihood tests). With thousands of perturbations the
nodes coincide and nothing changes.
"""

from __future__ import annotations

import numpy as np
from array_api_compat import device

from .backend import namespaces, to_host
from .exact import conditional_outputs
from .wald import wald_test, weight_sum

#: The kernel outputs the average reads.
_USED = ("log_dispersion", "log_base_mean", "log_fold_change", "p_value", "statistic")
#: Nodes closer than this (log dispersion) to the centre count as one point.
SHARP = 1e-6


def integrated_outputs(out, counts, size_factor, control_counts, control_size_factor, offsets,
                       weights, *, test, engine="auto"):
    """Replace ``p_value`` and ``statistic`` of a kernel's outputs by their posterior average.

    ``offsets`` [G_b, K] are the feature's posterior nodes of log phi minus the dispersion the
    kernel used (its ``log_dispersion`` [P_b, G_b] is the centre, so a ``"shrunk"`` comparison
    keeps its own centre), ``weights`` [G_b, K] their masses. At each node the Wald test of
    design §6 (expected information at the kernel's mu and beta) runs, replaced by the
    conditional exact test where ``test`` ("exact" or "auto") applies it; ``p_value`` becomes
    the weighted mean over the nodes and ``statistic`` the signed normal quantile with that p.
    Untestable comparisons stay NaN. Features whose nodes all sit at the centre (within SHARP;
    ``moderation.PLUG_IN_DOF``) keep the kernel's test; only the others are evaluated.
    """
    xp, special = namespaces(counts)
    # Which features have spread nodes is decided on the host: the nodes are [G_b, K] side
    # inputs, and a device array would need a data-dependent shape (nonzero) to say it.
    host_offsets, host_weights = to_host(offsets), to_host(weights)
    spread = np.max(np.abs(host_offsets) * (host_weights > 0), axis=-1) > SHARP
    cols = np.flatnonzero(spread)
    if cols.size == 0:
        return out
    if cols.size < spread.size:
        # Only features with a spread posterior pay for the nodes (in a screen, the sparse ones).
        dev = device(counts)
        take = xp.asarray(cols, device=dev)
        sub = integrated_outputs(
            {k: xp.take(out[k], take, axis=1) for k in _USED}, xp.take(counts, take, axis=1),
            size_factor, xp.take(control_counts, take, axis=0), control_size_factor,
            host_offsets[cols], host_weights[cols], test=test, engine=engine)
        # Scatter back by gathering: full column g reads sub column (spread[:g].sum()).
        at = xp.asarray(np.clip(np.cumsum(spread) - 1, 0, cols.size - 1), device=dev)
        mask = xp.asarray(spread, device=dev)[None, :]
        return {**out, **{k: xp.where(mask, xp.take(sub[k], at, axis=1), out[k])
                          for k in ("p_value", "statistic")}}
    offsets = xp.asarray(host_offsets, dtype=xp.float64, device=device(counts))
    weights = xp.asarray(host_weights, dtype=xp.float64, device=device(counts))
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
        total = total + weights[:, j][None, :] * xp.where(testable, p, 0.0)
    p = xp.where(testable, xp.minimum(total, 1.0), xp.nan)
    z = xp.sign(beta) * -special.ndtri(xp.where(testable, p, 1.0) / 2.0)
    return {**out, "p_value": p,
            "statistic": xp.where(testable, xp.astype(z, xp.float32), out["statistic"])}
