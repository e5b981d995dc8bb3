"""Fit the pair-set transformer on fresh prior draws and write its ``.npz`` weights."""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..kernels.transformer import SUMMARY_FEATURES, TOKEN_FEATURES
from . import prior
from .model import PairSetTransformer

logger = logging.getLogger("nbdask")

ENCODING = ("size factors divided by the control's geometric mean (s = l/g); token per sample "
            "[log1p(y/s)/4, log s, log1p(y)/4, y == 0]; summaries [log q_C/4, log q_T/4, beta_mom, "
            "clip(alpha_mom, log 1e-3, log 1e2)/4, n_C/10, n_T/10]; outputs: mu = log q_C + s_mu o_0, "
            "beta = beta_mom + s_beta o_1, alpha = alpha_mean + s_alpha o_2")


def _tensors(enc: dict) -> tuple:
    return tuple(torch.from_numpy(np.ascontiguousarray(enc[k]))
                 for k in ("tokens_c", "mask_c", "tokens_t", "mask_t", "summary"))


def _batch(rng, n, scale):
    batch = prior.draw(rng, n)
    enc = prior.encode(batch)
    return _tensors(enc), torch.from_numpy(prior.targets(batch, enc, scale))


def _loss(pred, target):
    """Mean absolute error per target (the accuracy metric), averaged over the three."""
    return (pred - target).abs().mean(0)


def train(out: str | os.PathLike, *, seed: int = 0, steps: int = 20_000, batch: int = 256,
          lr: float = 2e-3, min_lr: float = 2e-5, weight_decay: float = 1e-4,
          d_model: int = 32, heads: int = 4, self_layers: int = 2, cross_layers: int = 1,
          head_layers: int = 3, validate_every: int = 500, validation_size: int = 8192,
          threads: int | None = None, resume: bool = False, command: str | None = None,
          log=print) -> dict:
    """Train on ``steps`` x ``batch`` fresh prior draws; write ``out`` (.npz) and return its metadata.

    AdamW with a linear warm-up then cosine decay to ``min_lr``, gradient norm clipped at 1, L1
    loss on the standardised targets. Every ``validate_every`` steps: the loss on a fixed validation
    set (seed + 1), a checkpoint ``out + ".ckpt"`` (model, optimiser, RNG, curve; ``resume=True``
    continues from it) and a progress line. The best validation weights are the ones written.
    """
    out = Path(out)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scale = prior.target_scale(np.random.default_rng([seed, 2]))
    val_rng = np.random.default_rng([seed, 1])
    val_inputs, val_target = _batch(val_rng, validation_size, scale)

    model = PairSetTransformer(d_model=d_model, heads=heads, self_layers=self_layers,
                               cross_layers=cross_layers, head_layers=head_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 50)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))

    ckpt = out.with_name(out.name + ".ckpt")
    curve, start, best = [], 0, (math.inf, None)
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        curve, start, best = state["curve"], state["step"], (state["best_loss"], state["best"])
        log(f"resumed from {ckpt} at step {start}")

    t0 = time.perf_counter()
    running = []
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        inputs, target = _batch(rng, batch, scale)
        model.train()
        loss = _loss(model(*inputs), target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % validate_every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                per_target = _loss(model(*val_inputs), val_target)
            val = float(per_target.mean())
            curve.append({"step": step + 1, "train": float(np.mean(running)), "validation": val,
                          "validation_mu_beta_alpha": [round(float(x), 5) for x in per_target]})
            running = []
            if val < best[0]:
                best = (val, {k: v.clone() for k, v in model.state_dict().items()})
            elapsed = time.perf_counter() - t0
            rate = (step + 1 - start) / elapsed
            log(f"step {step + 1}/{steps}  train {curve[-1]['train']:.4f}  validation {val:.4f} "
                f"(mu/beta/alpha {', '.join(f'{x:.3f}' for x in per_target)})  "
                f"{rate:.1f} steps/s, {(steps - step - 1) / rate / 60:.1f} min left")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "rng": rng.bit_generator.state, "curve": curve, "step": step + 1,
                        "best_loss": best[0], "best": best[1]}, ckpt)

    model.load_state_dict(best[1])
    meta = {
        "config": {**model.config, "target_scale": scale, "token_features": TOKEN_FEATURES,
                   "summary_features": SUMMARY_FEATURES},
        "encoding": ENCODING,
        "prior": prior.PRIOR,
        "training": {"command": command, "seed": seed, "steps": steps, "batch": batch, "examples": steps * batch,
                     "lr": lr, "min_lr": min_lr, "weight_decay": weight_decay, "loss": "L1 on standardised targets",
                     "optimizer": "AdamW, warm-up + cosine, grad-norm clip 1",
                     "best_validation_loss": best[0], "curve": curve,
                     "seconds": round(time.perf_counter() - t0, 1),
                     "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "date": datetime.date.today().isoformat()},
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "nbdask_version": __version__,
    }
    write_weights(out, model.numpy_params(), meta)
    return meta


def write_weights(path, params: dict, meta: dict) -> None:
    """Write ``params`` and the JSON ``meta`` record into one ``.npz`` (atomically), and the
    record alone beside it (``.json``) for people to read."""
    path = Path(path)
    text = json.dumps(meta, indent=1)
    buf = io.BytesIO()
    np.savez_compressed(buf, **params, __metadata__=np.frombuffer(text.encode(), dtype=np.uint8))
    for target, data in ((path, buf.getvalue()), (path.with_suffix(".json"), text.encode())):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
