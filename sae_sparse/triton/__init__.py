"""The ``triton`` backend (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for tests).

One module per phase, each kernel beside its launcher:

* ``encode``      -- top-k encode (GEMM with a per-tile top-m epilogue, select, settle)
* ``edit_decode`` -- the fused edit + decode forward
* ``backward``    -- per-token backward, the dense FFN/bias backward, per-latent sums
* ``fold``        -- the edit's dense terms M = W_out W_dec, c = bias W_dec and their gradients
* ``functions``   -- the autograd Functions of a whole step (``FusedSAEEdit``, ``FusedSAEForward``)

This module also gives the kernel-library interface the shared autograd ops of
``sae_sparse/_autograd.py`` (and the ``torch.library`` custom ops that torch.compile traces)
take: ``topk_encode``, ``edit_decode_fwd``, ``edit_decode_bwd``, ``latent_csr``,
``segment_rows``, ``fold``, ``fold_t``, ``fold_w`` -- each a thin call of the phase modules.
"""
from __future__ import annotations

import torch

from ._common import IMPORT_ERROR, available, interpreting, supports  # noqa: F401

if available():
    from . import backward as _bwd
    from . import edit_decode as _ed
    from . import encode as _enc
    from . import fold as _fold
    from . import paths  # noqa: F401
    from .backward import DENSE, SEGMENT, TOKEN  # noqa: F401
    from .edit_decode import DECODE  # noqa: F401
    from .encode import ENCODE  # noqa: F401
    from .fold import FOLD  # noqa: F401


def topk_encode(x, W, b, k, b_pre, thr):
    return _enc.topk_encode(x, W, b, k, b_pre, thr)


def edit_decode_fwd(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c, act, mode):
    """(y, h_pre) given the folded M [h, D] and c [D] (fp32)."""
    F, has_c = M, c is not None
    if c is not None:
        F = c[None] if M is None else torch.cat([M, c[None]])
    return _ed.edit_decode_fwd(x, values, indices, W_dec, b_dec, gain, W_in, b_in, F, act,
                               mode, has_c=has_c)


def edit_decode_bwd(dy, values, indices, W_dec, gain, W_in, h_pre, M, act, mode):
    """(dvalues [N, k], p = dy . W_dec[i] [N, k], dh [N, h] or None), values' dtype."""
    o = _bwd.token_bwd(dy, values, indices, W_dec, mode=mode, act=act, gain=gain, W_in=W_in,
                       h_pre=h_pre.float() if h_pre is not None else None,
                       F=M.float().contiguous() if M is not None else None, store_p=True,
                       store_dpre=True, mask_dpre=False)
    dt = values.dtype
    return o["dpre"].to(dt), o["p"].to(dt), o["dh"].to(dt) if "dh" in o else None


def latent_csr(indices, S):
    """As backward.latent_csr, with ``active`` padded to a static size: all S latents when
    N*k >= S (the custom ops' fake implementations need static sizes)."""
    offsets, order, active = _bwd.latent_csr(indices, S, active_list=True)
    if active is None:
        active = torch.arange(S, device=indices.device)
    return offsets, order, active


def segment_rows(offsets, order, active, coef, src, sub, S, k):
    """(out [S, C] in src's dtype, csum [S]): out[s] = sum over s's pairs e of coef[e]
    src[e // k] - csum[s] sub, csum[s] = sum coef[e]."""
    full = active.numel() == S and S > 0
    o = _bwd.latent_bwd((offsets, order, None if full else active), S, k, dpre=coef.float(),
                        x=src, b_pre=sub, need_wenc=True, need_benc=True, wenc_dtype=src.dtype)
    return o["W_enc"], o["b_enc"]


def fold(A, W):
    """A [R, S] @ W [S, D] -> fp32 [R, D]."""
    return _fold.fold(W, None, A)


def fold_t(G, W):
    return _fold.fold_t(G, W)


def fold_w(A, G):
    """A^T G -> [S, D] in A's dtype."""
    return _fold.fold_w(G, A.shape[1], A.dtype, None, A)
