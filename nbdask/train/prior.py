"""The training prior: synthetic two-group NB2 comparisons with their true (mu, beta, alpha).

Per comparison (one draw of every quantity):

- replicates n_C, n_T ~ U{2, ..., 10};
- size factors l_i = L exp(sigma z_i), z ~ N(0, 1), sigma ~ U(0, 0.5), unit L ~ logU(0.2, 5);
- mean count at the control's geometric-mean size factor g: 70% logU(0.1, 10), 30% logU(10, 1000),
  so mu = log(mean) - log g (log rate per unit size factor);
- beta: 50% exactly 0, 50% N(0, 1);
- alpha = log phi ~ U(log 0.01, log 10);
- y_i ~ NB2(l_i exp(mu + beta x_i), phi) (gamma-Poisson).

Sets are padded to MAX_REPLICATES with ``present`` masks.
"""

from __future__ import annotations


import numpy as np

from ..kernels.moments import group_moments
from ..kernels.transformer import MAX_REPLICATES, comparison_summary, set_tokens

PRIOR = {
    "replicates": [2, MAX_REPLICATES],
    "size_factor_log_sd": [0.0, 0.5],
    "size_factor_unit": [0.2, 5.0],
    "mean_count": {"low": [0.1, 10.0], "high": [10.0, 1000.0], "p_low": 0.7},
    "beta": {"p_null": 0.5, "sd": 1.0},
    "dispersion": [0.01, 10.0],
}


def draw(rng: np.random.Generator, n: int) -> dict:
    """``n`` comparisons from the prior: padded counts, size factors, masks and the truth."""
    width = MAX_REPLICATES
    lo, hi = PRIOR["replicates"]
    n_c = rng.integers(lo, hi + 1, n)
    n_t = rng.integers(lo, hi + 1, n)
    cols = np.arange(width)
    present_c = cols < n_c[:, None]
    present_t = cols < n_t[:, None]
    sd = rng.uniform(*PRIOR["size_factor_log_sd"], n)[:, None]
    unit = np.exp(rng.uniform(*np.log(PRIOR["size_factor_unit"]), n))[:, None]
    l_c = unit * np.exp(sd * rng.standard_normal((n, width)))
    l_t = unit * np.exp(sd * rng.standard_normal((n, width)))
    log_g = np.sum(np.where(present_c, np.log(l_c), 0.0), axis=1) / n_c
    m = PRIOR["mean_count"]
    low = rng.random(n) < m["p_low"]
    log_mean = np.where(low, rng.uniform(*np.log(m["low"]), n), rng.uniform(*np.log(m["high"]), n))
    mu = log_mean - log_g
    b = PRIOR["beta"]
    beta = np.where(rng.random(n) < b["p_null"], 0.0, b["sd"] * rng.standard_normal(n))
    alpha = rng.uniform(*np.log(PRIOR["dispersion"]), n)
    phi = np.exp(alpha)[:, None]

    def counts(size, log_rate):
        mean = size * np.exp(log_rate)[:, None]
        return rng.poisson(rng.gamma(1.0 / phi, phi * mean))

    y_c = np.where(present_c, counts(l_c, mu), 0)
    y_t = np.where(present_t, counts(l_t, mu + beta), 0)
    return {"y_c": y_c, "l_c": np.where(present_c, l_c, np.nan), "y_t": y_t,
            "l_t": np.where(present_t, l_t, np.nan), "mu": mu, "beta": beta, "alpha": alpha}


def encode(batch: dict) -> dict:
    """Network inputs of drawn comparisons, by the same functions the inference kernel uses."""
    present_c, present_t = np.isfinite(batch["l_c"]), np.isfinite(batch["l_t"])
    ctrl = group_moments(np, batch["y_c"], batch["l_c"], present_c)
    trt = group_moments(np, batch["y_t"], batch["l_t"], present_t)
    log_g = np.sum(np.where(present_c, np.log(np.where(present_c, batch["l_c"], 1.0)), 0.0), axis=1)
    log_g = log_g / ctrl.n
    g = np.exp(log_g)[:, None]
    summary, log_rate_c, beta_mom = comparison_summary(np, ctrl, trt, log_g)
    return {
        "tokens_c": set_tokens(np, batch["y_c"], batch["l_c"] / g, present_c), "mask_c": present_c,
        "tokens_t": set_tokens(np, batch["y_t"], batch["l_t"] / g, present_t), "mask_t": present_t,
        "summary": summary, "log_rate_c": log_rate_c, "beta_mom": beta_mom,
    }


def target_scale(rng: np.random.Generator, n: int = 200_000) -> dict:
    """Standardising constants of the three targets, measured on ``n`` prior draws."""
    batch = draw(rng, n)
    enc = encode(batch)
    d_mu = batch["mu"] - enc["log_rate_c"]
    d_beta = batch["beta"] - enc["beta_mom"]
    return {"mu": float(np.mean(np.abs(d_mu))) or 1.0, "beta": float(np.mean(np.abs(d_beta))) or 1.0,
            "alpha_mean": float(np.mean(batch["alpha"])), "alpha": float(np.mean(np.abs(
                batch["alpha"] - np.mean(batch["alpha"]))))}


def targets(batch: dict, enc: dict, scale: dict) -> np.ndarray:
    """Standardised targets [n, 3] the network is trained to output."""
    return np.stack([(batch["mu"] - enc["log_rate_c"]) / scale["mu"],
                     (batch["beta"] - enc["beta_mom"]) / scale["beta"],
                     (batch["alpha"] - scale["alpha_mean"]) / scale["alpha"]], axis=-1).astype(np.float32)


__all__ = ["PRIOR", "draw", "encode", "target_scale", "targets"]
