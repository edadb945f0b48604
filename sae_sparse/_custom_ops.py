"""The kernel libraries as operators ``torch.compile`` traces without graph breaks (fake
implementations give output shapes, defined once here for both libraries): the triton
launchers wrapped as ``torch.library`` custom ops (``wrap``), and the C++ operators that
csrc/bindings.cpp registers with TORCH_LIBRARY (``register_fakes``).

``wrap(lib, name)`` registers ``sae_sparse::{name}_topk_encode``, ``..._edit_decode_fwd``,
``..._edit_decode_bwd``, ``..._latent_csr``, ``..._segment_rows`` (and ``..._fold``,
``..._fold_t``, ``..._fold_w`` where the library has them) around a kernel library
(see sae_sparse/_autograd.py) and returns an object with the library's interface. Optional
tensor outputs (``h_pre``, ``dh``) travel through the ops as empty [N, 0] tensors.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import Tensor


def _none_if_empty(t):
    return None if t.numel() == 0 and t.dim() == 2 and t.shape[1] == 0 else t


def fake_topk_encode(x, W, b, k, b_pre, thr):
    N = x.shape[0]
    return (x.new_empty(N, k), x.new_empty(N, k, dtype=torch.long),
            x.new_empty(N, dtype=torch.bool))


def fake_edit_decode_fwd(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c, act, mode):
    N = values.shape[0]
    H = W_in.shape[1] if W_in is not None else 0
    return values.new_empty(N, W_dec.shape[1]), values.new_empty(N, H)


def fake_edit_decode_bwd(dy, values, indices, W_dec, gain, W_in, h_pre, M, act, mode):
    N, K = values.shape
    H = W_in.shape[1] if W_in is not None else 0
    return values.new_empty(N, K), values.new_empty(N, K), values.new_empty(N, H)


def fake_latent_csr(padded: bool):
    """padded: ``active`` has min(N*k, S) entries (static), else a data-dependent size."""
    def fake(indices, S):
        A = (min(indices.numel(), S) if padded
             else torch.library.get_ctx().new_dynamic_size())
        return (indices.new_empty(S + 1), indices.new_empty(indices.numel()),
                indices.new_empty(A))
    return fake


def fake_segment_rows(offsets, order, active, coef, src, sub, S, k):
    return src.new_empty(S, src.shape[1]), src.new_empty(S)


def register_fakes(namespace: str):
    """Fake implementations for the C++ operators of ``namespace`` (csrc/bindings.cpp declares
    their schemas with TORCH_LIBRARY), so torch.compile traces them; -> the library
    interface over ``torch.ops.<namespace>`` (absent h_pre / dh as None)."""
    for op, fake in (("topk_encode", fake_topk_encode), ("edit_decode_fwd", fake_edit_decode_fwd),
                     ("edit_decode_bwd", fake_edit_decode_bwd),
                     ("latent_csr", fake_latent_csr(False)),
                     ("segment_rows", fake_segment_rows)):
        torch.library.register_fake(f"{namespace}::{op}")(fake)
    ops = getattr(torch.ops, namespace)

    def fwd(*a):
        y, h = ops.edit_decode_fwd(*a)
        return y, _none_if_empty(h)

    def bwd(*a):
        dv, p, dh = ops.edit_decode_bwd(*a)
        return dv, p, _none_if_empty(dh)

    names = ("topk_encode", "edit_decode_fwd", "edit_decode_bwd", "latent_csr", "segment_rows")
    return types.SimpleNamespace(topk_encode=ops.topk_encode, edit_decode_fwd=fwd,
                                 edit_decode_bwd=bwd, latent_csr=ops.latent_csr,
                                 segment_rows=ops.segment_rows,
                                 ops={n: getattr(ops, n).default for n in names})


def wrap(get_lib, name: str, *, padded_csr: bool = False, fold: bool = False):
    """padded_csr: the library's latent_csr returns ``active`` padded to min(N*k, S) entries
    (a static size) instead of exactly the active latents (a data-dependent size).
    fold: the library has ``fold(A, W)`` / ``fold_t(G, W)`` (the edit's dense folds and their
    backward, fp32 results) and ``fold_w(A, G)`` (their gradient for W, in W's dtype); wrapped
    as ``..._fold`` / ``..._fold_t`` / ``..._fold_w``."""
    ns = f"sae_sparse::{name}_"

    @torch.library.custom_op(ns + "topk_encode", mutates_args=())
    def topk_encode(x: Tensor, W: Tensor, b: Tensor, k: int, b_pre: Optional[Tensor],
                    thr: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(get_lib().topk_encode(x, W, b, k, b_pre, thr))

    topk_encode.register_fake(fake_topk_encode)

    @torch.library.custom_op(ns + "edit_decode_fwd", mutates_args=())
    def edit_decode_fwd(x: Optional[Tensor], values: Tensor, indices: Tensor, W_dec: Tensor,
                        b_dec: Optional[Tensor], gain: Optional[Tensor], W_in: Optional[Tensor],
                        b_in: Optional[Tensor], M: Optional[Tensor], c: Optional[Tensor],
                        act: int, mode: int) -> tuple[Tensor, Tensor]:
        y, h = get_lib().edit_decode_fwd(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M,
                                         c, act, mode)
        return y, (h if h is not None else values.new_empty(values.shape[0], 0))

    edit_decode_fwd.register_fake(fake_edit_decode_fwd)

    @torch.library.custom_op(ns + "edit_decode_bwd", mutates_args=())
    def edit_decode_bwd(dy: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor,
                        gain: Optional[Tensor], W_in: Optional[Tensor], h_pre: Optional[Tensor],
                        M: Optional[Tensor], act: int, mode: int) -> tuple[Tensor, Tensor, Tensor]:
        dv, p, dh = get_lib().edit_decode_bwd(dy, values, indices, W_dec, gain, W_in, h_pre, M,
                                              act, mode)
        return dv, p, (dh if dh is not None else values.new_empty(values.shape[0], 0))

    edit_decode_bwd.register_fake(fake_edit_decode_bwd)

    @torch.library.custom_op(ns + "latent_csr", mutates_args=())
    def latent_csr(indices: Tensor, S: int) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(get_lib().latent_csr(indices, S))

    latent_csr.register_fake(fake_latent_csr(padded_csr))

    @torch.library.custom_op(ns + "segment_rows", mutates_args=())
    def segment_rows(offsets: Tensor, order: Tensor, active: Tensor, coef: Tensor, src: Tensor,
                     sub: Optional[Tensor], S: int, k: int) -> tuple[Tensor, Tensor]:
        return tuple(get_lib().segment_rows(offsets, order, active, coef, src, sub, S, k))

    segment_rows.register_fake(fake_segment_rows)

    def fold_op(op: str, cols: int):
        """The library's op(A, W) -> fp32 [A.shape[0], W.shape[cols]] (fold: W's columns;
        fold_t: W's rows)."""
        @torch.library.custom_op(ns + op, mutates_args=())
        def f(A: Tensor, W: Tensor) -> Tensor:
            return getattr(get_lib(), op)(A, W)

        @f.register_fake
        def _(A, W):
            return A.new_empty(A.shape[0], W.shape[cols], dtype=torch.float32)
        return f

    folds = {}
    if fold:
        @torch.library.custom_op(ns + "fold_w", mutates_args=())
        def fold_w(A: Tensor, G: Tensor) -> Tensor:
            return get_lib().fold_w(A, G)

        @fold_w.register_fake
        def _(A, G):
            return A.new_empty(A.shape[1], G.shape[1])

        folds = dict(fold=fold_op("fold", 1), fold_t=fold_op("fold_t", 0), fold_w=fold_w)

    def fwd(*a):
        y, h = edit_decode_fwd(*a)
        return y, _none_if_empty(h)

    def bwd(*a):
        dv, p, dh = edit_decode_bwd(*a)
        return dv, p, _none_if_empty(dh)

    return types.SimpleNamespace(topk_encode=topk_encode, edit_decode_fwd=fwd,
                                 edit_decode_bwd=bwd, latent_csr=latent_csr,
                                 segment_rows=segment_rows, **folds,
                                 ops=dict(topk_encode=topk_encode, edit_decode_fwd=edit_decode_fwd,
                                          edit_decode_bwd=edit_decode_bwd, latent_csr=latent_csr,
                                          segment_rows=segment_rows, **folds))
