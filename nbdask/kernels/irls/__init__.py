"""Batched maximum likelihood for the two-group NB2 GLM, with Wald and likelihood-ratio tests.

Model: y_i ~ NB2(m_i, phi), log m_i = log l_i + mu + beta x_i, one phi per comparison. The
design (intercept + group indicator) makes each group's log rate theta_g a free parameter
(mu = theta_C, beta = theta_T - theta_C), so for fixed phi the groups decouple into 1-D concave
problems. The dispersion alpha = log phi is fitted on the profile likelihood:

* each iteration takes ``INNER_STEPS`` Newton steps for every theta_g at the current alpha,
  then one Newton step for alpha on the profile (Schur complement of the observed Hessian,
  exact because theta_g sits at its optimum), with a step bound that halves whenever the
  profile gradient changes sign (a safeguarded Newton on a 1-D problem);
* ``dispersion_fit="cox-reid"`` maximises the profile minus 1/2 log det(X'WX) instead
  (W = m / (1 + phi m)), whose total derivative includes d theta_hat / d alpha;
* comparisons whose profile score at phi = 0 is <= 0 have their maximum at the Poisson boundary
  and are reported there (alpha = log MIN_DISPERSION) without iterating;
* a group whose counts are all zero has no finite ML rate: its log rate is held at
  MAX_LOG_FOLD_CHANGE below the other group's, ``converged`` is False, and its huge standard
  error keeps the Wald p-value from being spuriously small.

Two forms of one estimator: ``array.py`` is the definition over the array namespace (NumPy,
CuPy), ``irls_kernel``; ``fused.py`` is its numba twin ``irls_fused`` for NumPy blocks, the same
iterations one comparison at a time. ``Method.select`` (``nbdask.kernels``) picks one.
"""

from __future__ import annotations

from .array import (CHECK_EVERY, DISPERSION_FITS, INNER_STEPS, MAX_ALPHA_STEP, MAX_DISPERSION,
                    MAX_LOG_FOLD_CHANGE, fit_nb, irls_kernel, log_likelihood)

__all__ = ["CHECK_EVERY", "DISPERSION_FITS", "INNER_STEPS", "MAX_ALPHA_STEP", "MAX_DISPERSION",
           "MAX_LOG_FOLD_CHANGE", "fit_nb", "irls_kernel", "log_likelihood"]
