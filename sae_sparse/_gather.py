"""Pre-activations of chosen latents, ``out[n, j] = xc[n] · W[idx[n, j]] + b[idx[n, j]]``, with
gradients, in row chunks: the N·k·D gathered rows are never held at once (forward) or at all
(backward: a weighted bag of W rows for dxc, index_adds for dW and db). Used where a
selection is made elsewhere and its raw (not ReLU'd) values are wanted: AuxK without ReLU
(SAELens) and the latent-sharded encode."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class GatherDot(torch.autograd.Function):
    """``out[n, j] = xc[n] · W[idx[n, j]] + b[idx[n, j]]`` in row chunks, without holding the
    N·k·D gathered rows: the backward is a weighted bag of W rows for dxc and index_adds for
    dW and db."""

    @staticmethod
    def forward(ctx, xc, W, b, idx, rows):
        N, k = idx.shape
        out = xc.new_empty(N, k)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            out[r0:r1] = torch.einsum("nd,nkd->nk", xc[r0:r1], W[idx[r0:r1]]) + b[idx[r0:r1]]
        ctx.save_for_backward(xc, W, idx)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, g):
        xc, W, idx = ctx.saved_tensors
        g = g.contiguous()
        dxc = dW = db = None
        if ctx.needs_input_grad[0]:
            dxc = (F.embedding_bag(idx, W, per_sample_weights=g, mode="sum")
                   if idx.shape[0] else torch.zeros_like(xc))
        if ctx.needs_input_grad[1]:
            dW = torch.zeros_like(W)
            for r0 in range(0, idx.shape[0], ctx.rows):
                r1 = min(idx.shape[0], r0 + ctx.rows)
                contrib = g[r0:r1, :, None] * xc[r0:r1, None, :]
                dW.index_add_(0, idx[r0:r1].reshape(-1), contrib.reshape(-1, W.shape[1]))
        if ctx.needs_input_grad[2]:
            db = torch.zeros(W.shape[0], dtype=g.dtype, device=g.device)
            db.index_add_(0, idx.reshape(-1), g.reshape(-1))
        return dxc, dW, db, None, None


def gather_dot(xc, W, b, idx):
    """``xc [N, D]``, ``W [S, D]``, ``b [S]``, ``idx [N, k]`` -> ``[N, k]`` (differentiable in
    xc, W and b; idx held fixed)."""
    rows = max(1, (1 << 24) // max(1, idx.shape[1] * W.shape[1]))
    return GatherDot.apply(xc, W, b, idx, rows)
