"""Functional API: ``topk_encode``, ``sparse_decode``, ``sae_edit``.

Leading dimensions of x are flattened and restored. Every op is differentiable with respect
to every floating input (the top-k selection is held fixed in backward, DESIGN.md "Backward"),
except the JumpReLU ``threshold``, which gets no gradient.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from . import _validate as V
from ._gather import gather_dot
from ._auxk import AuxKDecode
from ._auxk import select as auxk_select
from .backends import decode_fn, encode_fn, fold_fn, resolve, sae_fn
from .codes import act_code, mode_code
from .reference import ACTIVATIONS, MODES
from .triton import available as _triton_available
from .triton.paths import forced as forced_path

if _triton_available():
    from .triton.functions import FusedSAEEdit, FusedSAEForward


def _lowp_to_fp32(backend: str, *ts, keep=()):
    """The cpp kernels compute in fp32 / fp64: bf16 / fp16 inputs go in as fp32 copies
    (autograd-tracked), except the weight matrices at positions ``keep`` (W_enc, W_dec),
    which the kernels read as stored: no [S, D] fp32 copy of a low-precision dictionary."""
    if backend == "cpp":
        return tuple(t.float() if (isinstance(t, torch.Tensor) and j not in keep and
                                   t.dtype in (torch.float16, torch.bfloat16))
                     else t for j, t in enumerate(ts))
    return ts


def topk_encode(x, W_enc, b_enc, k, *, b_pre=None, threshold=None, backend=None,
                return_overflow=False, path=None):
    """Top-k SAE encode without materialising the N x S pre-activations.

    ``pre = (x - b_pre) @ W_enc.T + b_enc``; per row the k largest entries of ``pre`` in
    descending order (ties: smaller latent index first); ``values = relu(pre[idx])``, and with a
    JumpReLU ``threshold``, ``where(pre[idx] > threshold[idx], relu(pre[idx]), 0)``.

    Args:
        x: [..., D] activations (fp32, fp64, bf16 or fp16; must be finite).
        W_enc: [S, D] encoder, one row per latent. b_enc: [S].
        k: number of latents kept per row, 1 <= k <= S (for ReLU/JumpReLU SAEs: a cap, k_max).
        b_pre: optional [D] bias subtracted from x before encoding.
        threshold: optional [S] JumpReLU thresholds (no gradient).
        backend: "torch", "cpp" or None (fastest available; $SAE_SPARSE_BACKEND overrides None).
        return_overflow: also return the number of rows with more than k active latents
            (pre > 0, and > threshold when given) -- the rows where the cap changed the result.
        path: triton backend only: "fused" (the Triton kernels), "torch" (row-chunked
            F.linear + torch.topk) or "auto"/None (on a GPU the faster for this shape, timed
            on first use; $SAE_SPARSE_PATH overrides None).

    Returns:
        values [..., k] in x's dtype, indices [..., k] int64
        (and a 0-dim int64 tensor ``n_overflow`` when ``return_overflow``).

    Example:
        >>> x = torch.randn(4, 16); W = torch.randn(100, 16); b = torch.zeros(100)
        >>> values, indices = topk_encode(x, W, b, k=8)
    """
    values, indices, overflow = encode_rows(x, W_enc, b_enc, k, b_pre=b_pre,
                                            threshold=threshold, backend=backend, path=path)
    return (values, indices, overflow.sum()) if return_overflow else (values, indices)


def encode_rows(x, W_enc, b_enc, k, *, b_pre=None, threshold=None, backend=None, path=None):
    """:func:`topk_encode` with the per-row overflow flags: -> (values, indices, [...] bool,
    True where a row has more than k active latents). ``SAE.encode`` keeps the flags and
    counts them only when ``last_overflow`` is read (no reduction launched per step)."""
    D, S = V.check_encoder(x, W_enc, b_enc, k, b_pre, threshold)
    name = resolve(backend, x.device, x.dtype)
    if name != "triton":  # triton makes no host sync to look: non-finite rows come back NaN
        V.check_finite(x, "x")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, D)
    args = _lowp_to_fp32(name, x2, W_enc, b_enc, b_pre, threshold, keep=(1,))
    with forced_path(path):
        values, indices, overflow = encode_fn(name)(args[0], args[1], args[2], k, args[3],
                                                    args[4])
    return (values.to(x.dtype).reshape(*lead, k), indices.reshape(*lead, k),
            overflow.reshape(lead))


def sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, *, b_pre=None, threshold=None,
                backend=None, return_overflow=False, path=None):
    """A top-k SAE's forward pass as one op: ``y = decode(topk_encode(x)) + b_dec``, with
    the code. The functional form of :meth:`SAE.forward`, for training code that keeps its
    own parameters (sparsify's ``encode`` + ``decode``, SAELens-style modules).

    One autograd op for encode and decode: on the kernel backends its backward groups the
    N*k (token, slot) pairs by latent once and uses that for dW_dec and for dW_enc / db_enc
    (the composed :func:`topk_encode` + :func:`sparse_decode` sort twice).

    Args:
        x: [..., D]. W_enc: [S, D]. b_enc: [S]. W_dec: [S, D]. b_dec: [D].
        k, b_pre, threshold, backend: as in :func:`topk_encode`. Pass the same tensor as
            ``b_pre`` and ``b_dec`` for the tied decoder bias of sparsify / SAELens
            (``apply_b_dec_to_input``); its gradient then sums both uses.
        return_overflow: also return the number of rows with more than k active latents.
        path: as in :func:`topk_encode` (the encode and the decode each choose).

    Returns:
        y [..., D], values [..., k], indices [..., k] int64 (and ``n_overflow``, a 0-dim
        int64 tensor, with ``return_overflow``). Gradients reach every floating input
        except ``threshold``; a loss on ``values`` reaches the encoder too.

    Example (sparsify's ``SparseCoder.forward``, whose encoder reads ``x - b_dec``):
        >>> y, top_acts, top_idx = sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, b_pre=b_dec)
    """
    *out, overflow = forward_rows(x, W_enc, b_enc, W_dec, b_dec, k, b_pre=b_pre,
                                  threshold=threshold, backend=backend, path=path)
    return (*out, overflow.sum()) if return_overflow else tuple(out)


def forward_rows(x, W_enc, b_enc, W_dec, b_dec, k, *, b_pre=None, threshold=None,
                 backend=None, path=None):
    """:func:`sae_forward` with the per-row overflow flags (as :func:`encode_rows`)."""
    D, S = V.check_encoder(x, W_enc, b_enc, k, b_pre, threshold)
    V.check_tensor(W_dec, "W_dec", (S, D), like=x)
    V.check_tensor(b_dec, "b_dec", (D,), like=x)
    name = resolve(backend, x.device, x.dtype)
    if name != "triton":  # triton makes no host sync to look: non-finite rows come back NaN
        V.check_finite(x, "x")
    lead = x.shape[:-1]
    if name == "triton" and not torch.compiler.is_compiling():  # the fused step, eager
        tied = b_pre is not None and b_pre is b_dec
        with forced_path(path):
            y, values, indices, overflow = FusedSAEForward.apply(
                x.reshape(-1, D), W_enc, b_enc, None if tied else b_pre, threshold, W_dec,
                b_dec, k, tied)
    else:
        a = _lowp_to_fp32(name, x.reshape(-1, D), W_enc, b_enc, b_pre, threshold, W_dec, b_dec,
                          keep=(1, 5))
        if b_pre is not None and b_pre is b_dec:  # keep the tie through the fp32 copies
            a = a[:3] + (a[6],) + a[4:]
        y, values, indices, overflow = sae_fn(name)(a[0], a[1], a[2], k, a[3], a[4], a[5],
                                                    a[6])
    return (y.to(x.dtype).reshape(*lead, D), values.to(x.dtype).reshape(*lead, k),
            indices.reshape(*lead, k), overflow.reshape(lead))


def _dead_latents(x, W_enc, b_enc, dead_mask, k_aux, b_pre):
    """AuxK's shared checks: (D, S, the dead latents' ids, k_aux clamped to their number).
    One host sync (the number of dead latents sets the shapes)."""
    D, S = V.check_encoder(x, W_enc, b_enc, 1, b_pre, None)
    V.check_tensor(dead_mask, "dead_mask", (S,), like=x, dtype=torch.bool)
    if isinstance(k_aux, bool) or not isinstance(k_aux, int) or k_aux < 1:
        raise ValueError(f"k_aux must be an int >= 1, got {k_aux!r}")
    dead = dead_mask.nonzero().reshape(-1)
    return D, S, dead, min(k_aux, dead.numel())


def auxk_encode(x, W_enc, b_enc, dead_mask, k_aux, *, b_pre=None, backend=None,
                relu: bool = True):
    """AuxK encode (OpenAI's top-k SAE paper, App. B.1; sparsify): per row the ``k_aux`` largest
    pre-activations among the *dead* latents only, as :func:`topk_encode` computes them.

    The dead rows of W_enc / b_enc are gathered into a compact [n_dead, D] encoder and the
    top-k op runs on it, so the cost is an n_dead (not S) wide GEMM and no N x S tensor
    exists; gradients reach x, b_pre and the dead rows of W_enc / b_enc.
    ``k_aux`` is clamped to the number of dead latents (sparsify's ``min(k_aux, num_dead)``);
    with none dead, empty [..., 0] tensors come back. Ties among equal values go to the
    smaller latent index; entries whose pre-activation is <= 0 come back with value 0 (they
    add nothing to an AuxK reconstruction and get no gradient, as in sparsify, where their
    order among the zeros is arbitrary).

    Args:
        x: [..., D]. W_enc: [S, D]. b_enc: [S]. dead_mask: [S] bool, True for dead latents
        (e.g. not fired in the last 10M tokens). k_aux: int >= 1 (sparsify uses D // 2).
        b_pre: optional [D] subtracted from x first. backend: as in :func:`topk_encode`.
        relu: False returns the raw pre-activations of the selected latents (negative ones
        too, all with gradients), as SAELens's TopK AuxK takes them.

    Returns:
        values [..., min(k_aux, n_dead)] in x's dtype, indices [..., min(k_aux, n_dead)] int64
        latent ids in [0, S). One host sync (the number of dead latents sets the shapes).

    Example (the AuxK loss of a top-k SAE, with ``e = x - x_hat`` the main reconstruction's
    residual):
        >>> v, i = auxk_encode(x, sae.W_enc, sae.b_enc, dead_mask, x.shape[-1] // 2)
        >>> e_hat = sparse_decode(v, i, sae.W_dec)
        >>> aux_loss = (e_hat - e.detach()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    """
    D, S, dead, kk = _dead_latents(x, W_enc, b_enc, dead_mask, k_aux, b_pre)
    if kk == 0:
        return x.new_empty(*x.shape[:-1], 0), torch.empty(*x.shape[:-1], 0, dtype=torch.long,
                                                         device=x.device)
    We, be = W_enc.index_select(0, dead), b_enc.index_select(0, dead)
    if relu:
        values, idx = topk_encode(x, We, be, kk, b_pre=b_pre, backend=backend)
        return values, dead[idx]
    # SAELens: the raw pre-activations of the selected dead latents, negative ones included
    with torch.no_grad():
        _, idx = topk_encode(x, We, be, kk, b_pre=b_pre, backend=backend)
    x2 = x.reshape(-1, D)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x2.to(ct) - b_pre.to(ct) if b_pre is not None else x2.to(ct)
    pre = gather_dot(xc, We.to(ct), be.to(ct), idx.reshape(-1, kk))
    return pre.to(x.dtype).reshape(idx.shape), dead[idx]


def auxk_decode(x, W_enc, b_enc, W_dec, dead_mask, k_aux, *, b_pre=None, b_dec=None,
                backend=None, relu: bool = True):
    """The AuxK reconstruction ``e_hat``: :func:`auxk_encode` followed by its decode, with
    the decode and the whole backward as dense GEMMs over the dead latents.

    Equal to ``sparse_decode(*auxk_encode(x, W_enc, b_enc, dead_mask, k_aux, b_pre=b_pre),
    W_dec, b_dec)`` (the same latents up to exact ties, the same gradients up to rounding)
    but built for sparsify's ``k_aux = D // 2``: that sparse code has hundreds to thousands
    of latents per token and its decode + backward gather ``N * k_aux * D`` elements four
    times, while every latent it can name is dead. Here the code is a dense [rows, n_dead]
    matrix and the decode, dvalues, dW_dec, dx and dW_enc are GEMMs of width n_dead
    (``2 * N * n_dead * D`` flops each). The selection is the triton backend's top-k encode
    over the gathered dead rows, or on the other backends row-chunked fp32 (fp64 for fp64)
    GEMMs and ``torch.topk``: the pre-activations :func:`topk_encode` computes.
    Extra memory: [rows, n_dead] chunks within 64 MiB, the compact dead rows of W_enc and
    W_dec (and an fp32 copy of W_enc's for the selection of a bf16/fp16 x off triton), the
    [N, min(k_aux, n_dead)] selection, and, for bf16/fp16 over several row chunks, fp32 sums
    of the weight gradients. For a code with few latents among very many dead ones (n_dead
    hundreds of times k_aux) the sparse composition above is cheaper.

    Args:
        x: [..., D]. W_enc: [S, D]. b_enc: [S]. W_dec: [S, D]. dead_mask: [S] bool.
        k_aux: int >= 1 (sparsify uses D // 2), clamped to the number of dead latents.
        b_pre: optional [D] subtracted from x before encoding. b_dec: optional [D] added to
        e_hat (sparsify's ``self.decode`` adds it). backend: as in :func:`topk_encode`; only
        "triton" changes how the latents are selected.
        relu: False decodes the selected pre-activations as they are, negative ones
            included, and trains the encoder through all of them (SAELens's TopK AuxK);
            True (sparsify, the paper) takes relu of them.

    Returns:
        e_hat [..., D] in x's dtype (just ``b_dec``, or zeros, when no latent is dead);
        differentiable with respect to x, W_enc, b_enc, W_dec, b_pre and b_dec (only the dead
        rows of W_enc, b_enc, W_dec get nonzero gradients). Host syncs: one for the number
        of dead latents (it sets the shapes), and the selection's own.

    Example (sparsify's AuxK loss, ``e = x - x_hat`` the main reconstruction's residual):
        >>> e_hat = auxk_decode(x, sae.W_enc, sae.b_enc, sae.W_dec, dead_mask,
        ...                     x.shape[-1] // 2, b_pre=sae.b_pre, b_dec=sae.b_dec)
        >>> scale = min(int(dead_mask.sum()) / (x.shape[-1] // 2), 1.0)
        >>> aux_loss = scale * (e_hat - e.detach()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    """
    D, S, dead, kk = _dead_latents(x, W_enc, b_enc, dead_mask, k_aux, b_pre)
    V.check_tensor(W_dec, "W_dec", (S, D), like=x)
    if b_dec is not None:
        V.check_tensor(b_dec, "b_dec", (D,), like=x)
    name = resolve(backend, x.device, x.dtype)
    if name != "triton":  # triton: non-finite rows come back NaN (no host sync to look)
        V.check_finite(x, "x")
    x2 = x.reshape(-1, D)
    if kk == 0 or x2.shape[0] == 0:
        out = torch.zeros_like(x)
        return out + b_dec if b_dec is not None else out
    We, be = W_enc.index_select(0, dead), b_enc.index_select(0, dead)
    Wd = W_dec.index_select(0, dead)
    with torch.no_grad():
        if name == "triton" and relu:  # bf16/fp16 tensor-core products summed in fp32
            values, idx = topk_encode(x2, We, be, kk, b_pre=b_pre, backend="triton")
        else:
            values, idx = auxk_select(x2, We, be, b_pre, kk, relu=relu)
    e_hat = AuxKDecode.apply(x2, We, be, b_pre, Wd, values, idx, relu)
    if b_dec is not None:
        e_hat = e_hat + b_dec
    return e_hat.reshape(x.shape)


_FOLDS = threading.local()  # .entries: the cache of the innermost cached_folds() context
_MAX_FOLDS = 64


@contextlib.contextmanager
def cached_folds():
    """Reuse an adapter's dense edit terms across calls, for inference (generation, eval).

    An adapter with a ``bias`` or an FFN adds ``c = bias @ W_dec`` and ``M = W_out @ W_dec``
    to every token's edit. :func:`sae_edit` computes them on every call, a read of all of
    W_dec (S x D): with one token per call (generation) that is as much memory traffic as the
    encode itself. Inside this context a call whose folds need no gradient (under
    ``torch.no_grad()``, or with the adapter and W_dec frozen) computes them once per
    (SAE, adapter) pair and reuses them while ``W_dec``, ``bias``, ``W_out`` and the latent
    mask are the same tensor objects with unchanged version counters and storage. Every
    in-place update through autograd-visible ops (optimizer steps, ``copy_`` under
    ``no_grad``, ``load_state_dict``) bumps the version and refolds; changes made through
    ``.data`` are invisible to version counters, so do not modify weights that way inside
    the context. Like ``torch.nn.utils.parametrize.cached()``: the cache belongs to the thread
    that entered the context and ends with it.

    Example:
        >>> edits = ss.attach(model, {"model.layers.6": (sae, adapter)})
        >>> with torch.no_grad(), ss.cached_folds():
        ...     out = model.generate(input_ids, max_new_tokens=64)
    """
    prev = getattr(_FOLDS, "entries", None)
    _FOLDS.entries = {}
    try:
        yield
    finally:
        _FOLDS.entries = prev


def _stamp(t):
    # (weak reference, version, storage) of a source tensor; inference tensors have no
    # version counter, so they are never cached (RuntimeError)
    return None if t is None else (weakref.ref(t), t._version, t.data_ptr())


def _unchanged(stamp, t):
    if stamp is None or t is None:
        return stamp is None and t is None
    ref, version, ptr = stamp
    return ref() is t and t._version == version and t.data_ptr() == ptr


def _cached_fold(name, sources, W_dec, bias, W_out):
    """The backend's (M, c) from the innermost cached_folds() context, computing it on a miss;
    None when no context is active or the folds need a gradient. ``sources``: the tensors
    (M, c) derive from, whose identity and versions key the entry."""
    entries = getattr(_FOLDS, "entries", None)
    if entries is None or (bias is None and W_out is None) or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (W_dec, bias, W_out)):
        return None
    key = (name, W_dec.dtype, W_dec.device, torch.is_inference_mode_enabled(),
           *(id(t) for t in sources))
    hit = entries.get(key)
    if hit is not None and all(_unchanged(st, t) for st, t in zip(hit[0], sources)):
        return hit[1]
    try:
        stamps = tuple(_stamp(t) for t in sources)
    except RuntimeError:  # an inference tensor among the sources
        return None
    folded = fold_fn(name)(W_dec, bias, W_out)
    if len(entries) >= _MAX_FOLDS:  # e.g. a fresh temporary bias per call: no reuse anyway
        entries.clear()
    entries[key] = (stamps, folded)
    return folded


def _edit_decode(x, values, indices, W_dec, b_dec, adapter_params, activation, mode, backend,
                 fold_sources=None):
    name = resolve(backend, values.device, values.dtype)
    S, D = W_dec.shape
    lead = values.shape[:-1]
    k = values.shape[-1]
    p = adapter_params
    ts = (x.reshape(-1, D) if x is not None else None, values.reshape(-1, k), W_dec, b_dec,
          p.get("gain"), p.get("bias"), p.get("W_in"), p.get("b_in"), p.get("W_out"))
    ts = _lowp_to_fp32(name, *ts, keep=(2,))
    folded = (_cached_fold(name, fold_sources, ts[2], ts[5], ts[8])
              if fold_sources is not None and mode != "plain" else None)
    y = decode_fn(name)(ts[0], ts[1], indices.reshape(-1, k).long(), *ts[2:],
                        activation=activation, mode=mode, folded=folded)
    return y.to(values.dtype).reshape(*lead, D)


def sparse_decode(values, indices, W_dec, b_dec=None, *, backend=None):
    """``y = sum_j values[..., j] * W_dec[indices[..., j]] + b_dec``.

    Args:
        values: [..., k] latent values; indices: [..., k] int64 latent ids in [0, S).
        W_dec: [S, D] decoder, one row per latent. b_dec: optional [D].
    Returns:
        y [..., D] in values' dtype.
    """
    S, D = V.check_code(values, indices, W_dec)
    if b_dec is not None:
        V.check_tensor(b_dec, "b_dec", (D,), like=values)
    return _edit_decode(None, values, indices, W_dec, b_dec, {}, "identity", "plain", backend)


def edit_decode(x, values, indices, W_dec, b_dec=None, *, gain=None, bias=None, W_in=None,
                b_in=None, W_out=None, activation="relu", mode="delta", backend=None):
    """The edit + decode half of :func:`sae_edit`, on a given sparse code (DESIGN.md "Edit").

    ``z'_i = z_i (1 + gain_i) + bias_i + (W_out^T act(W_in^T z + b_in))_i`` and
    ``delta``: ``y = x + (z' - z) @ W_dec``; ``replace``: ``y = z' @ W_dec + b_dec``.
    Shapes: x [..., D], values/indices [..., k], W_dec [S, D], gain/bias [S], W_in [S, h],
    b_in [h], W_out [h, S].
    """
    return _checked_edit_decode(x, values, indices, W_dec, b_dec, gain, bias, W_in, b_in, W_out,
                                activation, mode, backend, check_range=True,
                                fold_sources=(W_dec, bias, W_out))


def _checked_edit_decode(x, values, indices, W_dec, b_dec, gain, bias, W_in, b_in, W_out,
                         activation, mode, backend, *, check_range, fold_sources=None):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    S, D = V.check_code(values, indices, W_dec, check_range=check_range)
    if mode == "delta":
        if x is None:
            raise ValueError("x is required in delta mode")
        V.check_tensor(x, "x", (*values.shape[:-1], D), like=values)
    if b_dec is not None:
        V.check_tensor(b_dec, "b_dec", (D,), like=values)
    params = {}
    for name, t in (("gain", gain), ("bias", bias)):
        if t is not None:
            V.check_tensor(t, name, (S,), like=values)
            params[name] = t
    if (W_in is None) != (W_out is None):
        raise ValueError("W_in and W_out must be given together")
    if W_in is not None:
        V.check_tensor(W_in, "W_in", (S, None), like=values)
        h = W_in.shape[1]
        V.check_tensor(W_out, "W_out", (h, S), like=values)
        params.update(W_in=W_in, W_out=W_out)
        if b_in is not None:
            V.check_tensor(b_in, "b_in", (h,), like=values)
            params["b_in"] = b_in
    return _edit_decode(x, values, indices, W_dec, b_dec, params, activation, mode, backend,
                        fold_sources)


def sae_edit(x, sae, adapter=None, *, mode="delta", backend=None, path=None):
    """Encode with ``sae``, apply ``adapter`` to the active latents, decode -- in one call.

    Args:
        x: [..., D] activations.
        sae: a :class:`sae_sparse.SAE`.
        adapter: a :class:`sae_sparse.LatentAdapter` or None (no edit).
        mode: ``"delta"`` (default; ``y = x + (z' - z) @ W_dec``, keeps the SAE's reconstruction
            error so a zero edit returns x exactly) or ``"replace"`` (``y = z' @ W_dec + b_dec``).
        backend, path: as in :func:`topk_encode`.
    Returns:
        y [..., D] in x's dtype.

    For inference (generation, evaluation), call it inside :func:`cached_folds` so an
    adapter's dense terms are computed once instead of per call.

    Example:
        >>> sae = SAE.random(d_in=64, d_sae=1000, k=16)
        >>> adapter = LatentAdapter(1000, hidden=8)
        >>> y = sae_edit(torch.randn(2, 5, 64), sae, adapter)   # == x at initialisation
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if adapter is not None and adapter.d_sae != sae.d_sae:
        raise ValueError(f"adapter.d_sae={adapter.d_sae} does not match sae.d_sae={sae.d_sae}")
    V.check_x(x)
    dtype = sae.W_dec.dtype  # compute in the SAE's dtype; autograd tracks the casts
    if (resolve(backend, x.device, dtype) == "triton" and not torch.compiler.is_compiling()
            and getattr(_FOLDS, "entries", None) is None):  # (cached_folds: the composed ops)
        with forced_path(path):
            return _sae_edit_fused(x, sae, adapter, mode)
    with forced_path(path):
        values, indices = sae.encode(x.to(dtype), backend=backend)
    p = {n: t.to(dtype) for n, t in adapter.edit_params().items()} if adapter is not None else {}
    act = adapter.activation if adapter is not None else "relu"
    # indices come from the encoder: in range by construction
    y = _checked_edit_decode(x.to(dtype), values, indices, sae.W_dec, sae.b_dec, p.get("gain"),
                             p.get("bias"), p.get("W_in"), p.get("b_in"), p.get("W_out"), act,
                             mode, backend, check_range=False,
                             fold_sources=_fold_sources(sae, adapter))
    return y.to(x.dtype)


def _fold_sources(sae, adapter):
    return ((sae.W_dec, adapter.bias, adapter.W_out, adapter.latent_mask)
            if adapter is not None else None)


def _sae_edit_fused(x, sae, adapter, mode):
    """sae_edit on the triton backend, eager: one autograd op (encode, fold, fused edit +
    decode; its backward: one per-token kernel, the folds' GEMMs, one per-latent sum). The
    adapter's parameters go in in their own dtype (the kernels load them and sum in fp32)."""
    p = adapter.edit_params() if adapter is not None else {}
    act = adapter.activation if adapter is not None else "relu"
    for n, t in p.items():
        V.check_tensor(t, n, tuple(t.shape), like=x, dtype=t.dtype)  # device
    D = sae.d_in
    tied = sae.tied_b_pre
    xs = x.to(sae.W_dec.dtype)
    y, overflow = FusedSAEEdit.apply(xs.reshape(-1, D), sae.W_enc, sae.b_enc,
                                None if tied else sae.b_pre, sae.threshold, sae.W_dec,
                                sae.b_dec, p.get("gain"), p.get("bias"), p.get("W_in"),
                                p.get("b_in"), p.get("W_out"), sae.k, act_code(act),
                                mode_code(mode), tied)
    sae._overflow_rows = overflow
    return y.reshape(x.shape).to(x.dtype)
