"""The ``cpp`` backend: autograd Functions over the C++ CPU extension ``sae_sparse._C``."""
from __future__ import annotations

import torch

import importlib.util

if importlib.util.find_spec(f"{__package__}._C") is None:  # SAE_SPARSE_NO_NATIVE=1 builds none
    _C = None
    IMPORT_ERROR = "sae_sparse._C was not built (reinstall without SAE_SPARSE_NO_NATIVE=1)"
else:
    try:
        from . import _C
    except ImportError as e:  # pragma: no cover - a broken build, e.g. a torch ABI mismatch
        _C = None
        IMPORT_ERROR = f"sae_sparse._C failed to load: {e}"
    else:
        IMPORT_ERROR = None

from .reference import activation_fn

_MODES = {"delta": 0, "replace": 1, "plain": 2}
_ACTS = {"relu": 0, "gelu": 1, "identity": 2}


def available() -> bool:
    return _C is not None


def _needs(ctx, i):
    return ctx.needs_input_grad[i]


class TopKEncodeCPU(torch.autograd.Function):
    """values, indices, overflow = topk(relu((x - b_pre) W_enc^T + b_enc)); top-k held fixed."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, b_pre, threshold):
        values, indices, overflow = _C.topk_encode(x, W_enc, b_enc, k, b_pre, threshold)
        ctx.save_for_backward(x, W_enc, b_pre, values, indices)
        ctx.mark_non_differentiable(indices, overflow)
        return values, indices, overflow

    @staticmethod
    def backward(ctx, dvalues, _di, _do):
        x, W_enc, b_pre, values, indices = ctx.saved_tensors
        S, k = W_enc.shape[0], values.shape[1]
        dpre = torch.where(values != 0, dvalues, torch.zeros_like(dvalues)).contiguous()
        dx = dW = db = dbp = None
        if _needs(ctx, 0) or _needs(ctx, 4):
            dx, _ = _C.edit_decode_fwd(None, dpre, indices, W_enc, None, None, None, None, None,
                                       None, 0, _MODES["plain"])
            if _needs(ctx, 4):
                dbp = -dx.sum(0)
        if _needs(ctx, 1) or _needs(ctx, 2):
            off, order, active = _C.latent_csr(indices, S)
            dW, db = _C.segment_rows(off, order, active, dpre, x, b_pre, S, k)
        return dx if _needs(ctx, 0) else None, dW, db, None, dbp, None


class EditDecodeCPU(torch.autograd.Function):
    """y = edit-decode(x, values, indices) with the folded M = W_out W_dec and c = bias W_dec."""

    @staticmethod
    def forward(ctx, x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c, act, mode):
        y, h_pre = _C.edit_decode_fwd(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c,
                                      _ACTS[act], _MODES[mode])
        ctx.save_for_backward(values, indices, W_dec, gain, W_in, h_pre, M)
        ctx.act, ctx.mode = act, mode
        return y

    @staticmethod
    def backward(ctx, dy):
        values, indices, W_dec, gain, W_in, h_pre, M = ctx.saved_tensors
        act, mode = ctx.act, ctx.mode
        dy = dy.contiguous()
        S, k = W_dec.shape[0], values.shape[1]
        dv, p, dh = _C.edit_decode_bwd(dy, values, indices, W_dec, gain, W_in, h_pre, M,
                                       _ACTS[act], _MODES[mode])
        grads = [None] * 12
        grads[0] = dy if (mode == "delta" and _needs(ctx, 0)) else None
        grads[1] = dv if _needs(ctx, 1) else None
        csr = None

        def segment(coef, src):
            nonlocal csr
            if csr is None:
                csr = _C.latent_csr(indices, S)
            return _C.segment_rows(*csr, coef.contiguous(), src, None, S, k)

        if _needs(ctx, 3):  # W_dec: sparse rows; the M and c paths come back through autograd
            if mode == "plain":
                coef = values
            elif mode == "delta":
                coef = values * gain[indices] if gain is not None else None
            else:
                coef = values * (1 + gain[indices]) if gain is not None else values
            grads[3] = segment(coef, dy)[0] if coef is not None else torch.zeros_like(W_dec)
        if _needs(ctx, 4):
            grads[4] = dy.sum(0)
        if _needs(ctx, 5):
            grads[5] = segment(values * p, values.new_zeros(values.shape[0], 0))[1]
        if W_in is not None:
            if _needs(ctx, 6):
                grads[6] = segment(values, dh)[0]
            if _needs(ctx, 7):
                grads[7] = dh.sum(0)
            if _needs(ctx, 8):
                grads[8] = activation_fn(act)(h_pre).T @ dy
        if _needs(ctx, 9):
            grads[9] = dy.sum(0)
        return tuple(grads)


def topk_encode_cpp(x, W_enc, b_enc, k, b_pre=None, threshold=None):
    return TopKEncodeCPU.apply(x, W_enc, b_enc, k, b_pre, threshold)


def edit_decode_cpp(x, values, indices, W_dec, b_dec=None, gain=None, bias=None, W_in=None,
                    b_in=None, W_out=None, activation="relu", mode="delta"):
    if activation not in _ACTS:
        raise ValueError(f"activation must be one of {tuple(_ACTS)}, got {activation!r}")
    M = W_out @ W_dec if W_in is not None else None  # [h, D], once per step
    c = bias @ W_dec if bias is not None else None  # [D], once per step
    if mode == "plain":
        gain = W_in = b_in = M = c = None
    return EditDecodeCPU.apply(x if mode == "delta" else None, values, indices.long(), W_dec,
                               b_dec if mode != "delta" else None, gain, W_in, b_in, M, c,
                               activation, mode)
