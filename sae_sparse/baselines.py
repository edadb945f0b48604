"""The baselines a sparse latent edit is measured against, trainable through the same
``attach`` and ``train_adapter`` (``TrainConfig(baseline=...)``, ``--baseline``):

* :class:`ResidualLoRA` -- a rank-r update of the residual stream at the hook
  (``--baseline lora:R``);
* :class:`DenseLatentAdapterEdit` -- the same edit as the sparse op with a dense N x S latent
  code, as SAELens-style dense code computes it (``--baseline dense``): the literal definition
  of docs/design.md (``reference.dense_sae_edit``), whose memory and time the fused op is
  compared with.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .modules import SAE, LatentAdapter
from .reference import dense_sae_edit


class ResidualLoRA(nn.Module):
    """Baseline: a rank-r update of the residual stream, ``h + (h @ A) @ B`` (B starts at 0)."""

    def __init__(self, d_model: int, rank: int = 8, dtype=torch.float32, device=None):
        super().__init__()
        self.rank = rank
        self.A = nn.Parameter(torch.randn(d_model, rank, dtype=dtype, device=device)
                              / math.sqrt(d_model))
        self.B = nn.Parameter(torch.zeros(rank, d_model, dtype=dtype, device=device))

    def forward(self, h):
        return h + (h.to(self.A.dtype) @ self.A @ self.B).to(h.dtype)


class DenseLatentAdapterEdit(nn.Module):
    """Baseline: the same math as the sparse op but with a dense N x S latent code."""

    def __init__(self, sae: SAE, adapter: LatentAdapter, mode: str):
        super().__init__()
        self.sae, self.adapter, self.mode = sae, adapter, mode

    def forward(self, h):
        shape = h.shape
        x = h.reshape(-1, shape[-1]).to(self.sae.W_dec.dtype)
        v, i = self.sae.encode(x, backend="torch")
        p = self.adapter.edit_params()
        y = dense_sae_edit(x, v, i, self.sae.W_dec, self.sae.b_dec,
                           activation=self.adapter.activation,
                           mode=self.mode, **p)
        return y.to(h.dtype).reshape(shape)
