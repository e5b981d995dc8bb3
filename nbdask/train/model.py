"""The PyTorch twin of ``nbdask.kernels.transformer``: same parameters, same names, same maths."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels.transformer import SUMMARY_FEATURES, TOKEN_FEATURES


class Block(nn.Module):
    """Post-LayerNorm attention block (queries x, keys/values context) with a GELU feed-forward."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x, context, key_mask):
        n, n_q, d = x.shape
        n_k, dh = context.shape[1], d // self.heads

        def split(t, length):
            return t.reshape(n, length, self.heads, dh).transpose(1, 2)

        q, k, v = split(self.q(x), n_q), split(self.k(context), n_k), split(self.v(context), n_k)
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(dh))
        scores = scores.masked_fill(~key_mask[:, None, None, :], -1e9)
        att = torch.softmax(scores, dim=-1)
        out = self.o((att @ v).transpose(1, 2).reshape(n, n_q, d))
        x = self.ln1(x + out)
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x), approximate="tanh")))


class PairSetTransformer(nn.Module):
    """Self-attention per set, cross-attention between the sets, masked mean pooling, MLP head."""

    def __init__(self, *, d_model: int = 32, heads: int = 4, self_layers: int = 2,
                 cross_layers: int = 1, head_layers: int = 3, ff_mult: int = 2):
        super().__init__()
        self.config = {"d_model": d_model, "heads": heads, "self_layers": self_layers,
                       "cross_layers": cross_layers, "head_layers": head_layers, "ff_mult": ff_mult}
        ff = ff_mult * d_model
        self.embed_c = nn.Linear(TOKEN_FEATURES, d_model)
        self.embed_t = nn.Linear(TOKEN_FEATURES, d_model)
        self.self_c = nn.ModuleList(Block(d_model, heads, ff) for _ in range(self_layers))
        self.self_t = nn.ModuleList(Block(d_model, heads, ff) for _ in range(self_layers))
        self.cross_c = nn.ModuleList(Block(d_model, heads, ff) for _ in range(cross_layers))
        self.cross_t = nn.ModuleList(Block(d_model, heads, ff) for _ in range(cross_layers))
        # 4d + summaries -> 2d -> d -> ... -> 3 (halving, never below d/2)
        hidden = [max(d_model // 2, (2 * d_model) >> i) for i in range(head_layers - 1)]
        widths = [4 * d_model + SUMMARY_FEATURES, *hidden, 3]
        self.head = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    @staticmethod
    def _pool(h, mask):
        w = mask.to(h.dtype)[..., None]
        return (h * w).sum(-2) / w.sum(-2).clamp_min(1.0)

    def forward(self, tokens_c, mask_c, tokens_t, mask_t, summary):
        h_c, h_t = self.embed_c(tokens_c), self.embed_t(tokens_t)
        for blk in self.self_c:
            h_c = blk(h_c, h_c, mask_c)
        for blk in self.self_t:
            h_t = blk(h_t, h_t, mask_t)
        for bc, bt in zip(self.cross_c, self.cross_t):
            h_c, h_t = bc(h_c, h_t, mask_t), bt(h_t, h_c, mask_c)
        p_c, p_t = self._pool(h_c, mask_c), self._pool(h_t, mask_t)
        z = torch.cat([p_c, p_t, p_t - p_c, p_c * p_t, summary], dim=-1)
        for i, layer in enumerate(self.head):
            z = layer(z)
            if i < len(self.head) - 1:
                z = F.gelu(z, approximate="tanh")
        return z

    def numpy_params(self) -> dict:
        """Parameters as float32 NumPy arrays under the names the array-API forward pass reads."""
        return {k: v.detach().cpu().numpy().astype("float32") for k, v in self.state_dict().items()}
