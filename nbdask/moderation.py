"""Borrowing dispersion across features: a mean–dispersion trend, a prior around it, and each
feature's posterior (``dispersion_prior="trend"``, the default).

A feature's own evidence on its dispersion phi is the pooled within-group variance of its rates
q_i = y_i / l_i over the control and every perturbation's treated group (groups k with n_k >= 2
present replicates and q bar_k > 0, the same groups the pooling pass keeps):

    S = sum_k (n_k - 1) s2_k,   E[S | phi] = A + phi sum_k (n_k - 1) lambda_k^2

with A = sum_k (n_k - 1) q bar_k mean_k(1/l) (the Poisson part) and lambda_k^2 estimated without
bias from E[q bar^2] = lambda^2 (1 + phi / n) + lambda mean(1/l) / n. ``S / E[S]`` is taken as
chi-square with nu degrees of freedom over nu, nu = 2 E[S]^2 / Var(S) from the NB2 moments
(the excess kurtosis 6 phi + 1 / (m (1 + phi m)) included), which gives an approximate
likelihood for phi per feature. With 20,000 perturbations it is sharp at the pooled moment
estimate; with one it is flat, and the prior decides.

- **Trend.** Features are binned by their mean normalised count; in each bin the dispersion is
  the ratio of the pooled moment sums (``dispersion.py``'s estimator over the bin's features,
  leaving out features whose statistic lies beyond the 0.999 chi-square quantile, twice). log phi
  of the bins is smoothed by an inverse-variance weighted local-linear fit over log mean (Gaussian
  kernel, bandwidth TREND_BANDWIDTH) and held constant beyond the bins that carry information.
  A local fit, as edgeR and glmGamPoi use, because DESeq2's a0 + a1 / mean misfits some data
  (DESeq2 itself substitutes a local fit on the Li and Marioni data of ``tests/fixtures``).
- **Prior.** log phi_g ~ trend(mean_g) + shift + scale x t_df: a scaled Student t, whose heavy
  tails let genuinely over-dispersed features keep their own estimate (what DESeq2 does with its
  2-sigma outlier rule and limma with ``robust=TRUE``). shift, scale and df (one of PRIOR_DFS)
  maximise the marginal likelihood of all features, integrated on a grid: the spread of the
  prior is the spread of the true dispersions, the sampling noise of each feature's estimate
  taken out (as DESeq2's prior variance and limma's d0 do).
- **Posterior.** On the same grid for every feature: its mean of log phi (the dispersion the
  estimates and the standard error use), its standard deviation, and NODES nodes with weights
  that the tests average their p-value over (``kernels.integrate``), so that the dispersion's
  remaining uncertainty reaches the p-value: with one perturbation and 2 vs 2 samples it is
  wide, with thousands of perturbations a point. The nodes cut the posterior's support (down to
  TAIL_MASS on each side) into NODES cells of equal width in log phi, each node the cell's mean
  and its weight the cell's mass: a small p-value is dominated by the upper tail of the
  posterior (the largest dispersions give the largest p), which equal-probability quantiles
  would cut off, making the tests' tails liberal (twice the nominal rate at p < 0.001). A
  feature with at least PLUG_IN_DOF degrees of freedom of its own (a screen of hundreds of
  perturbations and more) gets one node, its posterior mean: averaging would cost NODES tests
  per comparison and change no null rate there.

Everything here is per feature (arrays of length G) and runs once on the client after the
pooling pass: a few seconds for 60,000 features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import chdtri

from .kernels.mom import DISPERSION_CEILING as MAX_DISPERSION
from .kernels.mom import MIN_DISPERSION

#: Nodes of each feature's posterior of log phi that the tests average over, and the posterior
#: mass left out beyond the outermost cells on each side.
NODES = 16
TAIL_MASS = 1e-9
#: Evidence (sum of n - 1 over the feature's groups) from which a feature's p-values are taken at
#: its posterior mean instead of averaged over the nodes: its posterior is then narrow where the
#: tests are sensitive to phi, and the average moves no null rate (measured on trended cubes of
#: 3 vs 3 replicates: the plug-in's rate at p < 0.001 is 1.3x the level at 200 degrees of
#: freedom, 1.2x at 600, and equals the averaged one and the oracle's at 2,000). A screen of
#: thousands of perturbations then costs what a plug-in test costs.
PLUG_IN_DOF = 1000
#: Grid of log phi relative to the trend, for the prior fit and the posteriors.
OFFSETS = np.linspace(-10.0, 8.0, 145)
#: Degrees of freedom the prior's Student t may take (inf: normal).
PRIOR_DFS = (2.0, 4.0, 8.0, 16.0, 32.0, math.inf)
#: Features per trend bin (at least), at most TREND_MAX_BINS bins.
TREND_BIN = 200
TREND_MAX_BINS = 60
#: Bandwidth of the trend smoother in log mean count.
TREND_BANDWIDTH = 1.0
#: Features whose statistic S exceeds this chi-square quantile under their bin's dispersion are
#: left out of the bin's estimate (two rounds).
TREND_OUTLIER_LEVEL = 0.999
#: A posterior narrower than this fraction of the grid step is refined on a fine local grid.
_FINE = np.linspace(-3.0, 3.0, 121)
#: Features per chunk of grid work (bounds memory at ~ CHUNK x 145 x 8 bytes per array).
CHUNK = 4096
#: The prior's three parameters are fitted on at most this many features (evenly spread over
#: the mean counts), which determine them to well within their sampling error.
PRIOR_FEATURES = 4096


@dataclass
class Evidence:
    """Each feature's summed moment evidence on its dispersion (arrays [G] unless noted).

    ``variance`` S, ``poisson`` A, ``excess`` [N, G] the sums of (n - 1)(q bar^2 - q bar
    mean(1/l) / n) by group size n = 2 ... (row n - 2), ``numerator``/``denominator`` the pooled
    moment estimator's sums, ``square`` sum (n - 1) q bar^2, ``moments4`` [4, G] the coefficients
    of Var(S) as a cubic in phi, ``dof`` sum (n - 1), ``mean`` the mean normalised count.
    """

    variance: np.ndarray
    poisson: np.ndarray
    excess: np.ndarray
    numerator: np.ndarray
    denominator: np.ndarray
    square: np.ndarray
    moments4: np.ndarray
    dof: np.ndarray
    mean: np.ndarray

    def take(self, index) -> "Evidence":
        return Evidence(*(v[..., index] for v in self.__dict__.values()))

    def expected(self, phi):
        """E[S | phi] for phi [G, K] (the bias of q bar^2 removed under the model)."""
        out = np.repeat(self.poisson[:, None], phi.shape[1], axis=1)
        for row, excess in enumerate(self.excess):
            n = row + 2.0
            out += excess[:, None] * (phi / (1.0 + phi / n))
        return out

    def nu(self, phi):
        """Degrees of freedom of S at dispersion phi [G]: 2 E[S]^2 / Var(S)."""
        e = self.poisson + phi * self.square
        c0, c1, c2, c3 = self.moments4
        var = c0 + phi * (c1 + phi * (c2 + phi * c3))
        return np.where(var > 0, 2.0 * e * e / np.where(var > 0, var, 1.0), self.dof)

    def loglik(self, nu, log_phi):
        """Approximate log-likelihood of log phi [G, K]: S / E[S] ~ chi2_nu / nu."""
        e = np.maximum(self.expected(np.exp(log_phi)), 1e-300)
        return -0.5 * nu[:, None] * (np.log(e) + self.variance[:, None] / e)


@dataclass
class Trend:
    """The fitted mean–dispersion trend: log phi at bin centres (log mean), smoothed."""

    log_mean: np.ndarray
    log_dispersion: np.ndarray
    weight: np.ndarray
    smooth: np.ndarray
    low: float
    high: float

    def __call__(self, mean):
        x = np.clip(np.log(np.maximum(mean, 1e-300)), self.low, self.high)
        return np.interp(x, self.log_mean, self.smooth)


def fit_trend(ev: Evidence) -> Trend:
    """Binned pooled-moment dispersions over log mean, smoothed (see the module docstring)."""
    usable = (ev.dof > 0) & (ev.mean > 0)
    order = np.argsort(np.where(usable, ev.mean, np.inf))[:int(usable.sum())]
    if order.size == 0:
        zero = np.zeros(1)
        return Trend(zero, np.log([0.1]), zero, np.log([0.1]), 0.0, 0.0)
    bins = max(1, min(TREND_MAX_BINS, order.size // TREND_BIN))
    centres, values, weights = [], [], []
    for index in np.array_split(order, bins):
        sub = ev.take(index)
        keep = np.ones(index.size, bool)
        limit = chdtri(np.maximum(sub.dof, 1.0), 1.0 - TREND_OUTLIER_LEVEL)  # chi2.ppf
        for screen in (True, True, False):  # two screening rounds, then the bin's estimate
            num, den = sub.numerator[keep].sum(), sub.denominator[keep].sum()
            phi = min(max(num / den, MIN_DISPERSION), MAX_DISPERSION) if den > 0 else MIN_DISPERSION
            if screen:
                expected = sub.poisson + phi * np.maximum(sub.denominator, 0.0)
                keep = sub.dof * sub.variance / np.maximum(expected, 1e-300) <= limit
        c0, c1, c2, c3 = sub.moments4[:, keep].sum(axis=1)
        var = (c0 + phi * (c1 + phi * (c2 + phi * c3))) / den ** 2 if den > 0 else 0.0
        centres.append(np.median(np.log(sub.mean)))
        values.append(np.log(phi))
        weights.append(phi * phi / var if phi > MIN_DISPERSION and var > 0 else 0.0)
    x, y, w = (np.asarray(v, dtype=np.float64) for v in (centres, values, weights))
    if not (w > 0).any():
        return Trend(x, y, w, np.full_like(y, np.log(0.1)), float(x[0]), float(x[-1]))
    smooth = np.empty_like(y)
    for i, x0 in enumerate(x):
        k = w * np.exp(-0.5 * ((x - x0) / TREND_BANDWIDTH) ** 2)
        design = np.stack([np.ones_like(x), x - x0], axis=1)
        gram = design.T @ (k[:, None] * design) + 1e-12 * np.eye(2)
        smooth[i] = np.linalg.solve(gram, design.T @ (k * y))[0]
    informative = w >= 0.01 * w.max()
    return Trend(x, y, w, smooth, float(x[informative].min()), float(x[informative].max()))


def _log_prior(offset, shift, scale, df):
    z = (offset - shift) / scale
    if math.isinf(df):
        return -0.5 * z * z
    return -0.5 * (df + 1.0) * np.log1p(z * z / df)


def _chunks(n):
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


@dataclass
class Prior:
    """log phi_g - trend(mean_g) ~ shift + scale x Student t(df)."""

    shift: float
    scale: float
    df: float


def fit_prior(ev: Evidence, log_trend, nu) -> Prior:
    """Marginal maximum likelihood of (shift, scale, df) over the features with evidence."""
    have = np.flatnonzero(ev.dof > 0)
    if have.size < 2:
        return Prior(0.0, 1.0, math.inf)
    if have.size > PRIOR_FEATURES:
        by_mean = have[np.argsort(ev.mean[have], kind="stable")]
        have = np.sort(by_mean[np.linspace(0, have.size - 1, PRIOR_FEATURES).astype(np.int64)])
    likelihood = np.empty((have.size, OFFSETS.size))
    for part in _chunks(have.size):
        idx = have[part]
        ll = ev.take(idx).loglik(nu[idx], log_trend[idx, None] + OFFSETS[None, :])
        likelihood[part] = np.exp(ll - ll.max(axis=1, keepdims=True))

    def nll(params, df):
        weights = np.exp(_log_prior(OFFSETS, params[0], max(math.exp(params[1]), 0.05), df))
        total = weights.sum()
        if not total > 0:  # a shift the search tried far off the grid
            return math.inf
        # einsum, not @: a BLAS gemv spreads this small product over threads that the workers'
        # (or a test suite's) processes already hold, and ran 8x slower on two busy cores.
        return -np.sum(np.log(np.maximum(np.einsum("ij,j->i", likelihood, weights / total), 1e-300)))

    from scipy import optimize  # here, not at the top: its import costs each worker half a second

    best = None
    for df in PRIOR_DFS:
        fit = optimize.minimize(nll, [0.0, math.log(0.5)], args=(df,), method="Nelder-Mead",
                                options={"xatol": 1e-3, "fatol": 1e-3})
        if best is None or fit.fun < best[0]:
            best = (fit.fun, Prior(float(fit.x[0]), max(math.exp(fit.x[1]), 0.05), df))
    return best[1]


def _cells(grid, weights, k):
    """Nodes and weights [G, k]: the support of each discrete posterior (grid [G, K], weights
    [G, K]) beyond TAIL_MASS on each side cut into k cells of equal width; a node is its cell's
    mean, its weight the cell's mass (empty cells: the cell centre, weight 0)."""
    rows = np.arange(grid.shape[0])
    cum = np.cumsum(weights, axis=1)
    lo = grid[rows, np.argmax(cum > TAIL_MASS, axis=1)]
    hi = grid[rows, np.argmax(cum >= 1.0 - TAIL_MASS, axis=1)]
    width = np.maximum(hi - lo, 1e-12) / k
    cell = np.clip(((grid - lo[:, None]) / width[:, None]).astype(np.int64), 0, k - 1)
    flat = rows[:, None] * k + cell
    mass = np.bincount(flat.ravel(), weights.ravel(), minlength=grid.shape[0] * k).reshape(-1, k)
    first = np.bincount(flat.ravel(), (weights * grid).ravel(), minlength=grid.shape[0] * k).reshape(-1, k)
    centre = lo[:, None] + (np.arange(k) + 0.5) * width[:, None]
    nodes = np.where(mass > 0, first / np.where(mass > 0, mass, 1.0), centre)
    return nodes, mass / mass.sum(axis=1, keepdims=True)


def posterior(ev: Evidence, log_trend, nu, prior: Prior):
    """Posterior mean and sd of log phi [G], its NODES nodes and their weights [G, NODES]."""
    g = log_trend.shape[0]
    mean, sd = np.empty(g), np.empty(g)
    nodes, node_weights = np.empty((g, NODES)), np.empty((g, NODES))
    step = OFFSETS[1] - OFFSETS[0]
    lo, hi = math.log(MIN_DISPERSION), math.log(MAX_DISPERSION)
    for part in _chunks(g):
        sub = ev.take(part)
        grid = np.clip(log_trend[part, None] + OFFSETS[None, :], lo, hi)
        logp = _log_prior(grid - log_trend[part, None], prior.shift, prior.scale, prior.df)
        w = _normalise(sub.loglik(nu[part], grid) + logp)
        m = (w * grid).sum(axis=1)
        s = np.sqrt(np.maximum((w * (grid - m[:, None]) ** 2).sum(axis=1), 0.0))
        q, qw = _cells(grid, w, NODES)
        sharp = np.flatnonzero(s < 2 * step)  # resolve posteriors narrower than the grid
        if sharp.size:
            centre = grid[sharp, np.argmax(w[sharp], axis=1)]
            fine = np.clip(centre[:, None] + _FINE[None, :] * step, lo, hi)
            fine_logp = _log_prior(fine - log_trend[part][sharp, None], prior.shift, prior.scale, prior.df)
            wf = _normalise(sub.take(sharp).loglik(nu[part][sharp], fine) + fine_logp)
            m[sharp] = (wf * fine).sum(axis=1)
            s[sharp] = np.sqrt(np.maximum((wf * (fine - m[sharp, None]) ** 2).sum(axis=1), 0.0))
            q[sharp], qw[sharp] = _cells(fine, wf, NODES)
        plug_in = np.flatnonzero(sub.dof >= PLUG_IN_DOF)
        q[plug_in], qw[plug_in] = m[plug_in, None], np.eye(1, NODES)[0]
        mean[part], sd[part], nodes[part], node_weights[part] = m, s, q, qw
    return mean, sd, nodes, node_weights


def _normalise(log_w):
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)


def moderate(ev: Evidence) -> dict:
    """Trend, prior and posteriors for every feature: per-feature arrays and the fit's summary.

    Returns ``log_dispersion`` (posterior mean of log phi), ``log_dispersion_sd``,
    ``log_dispersion_trend`` (the prior's centre, trend + shift), ``nodes`` and ``node_weights``
    [G, NODES] (log phi nodes of the posterior and their masses), ``mean`` and ``prior``
    (shift, scale, df).
    """
    trend = fit_trend(ev)
    log_trend = trend(ev.mean)
    nu = np.where(ev.dof > 0, ev.nu(np.exp(log_trend)), 0.0)
    prior = fit_prior(ev, log_trend, ev.dof.astype(np.float64))
    mean, sd, nodes, node_weights = posterior(ev, log_trend, nu, prior)
    return {"log_dispersion": mean, "log_dispersion_sd": sd, "nodes": nodes, "node_weights": node_weights,
            "log_dispersion_trend": log_trend + prior.shift, "mean": ev.mean, "prior": prior,
            "trend": trend}
