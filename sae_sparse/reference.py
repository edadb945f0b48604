"""Plain-PyTorch implementations.

* ``topk_encode_torch`` / ``edit_decode_torch`` (and ``fold_edit_torch``,
  ``sae_forward_torch``): the ``torch`` backend. Any device, any float
  dtype (float64 included); chunked over S so no N x S tensor is held at once; gradients come
  from autograd. This is the ground truth the other backends are tested against.
* ``dense_topk_encode`` / ``dense_sae_edit``: the literal definitions of docs/design.md with a
  dense N x S latent code: what the ``torch`` backend itself is tested against, and the
  computation of the dense baseline (``baselines.DenseLatentAdapterEdit``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .codes import ACTIVATIONS
from .codes import MODES as _ALL_MODES

MODES = _ALL_MODES[:2]  # the public modes; "plain" is sparse_decode


def activation_fn(name: str):
    if name == "relu":
        return torch.relu
    if name == "gelu":
        return F.gelu
    if name == "identity":
        return lambda h: h
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulate low-precision inputs in fp32 (DESIGN.md: "accumulate in fp32").
    return torch.float64 if dtype == torch.float64 else torch.float32


def decode_coef(values, indices, gain, mode: str):
    """Weights of the gathered W_dec rows: ``v`` (plain), ``v * gain[i]`` (delta; None without a
    gain: nothing to gather) or ``v * (1 + gain[i])`` (replace)."""
    if mode == "plain":
        return values
    if mode == "delta":
        return values * gain[indices] if gain is not None else None
    return values * (1 + gain[indices]) if gain is not None else values


def _topk_stable(scores: torch.Tensor, kk: int):
    """Top-kk per row, descending, ties broken by the smaller column."""
    vals, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return vals[:, :kk], order[:, :kk]


@torch.no_grad()
def select_topk(xc, W_enc, b_enc, k, threshold=None, chunk: int = 8192):
    """Indices [N, k] of the k largest pre-activations and the number of active latents per row.

    Streams over S in chunks of `chunk` latents, keeping a running top-(k+1).
    """
    N, S = xc.shape[0], W_enc.shape[0]
    kk = min(k + 1, S)
    best_v = xc.new_empty(N, 0)
    best_i = torch.empty(N, 0, dtype=torch.long, device=xc.device)
    n_active = torch.zeros(N, dtype=torch.long, device=xc.device)
    for s0 in range(0, S, chunk):
        s1 = min(s0 + chunk, S)
        pre = F.linear(xc, W_enc[s0:s1], b_enc[s0:s1])
        active = pre > 0
        if threshold is not None:
            active &= pre > threshold[s0:s1]
        n_active += active.sum(1)
        cand_i = torch.arange(s0, s1, device=xc.device).expand(N, -1)
        # Earlier chunks hold smaller indices and come first, so a stable sort keeps the
        # smaller index first among equal values.
        vals, pos = _topk_stable(torch.cat([best_v, pre], 1), kk)
        best_i = torch.cat([best_i, cand_i], 1).gather(1, pos)
        best_v = vals
    return best_i[:, :k], n_active


def topk_encode_torch(x, W_enc, b_enc, k, b_pre=None, threshold=None):
    """Reference top-k encode on 2-D x. Returns (values [N,k], indices [N,k], overflow [N])."""
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    if b_pre is not None:
        xc = xc - b_pre.to(ct)
    W, b = W_enc.to(ct), b_enc.to(ct)
    thr = threshold.to(ct) if threshold is not None else None
    idx, n_active = select_topk(xc.detach(), W.detach(), b.detach(), k,
                                None if thr is None else thr.detach())
    # Differentiable values at the selected latents (the selection itself is held fixed).
    pre = torch.einsum("nd,nkd->nk", xc, W[idx]) + b[idx]
    keep = pre > 0
    if thr is not None:
        keep &= pre > thr.detach()[idx]
    values = torch.where(keep, pre, torch.zeros_like(pre)).to(x.dtype)
    return values, idx, n_active > k


def _bag(indices, weight, coef):
    """sum_j coef[n, j] * weight[indices[n, j]]  ->  [N, C]."""
    N, k = indices.shape
    if N == 0:
        return weight.new_zeros(0, weight.shape[1])
    return F.embedding_bag(indices, weight, per_sample_weights=coef, mode="sum")


def fold_edit_torch(W_dec, bias=None, W_out=None):
    """The edit's dense terms M = W_out W_dec [h, D] and c = bias W_dec [D] (None where the
    parameter is None), in the compute dtype of W_dec's dtype."""
    ct = _compute_dtype(W_dec.dtype)
    Wd = W_dec.to(ct)
    return (W_out.to(ct) @ Wd if W_out is not None else None,
            bias.to(ct) @ Wd if bias is not None else None)


def edit_decode_torch(x, values, indices, W_dec, b_dec=None, gain=None, bias=None, W_in=None,
                      b_in=None, W_out=None, activation="relu", mode="delta", *, folded=None):
    """Reference edit + decode on 2-D inputs (DESIGN.md "Edit" and "Decode").

    mode "plain" is sparse_decode: sum_j v_j W_dec[i_j] + b_dec. ``folded``: (M, c) from
    :func:`fold_edit_torch`, computed earlier (else here, once per call).
    """
    ct = _compute_dtype(values.dtype)
    out_dtype = values.dtype
    v, Wd = values.to(ct), W_dec.to(ct)
    idx = indices.long()
    if mode == "plain":
        y = _bag(idx, Wd, v)
        if b_dec is not None:
            y = y + b_dec.to(ct)
        return y.to(out_dtype)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    coef = decode_coef(v, idx, gain.to(ct) if gain is not None else None, mode)
    if mode == "delta":
        y = x.to(ct)
        if coef is not None:
            y = y + _bag(idx, Wd, coef)
    else:
        y = _bag(idx, Wd, coef)
        if b_dec is not None:
            y = y + b_dec.to(ct)
    M, c = folded if folded is not None else fold_edit_torch(Wd, bias, W_out)
    if W_in is not None:
        h = _bag(idx, W_in.to(ct), v)
        if b_in is not None:
            h = h + b_in.to(ct)
        y = y + activation_fn(activation)(h) @ M.to(ct)  # M = W_out W_dec: [h, D]
    if bias is not None:
        y = y + c.to(ct)  # c = bias W_dec: [D]
    return y.to(out_dtype)


def sae_forward_torch(x, W_enc, b_enc, k, b_pre, threshold, W_dec, b_dec):
    """(y, values, indices, overflow): the SAE's encode and plain decode, composed."""
    values, indices, overflow = topk_encode_torch(x, W_enc, b_enc, k, b_pre, threshold)
    return (edit_decode_torch(None, values, indices, W_dec, b_dec, mode="plain"), values,
            indices, overflow)


# ----------------------------------------------------------------------------------------------
# Brute-force definitions (dense N x S); for testing only.


def dense_topk_encode(x, W_enc, b_enc, k, b_pre=None, threshold=None):
    xc = x - b_pre if b_pre is not None else x
    pre = xc @ W_enc.T + b_enc
    _, idx = _topk_stable(pre.detach(), k)
    sel = pre.gather(1, idx)
    keep = sel > 0
    if threshold is not None:
        keep &= sel > threshold[idx]
    values = torch.where(keep, sel, torch.zeros_like(sel))
    active = pre.detach() > 0
    if threshold is not None:
        active &= pre.detach() > threshold
    return values, idx, active.sum(1) > k


def dense_sae_edit(x, values, indices, W_dec, b_dec, gain=None, bias=None, W_in=None, b_in=None,
                   W_out=None, activation="relu", mode="delta"):
    N, S = x.shape[0], W_dec.shape[0]
    z = torch.zeros(N, S, dtype=values.dtype, device=values.device).scatter(1, indices, values)
    zp = z
    if gain is not None:
        zp = zp + z * gain
    if bias is not None:
        zp = zp + bias
    if W_in is not None:
        h = z @ W_in
        if b_in is not None:
            h = h + b_in
        zp = zp + activation_fn(activation)(h) @ W_out
    if mode == "delta":
        return x + (zp - z) @ W_dec
    y = zp @ W_dec
    return y + b_dec if b_dec is not None else y
