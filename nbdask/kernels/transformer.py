"""Pair-set transformer estimates (design §6) with the plug-in Wald test, for NumPy or CuPy.

The network reads a comparison as two sets of per-sample tokens, control and treated, and returns
(mu, beta, alpha) on the scales of design §3. Its forward pass is written here once over the array
namespace; ``nbdask.train.model`` holds the PyTorch twin it was trained as, parameter for
parameter. No torch is imported at inference.

Encoding (recorded with the weights): size factors are divided by the geometric mean g of the
control's, s_i = l_i / g, so the estimates are equivariant to the size-factor unit and the control
tokens are the same for every perturbation (their self-attention runs once per feature).
Each sample is the token ``[log1p(y/s)/4, log s, log1p(y)/4, y == 0]``; each comparison also
carries moment summaries ``[log q_C/4, log q_T/4, beta_mom, alpha_mom/4, n_C/10, n_T/10]``
(q: group rate per unit s, zero groups at 0.5/sum s; alpha_mom the design §6 moment dispersion,
clipped to [log 1e-3, log 1e2]). The network predicts corrections to the moment estimates of mu
and beta and alpha itself, each standardised by constants stored with the weights.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from importlib import resources

from ..errors import NbdaskWarning, OptionError
from .backend import device, host_scalar, is_host, namespaces
from .moments import block_moments
from .mom import group_rates, moment_dispersion
from .wald import wald_outputs

#: Replicates per group the shipped prior covers; larger sets are extrapolation.
MAX_REPLICATES = 10
#: Mean count (per group, at the control's typical size factor) beyond the training prior.
MAX_MEAN_COUNT = 5000.0
TOKEN_FEATURES = 4
SUMMARY_FEATURES = 6
_ALPHA_CLIP = (math.log(1e-3), math.log(1e2))
#: Comparisons per forward batch: keeps the activations (~10 MB) in cache, whatever the block
#: size (1,024 runs 10v10 comparisons 2x faster per comparison than 32,768 at once).
BATCH = 1024
WEIGHTS = "transformer.npz"


def set_tokens(xp, y, size, present):
    """Tokens [..., n, TOKEN_FEATURES] (float32) of samples with counts ``y`` and sizes ``s``.

    Absent positions are zero tokens: they never reach a key or the pooling, and zeros keep NaN
    out of the matrix products.
    """
    y = xp.where(present, xp.astype(y, xp.float64), 0.0)
    s = xp.where(present, size, 1.0)
    feats = [xp.log1p(y / s) / 4.0, xp.log(s), xp.log1p(y) / 4.0, xp.astype(y == 0, xp.float64)]
    tokens = xp.stack([xp.where(present, xp.broadcast_to(f, y.shape), 0.0) for f in feats], axis=-1)
    return xp.astype(tokens, xp.float32)


def comparison_summary(xp, ctrl, trt, log_g):
    """Moment summaries [..., SUMMARY_FEATURES] and the moment estimates they start from.

    ``ctrl`` and ``trt`` are ``GroupMoments`` of the rates per unit *original* size factor;
    ``log_g`` is log of the control's geometric-mean size factor (broadcastable).
    Returns ``(summary, log_rate_c, beta_mom)``.
    """
    rate_c, rate_t = group_rates(xp, ctrl, trt)
    log_rate_c = xp.log(rate_c)
    log_rate_t = xp.log(rate_t)
    shape = log_rate_t.shape
    log_rate_c = xp.broadcast_to(log_rate_c, shape)
    phi = moment_dispersion(xp, ctrl, trt, rate_c, rate_t, None, None, None)
    alpha = xp.clip(xp.log(phi), *_ALPHA_CLIP)
    n_c = xp.broadcast_to(xp.astype(ctrl.n, xp.float64), shape)
    n_t = xp.broadcast_to(xp.astype(trt.n, xp.float64), shape)
    beta = log_rate_t - log_rate_c
    summary = xp.stack([(log_rate_c + log_g) / 4.0, (log_rate_t + log_g) / 4.0, beta, alpha / 4.0,
                        n_c / 10.0, n_t / 10.0], axis=-1)
    return xp.astype(summary, xp.float32), log_rate_c, beta


# --------------------------------------------------------------------------- forward pass

def _linear(xp, params, name, x):
    w = params[f"{name}.weight"]
    # One 2-D GEMM over all rows: a stacked matmul over [N, n, d] runs N tiny products.
    flat = xp.reshape(x, (-1, x.shape[-1]))
    y = xp.matmul(flat, xp.permute_dims(w, (1, 0)))
    y += params[f"{name}.bias"]  # in place: these activations are the memory traffic
    return xp.reshape(y, (*x.shape[:-1], w.shape[0]))


def _layer_norm(xp, params, name, x, eps=1e-5):
    centred = x - xp.mean(x, axis=-1, keepdims=True)
    scale = xp.mean(centred * centred, axis=-1, keepdims=True)
    scale += eps
    centred /= xp.sqrt(scale)
    centred *= params[f"{name}.weight"]
    centred += params[f"{name}.bias"]
    return centred


def _gelu(xp, x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): torch's gelu(approximate="tanh"),
    evaluated in place over two temporaries."""
    inner = x * x
    inner *= 0.044715 * 0.7978845608028654
    inner += 0.7978845608028654
    inner *= x
    out = xp.tanh(inner)
    out += 1.0
    out *= x
    out *= 0.5
    return out


def _attention(xp, params, name, x, context, key_mask, heads):
    """Multi-head attention of ``x`` [N, n_q, d] over ``context`` [N, n_k, d]; keys where mask."""
    n, n_q, d = x.shape
    n_k = context.shape[1]
    dh = d // heads

    def split(t, length):
        return xp.permute_dims(xp.reshape(t, (n, length, heads, dh)), (0, 2, 1, 3))

    q = split(_linear(xp, params, f"{name}.q", x), n_q)
    k = split(_linear(xp, params, f"{name}.k", context), n_k)
    v = split(_linear(xp, params, f"{name}.v", context), n_k)
    scores = xp.matmul(q, xp.permute_dims(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(dh))
    scores = xp.where(key_mask[:, None, None, :], scores, -1e9)
    scores -= xp.max(scores, axis=-1, keepdims=True)
    weights = xp.exp(scores)
    weights /= xp.sum(weights, axis=-1, keepdims=True)
    out = xp.reshape(xp.permute_dims(xp.matmul(weights, v), (0, 2, 1, 3)), (n, n_q, d))
    return _linear(xp, params, f"{name}.o", out)


def _block(xp, params, name, x, context, key_mask, heads):
    """Post-LayerNorm transformer block: attention then a GELU feed-forward, each residual."""
    x = _layer_norm(xp, params, f"{name}.ln1", x + _attention(xp, params, name, x, context, key_mask, heads))
    ff = _linear(xp, params, f"{name}.ff2", _gelu(xp, _linear(xp, params, f"{name}.ff1", x)))
    return _layer_norm(xp, params, f"{name}.ln2", x + ff)


def encode_set(xp, params, config, side, tokens, mask):
    """Embedding and self-attention layers of one set: ``side`` "c" (control) or "t" (treated)."""
    h = _linear(xp, params, f"embed_{side}", tokens)
    for i in range(config["self_layers"]):
        h = _block(xp, params, f"self_{side}.{i}", h, h, mask, config["heads"])
    return h


def _pool(xp, h, mask):
    w = xp.astype(mask, h.dtype)[..., None]
    return xp.sum(h * w, axis=-2) / xp.maximum(xp.sum(w, axis=-2), 1.0)


def decode(xp, params, config, h_c, mask_c, h_t, mask_t, summary):
    """Cross-attention rounds, masked mean pooling and the head: [N, 3] standardised outputs."""
    for i in range(config["cross_layers"]):
        h_c, h_t = (_block(xp, params, f"cross_c.{i}", h_c, h_t, mask_t, config["heads"]),
                    _block(xp, params, f"cross_t.{i}", h_t, h_c, mask_c, config["heads"]))
    p_c, p_t = _pool(xp, h_c, mask_c), _pool(xp, h_t, mask_t)
    z = xp.concat([p_c, p_t, p_t - p_c, p_c * p_t, summary], axis=-1)
    n_head = config["head_layers"]
    for i in range(n_head):
        z = _linear(xp, params, f"head.{i}", z)
        if i < n_head - 1:
            z = _gelu(xp, z)
    return z


def forward(xp, params, config, tokens_c, mask_c, tokens_t, mask_t, summary):
    """The whole network on [N, n, F] token sets: [N, 3] standardised (mu, beta, alpha) outputs."""
    h_c = encode_set(xp, params, config, "c", tokens_c, mask_c)
    h_t = encode_set(xp, params, config, "t", tokens_t, mask_t)
    return decode(xp, params, config, h_c, mask_c, h_t, mask_t, summary)


def estimates(xp, out, log_rate_c, beta_mom, config):
    """(mu, beta, alpha) on design §3 scales from the standardised outputs ``out`` [..., 3]."""
    scale = config["target_scale"]
    out = xp.astype(out, xp.float64)
    mu = log_rate_c + scale["mu"] * out[..., 0]
    beta = beta_mom + scale["beta"] * out[..., 1]
    alpha = scale["alpha_mean"] + scale["alpha"] * out[..., 2]
    return mu, beta, alpha


# --------------------------------------------------------------------------- weights

@functools.lru_cache(maxsize=4)
def _load_host(path: str | None):
    import numpy as np

    if path is None:
        source = resources.files("nbdask.weights").joinpath(WEIGHTS)
        with resources.as_file(source) as p, np.load(p) as npz:
            arrays = {k: npz[k] for k in npz.files}
    else:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(bytes(arrays.pop("__metadata__")).decode())
    return {k: v.astype(np.float32) for k, v in arrays.items()}, meta


def load_weights(path=None, xp=None, device=None):
    """``(params, metadata)``: the shipped weights (or an ``.npz`` written by ``nbdask train``).

    ``params`` maps parameter names to float32 arrays of namespace ``xp`` (NumPy by default) on
    ``device``; ``metadata["config"]`` holds the architecture, target scales and training record.
    """
    try:
        host, meta = _load_host(None if path is None else str(path))
    except FileNotFoundError:
        raise OptionError(f"transformer weights {path or WEIGHTS!r} not found; train them with "
                          "`nbdask train --out weights.npz` and pass transformer_weights=") from None
    if xp is None or is_host(xp):
        return host, meta
    return {k: xp.asarray(v, device=device) for k, v in host.items()}, meta


# --------------------------------------------------------------------------- kernel

def transformer_kernel(counts, size_factor, control_counts, control_size_factor, *,
                       feature_dispersion=None, dispersion_spread=None, weights=None):
    """Transformer estimates and plug-in Wald test for every comparison of one block.

    Same contract and outputs as ``mom_kernel``. The Wald test uses the network's dispersion
    (``dispersion="comparison"``) or the feature's pooled/shrunk value where given, like MoM.
    ``weights``: path of an ``.npz`` from ``nbdask train``; None = the shipped weights.
    Warns (``NbdaskWarning``) where a block has mean counts beyond MAX_MEAN_COUNT, where the
    network extrapolates (``nbdask.test`` warns on designs outside 2-MAX_REPLICATES replicates).
    """
    xp, special = namespaces(counts, size_factor, control_counts, control_size_factor)
    params, meta = load_weights(weights, xp, device(counts))
    config = meta["config"]
    size_factor, control_size_factor, present, ctrl, trt = block_moments(
        xp, counts, size_factor, control_counts, control_size_factor)
    p_b, g_b, r = counts.shape
    c = control_size_factor.shape[0]
    _warn_out_of_range(xp, ctrl, trt)

    log_g = xp.mean(xp.log(control_size_factor))
    g = xp.exp(log_g)
    summary, log_rate_c, beta_mom = comparison_summary(xp, ctrl, trt, log_g)
    mask_c = xp.ones_like(control_counts, dtype=xp.bool)
    tokens_c = set_tokens(xp, control_counts, xp.broadcast_to(control_size_factor / g, (g_b, c)), mask_c)
    # Control self-attention: once per feature, shared by every perturbation of the block.
    h_c_feature = encode_set(xp, params, config, "c", tokens_c, mask_c)
    tokens_t = set_tokens(xp, counts, (size_factor / g)[:, None, :], present[:, None, :])

    out = []
    step = max(1, BATCH // max(g_b, 1))
    for start in range(0, p_b, step):  # cache-sized batches of comparisons (BATCH)
        stop = min(start + step, p_b)
        n = (stop - start) * g_b
        t = xp.reshape(tokens_t[start:stop, ...], (n, r, TOKEN_FEATURES))
        m_t = xp.reshape(xp.broadcast_to(present[start:stop, None, :], (stop - start, g_b, r)), (n, r))
        h_t = encode_set(xp, params, config, "t", t, m_t)
        d = h_c_feature.shape[-1]
        h_c = xp.reshape(xp.broadcast_to(h_c_feature[None, ...], (stop - start, g_b, c, d)), (n, c, d))
        m_c = xp.ones((n, c), dtype=xp.bool, device=device(counts))
        s = xp.reshape(summary[start:stop, ...], (n, SUMMARY_FEATURES))
        out.append(xp.reshape(decode(xp, params, config, h_c, m_c, h_t, m_t, s), (stop - start, g_b, 3)))
    out = xp.concat(out, axis=0) if len(out) > 1 else out[0]
    mu, beta, alpha = estimates(xp, out, log_rate_c, beta_mom, config)

    phi = xp.exp(alpha)
    if feature_dispersion is not None:
        rate_c, rate_t = group_rates(xp, ctrl, trt)
        phi = moment_dispersion(xp, ctrl, trt, rate_c, rate_t, control_size_factor, size_factor,
                                present, feature_dispersion=feature_dispersion,
                                dispersion_spread=dispersion_spread)
    return wald_outputs(xp, special, mu, beta, phi, xp.exp(mu), xp.exp(mu + beta), control_size_factor,
                        size_factor, present, ctrl, trt)


def _warn_out_of_range(xp, ctrl, trt) -> None:
    """Warn on counts beyond the prior (``nbdask.test`` warns on the design before any block)."""
    # Mean count at a typical sample: q bar times the mean present size factor.
    top = host_scalar(xp.max(xp.maximum(xp.max(ctrl.rate_mean * ctrl.library / xp.maximum(ctrl.n, 1.0)),
                                  xp.max(trt.rate_mean * trt.library / xp.maximum(trt.n, 1.0)))))
    if top > MAX_MEAN_COUNT:
        warnings.warn(f"transformer: mean counts up to {top:.0f} in this block; the shipped weights "
                      f"were trained on means up to ~{MAX_MEAN_COUNT:.0f}, so these estimates "
                      "extrapolate (use method='mom' or 'irls' for them)", NbdaskWarning, stacklevel=3)


__all__ = ["MAX_MEAN_COUNT", "MAX_REPLICATES", "comparison_summary", "decode", "encode_set",
           "estimates", "forward", "load_weights", "set_tokens", "transformer_kernel"]
