"""Latent-sharded SAEs and adapters on torch.distributed (NCCL on GPUs, gloo on CPUs).

A dictionary too large for one device is split by latents: rank r of P holds rows
``[s0, s1)`` of ``W_enc``, ``b_enc``, ``W_dec`` (and the JumpReLU threshold) and the same slice
of an adapter's per-latent parameters (``gain``, ``bias``, ``W_in`` rows, ``W_out`` columns);
``b_dec``, ``b_pre`` and the FFN's ``b_in`` are replicated. Every rank sees the same tokens.
S need not divide by P (the first ``S mod P`` ranks hold one latent more).

Per call, exactly as the one-process op (same values, indices, overflow; the same gradients):

* encode: each rank selects its shard's top-k by pre-activation (a GEMM + top-k per latent
  chunk, ties to the smaller index) and counts its active latents; **one** ``all_gather`` of
  the P·k (pre-activation, global index) candidates per row (and the counts) lets every rank
  take the global top-k with the same tie rule, and the overflow flag;
* each rank computes the values of the selected latents it owns (gradients reach x, b_pre and
  its own rows of W_enc, b_enc) and decodes them; **one** ``all_reduce`` of the [N, D] partial
  outputs (and of the [N, k] values) completes the decode;
* the adapter: gain and bias act on the owning rank; the FFN's ``W_inᵀz`` is a partial sum
  all-reduced ([N, h]) before ``b_in`` and σ; ``W_outᵀσ(h)·W_dec`` is folded per shard into the
  decode's all-reduce.

The collectives are autograd-aware in the Megatron way: a rank's partial result is summed in
the forward with the backward passing the (replicated) gradient through, and the replicated
inputs x and b_pre enter the shard-local computations through an identity whose backward sums
the ranks' partial gradients. So a loss computed identically on every rank trains each shard
with exactly the gradient of the unsharded op, and the gradients land on the owning rank.

    dist.init_process_group("nccl")                  # torchrun --nproc_per_node P ...
    shard = ShardedSAE.from_sae(sae)                   # or ShardedSAE.load("path/to/sae")
    y, values, indices = shard(x, return_code=True)    # sharded sae_forward
    ad = shard_adapter(LatentAdapter(shard.d_sae, 16), shard)
    y = sharded_sae_edit(x, shard, ad, mode="delta")

The local selection is this package's own encode on the shard (``encode_rows``: the fused
kernels of the ``cpp`` and ``triton`` backends, chosen as everywhere else); the per-latent
gathers and decodes use this package's ops (``gather_dot``, ``sparse_decode``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._gather import gather_dot
from .modules import SAE, LatentAdapter
from .ops import sparse_decode
from .reference import activation_fn

_CHUNK = 8192  # latents per GEMM of the local selection


def shard_range(S: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [s0, s1) of S latents held by ``rank`` of ``world`` (sizes differ by at most 1)."""
    base, extra = divmod(S, world)
    s0 = rank * base + min(rank, extra)
    return s0, s0 + base + (rank < extra)


def _group_info(group):
    return dist.get_rank(group), dist.get_world_size(group)


class _CopyToShards(torch.autograd.Function):
    """Identity; the backward sums the ranks' partial gradients (a replicated input used by
    shard-local computations)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromShards(torch.autograd.Function):
    """Sums the ranks' partial results; the backward passes the gradient through (the result
    is used identically on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


def _copy(x, group):
    return _CopyToShards.apply(x, group) if x is not None else None


def _reduce(x, group):
    return _ReduceFromShards.apply(x, group)


class ShardedSAE(nn.Module):
    """This rank's share of an SAE's latents (see the module docstring).

    ``copy=False`` makes the shard's parameters the tensors given (no transient second copy
    of the shard; pass tensors no one else holds). Attributes: ``W_enc`` [S_r, D], ``b_enc``
    [S_r], ``W_dec`` [S_r, D], ``threshold`` [S_r] or None; ``b_dec`` [D] and ``b_pre`` [D] or None (the same Parameter when tied) replicated;
    ``d_sae`` (all S), ``d_in``, ``k``, ``offset`` (s0) and ``group``.
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, k, *, d_sae, offset, b_pre=None,
                 threshold=None, group=None, copy=True):
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        rank, world = _group_info(self.group)
        s0, s1 = shard_range(d_sae, rank, world)
        if offset != s0 or W_enc.shape[0] != s1 - s0:
            raise ValueError(f"rank {rank} of {world} holds latents [{s0}, {s1}) of {d_sae}; "
                             f"got offset {offset} and {W_enc.shape[0]} rows")
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must be in [1, {d_sae}], got {k}")
        self.k, self.d_sae, self.offset = int(k), int(d_sae), int(offset)

        def own(t):  # copy=False: the shard takes the caller's tensors (no transient copy)
            return t.detach().clone() if copy else t.detach()
        self.W_enc = nn.Parameter(own(W_enc))
        self.b_enc = nn.Parameter(own(b_enc))
        self.W_dec = nn.Parameter(own(W_dec))
        self.b_dec = nn.Parameter(own(b_dec))
        tied = b_pre is not None and b_pre is b_dec
        self.b_pre = (self.b_dec if tied else
                      nn.Parameter(own(b_pre)) if b_pre is not None else None)
        self.threshold = (nn.Parameter(own(threshold), requires_grad=False)
                          if threshold is not None else None)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def owned(self) -> tuple[int, int]:
        return self.offset, self.offset + self.W_enc.shape[0]

    @classmethod
    def from_sae(cls, sae: SAE, group=None) -> "ShardedSAE":
        """This rank's rows of a whole SAE (every rank passes the same SAE)."""
        group = group if group is not None else dist.group.WORLD
        s0, s1 = shard_range(sae.d_sae, *_group_info(group))
        b_dec = sae.b_dec.detach()
        return cls(sae.W_enc[s0:s1], sae.b_enc[s0:s1], sae.W_dec[s0:s1], b_dec, sae.k,
                   d_sae=sae.d_sae, offset=s0,
                   b_pre=b_dec if sae.tied_b_pre else sae.b_pre,
                   threshold=sae.threshold[s0:s1] if sae.threshold is not None else None,
                   group=group)

    @classmethod
    def load(cls, path: str, *, k: int | None = None, group=None, dtype=None, device=None):
        """Reads only this rank's rows from a SAELens or sparsify directory (safetensors
        slices: a rank never holds the whole dictionary); other formats load whole, then
        slice."""
        import json
        import os

        from safetensors import safe_open

        from .io import detect_format, load_sae

        group = group if group is not None else dist.group.WORLD
        fmt = detect_format(path)
        if fmt not in ("saelens", "sparsify"):
            return cls.from_sae(load_sae(path, k=k, dtype=dtype, device=device), group)
        with open(os.path.join(path, "cfg.json")) as f:
            cfg = json.load(f)
        name = "sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors"
        with safe_open(os.path.join(path, name), "pt") as f:
            keys = set(f.keys())
            if fmt == "saelens":
                S = f.get_slice("W_enc").get_shape()[1]
                s0, s1 = shard_range(S, *_group_info(group))
                W_enc = f.get_slice("W_enc")[:, s0:s1].T.contiguous()
                b_enc = f.get_slice("b_enc")[s0:s1]
                W_dec = f.get_slice("W_dec")[s0:s1]
                b_dec = f.get_tensor("b_dec")
                arch = cfg.get("architecture", "standard")
                thr = f.get_slice("threshold")[s0:s1] if (
                    arch == "jumprelu" and "threshold" in keys) else None
                own_k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
                b_pre = b_dec if cfg.get("apply_b_dec_to_input", False) else None
            else:
                S = f.get_slice("encoder.weight").get_shape()[0]
                s0, s1 = shard_range(S, *_group_info(group))
                W_enc = f.get_slice("encoder.weight")[s0:s1]
                b_enc = f.get_slice("encoder.bias")[s0:s1]
                W_dec = f.get_slice("W_dec")[s0:s1]
                b_dec = f.get_tensor("b_dec")
                thr, own_k = None, cfg.get("k")
                b_pre = None if cfg.get("transcode", False) else b_dec
        kk = k or own_k
        if not kk:
            raise ValueError(f"{path}: this SAE has no top-k of its own: pass k=...")
        for n, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: non-finite values (NaN/inf) in {n}")
        out = cls(W_enc, b_enc, W_dec, b_dec, int(kk), d_sae=S, offset=s0,
                  b_pre=b_dec if b_pre is not None else None, threshold=thr, group=group,
                  copy=False)  # tensors read for this shard alone
        return out.to(dtype=dtype, device=device) if (dtype or device) else out

    def gather(self) -> SAE:
        """The whole SAE on every rank (all-gathers the shards; for checks and saving)."""
        rank, world = _group_info(self.group)
        parts = {}
        for name in ("W_enc", "b_enc", "W_dec", "threshold"):
            t = getattr(self, name)
            if t is None:
                continue
            sizes = [shard_range(self.d_sae, r, world) for r in range(world)]
            rows = max(b - a for a, b in sizes)  # gloo gathers equal sizes: pad, then trim
            mine = torch.cat([t.detach(), t.new_zeros(rows - t.shape[0], *t.shape[1:])])
            out = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(out, mine.contiguous(), group=self.group)
            parts[name] = torch.cat([o[:b - a] for o, (a, b) in zip(out, sizes)])
        b_dec = self.b_dec.detach()
        return SAE(parts["W_enc"], parts["b_enc"], parts["W_dec"], b_dec, self.k,
                   b_pre=b_dec if self.b_pre is self.b_dec else self.b_pre,
                   threshold=parts.get("threshold"))

    def encode(self, x):
        """x [..., D] -> (values, indices, overflow rows) as :func:`sae_sparse.topk_encode`
        gives them for the whole SAE (indices are global latent ids), on every rank."""
        shape = x.shape
        enc = _encode(x.reshape(-1, shape[-1]), self, self.k)
        return (enc.values.view(*shape[:-1], -1), enc.indices.view(*shape[:-1], -1),
                enc.overflow.view(shape[:-1]))

    def forward(self, x, *, backend=None, return_code: bool = False):
        """The sharded :func:`sae_sparse.sae_forward`: the reconstruction [..., D] (with
        ``return_code``: ``(y, values, indices)``), identical on every rank."""
        shape = x.shape
        enc = _encode(x.reshape(-1, shape[-1]), self, self.k)
        y = _decode_own(enc.v_own, enc.local, self, backend)
        y = _reduce(y, self.group) + self.b_dec.to(y.dtype)
        y = y.to(x.dtype).view(shape)
        self.last_overflow_rows = enc.overflow
        if return_code:
            return (y, enc.values.view(*shape[:-1], -1), enc.indices.view(*shape[:-1], -1))
        return y


class _Encoded:
    __slots__ = ("values", "indices", "overflow", "v_own", "local", "own")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


@torch.no_grad()
def _local_select(xc, W, b, kk, threshold=None, candidates=None, backend=None):
    """Top-kk pre-activations of this shard per row (descending, ties to the smaller index),
    their local indices, and the number of active latents per row (exact when it is at most
    kk; kk + 1 stands for "more"). ``candidates`` [S_r] bool restricts the selection (AuxK's
    dead latents).

    The selection is this package's own encode (:func:`sae_sparse.ops.encode_rows`: the
    fused kernels of the ``cpp`` / ``triton`` backends, no [N, S_r] tensor), which ranks by
    pre-activation and returns the per-row overflow flags; the selected pre-activations are
    recomputed exactly (``gather_dot``). A JumpReLU shard counts its active latents with its
    thresholds, which the selection does not rank by: that count is a chunked pass of its
    own (``_count_active``)."""
    from .ops import encode_rows

    rows = None
    if candidates is not None:
        rows = torch.nonzero(candidates).reshape(-1)
        W, b = W.index_select(0, rows), b.index_select(0, rows)
        threshold = threshold.index_select(0, rows) if threshold is not None else None
    N, short = xc.shape[0], max(0, kk - W.shape[0])  # fewer candidates than kk: -inf pads
    kk -= short
    if kk == 0:
        pre = xc.new_empty(N, 0)
        idx = torch.empty(N, 0, dtype=torch.long, device=xc.device)
        n_active = torch.zeros(N, dtype=torch.long, device=xc.device)
    else:
        _, idx, over = encode_rows(xc, W, b, kk, backend=backend)
        pre = gather_dot(xc, W, b, idx)
        if threshold is None:  # active = pre > 0: all among the top kk unless it overflows
            n_active = torch.where(over, kk + 1, (pre > 0).sum(1))
        else:
            n_active = _count_active(xc, W, b, threshold)
        if rows is not None:
            idx = rows[idx]
    if short:
        pre = torch.cat([pre, pre.new_full((N, short), float("-inf"))], 1)
        idx = torch.cat([idx, idx.new_zeros(N, short)], 1)
    return pre, idx, n_active


def _count_active(xc, W, b, threshold):
    """Per row the number of latents with pre-activation > max(0, threshold), in chunks of
    ``_CHUNK`` latents."""
    n = torch.zeros(xc.shape[0], dtype=torch.long, device=xc.device)
    for s0 in range(0, W.shape[0], _CHUNK):
        pre = F.linear(xc, W[s0:s0 + _CHUNK], b[s0:s0 + _CHUNK])
        n += ((pre > 0) & (pre > threshold[s0:s0 + _CHUNK])).sum(1)
    return n


def _encode(x, shard: ShardedSAE, k, *, candidates=None, relu_only=False):
    group = shard.group
    rank, world = _group_info(group)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    W, b = shard.W_enc.to(ct), shard.b_enc.to(ct)
    thr = shard.threshold.to(ct) if (shard.threshold is not None and not relu_only) else None
    xc = _copy(x, group).to(ct)
    if shard.b_pre is not None:
        xc = xc - _copy(shard.b_pre, group).to(ct)
    N = xc.shape[0]
    S_r = W.shape[0]
    kk = min(k, S_r)
    loc = candidates[shard.offset:shard.offset + S_r] if candidates is not None else None
    v, i, n_active = _local_select(xc.detach(), W.detach(), b.detach(), kk, thr, loc)
    # one all_gather: k (pre-activation, global index) pairs and the active count per row
    pad = k - kk
    vals = torch.cat([v.double(), v.new_full((N, pad), float("-inf")).double()], 1)
    idx = torch.cat([(i + shard.offset).double(),
                     torch.full((N, pad), float(shard.d_sae), dtype=torch.float64,
                                device=x.device)], 1)
    pack = torch.cat([vals, idx, n_active.double()[:, None]], 1)
    parts = [torch.empty_like(pack) for _ in range(world)]
    dist.all_gather(parts, pack.contiguous(), group=group)
    allp = torch.stack(parts, 1)  # [N, P, 2k + 1], ranks in the order of their latents
    cand_v = allp[:, :, :k].reshape(N, world * k)
    cand_i = allp[:, :, k:2 * k].reshape(N, world * k)
    _, pos = torch.sort(cand_v, dim=1, descending=True, stable=True)  # ties: smaller index
    gidx = cand_i.gather(1, pos[:, :k]).long()
    overflow = allp[:, :, 2 * k].sum(1) > k
    own = (gidx >= shard.offset) & (gidx < shard.offset + S_r)
    local = torch.where(own, gidx - shard.offset, torch.zeros_like(gidx))
    pre = gather_dot(xc, W, b, local)
    keep = own & (pre > 0)
    if thr is not None:
        keep &= pre > thr.detach()[local]
    v_own = torch.where(keep, pre, torch.zeros_like(pre))
    values = _reduce(v_own, group).to(x.dtype)
    return _Encoded(values=values, indices=gidx, overflow=overflow, v_own=v_own, local=local,
                    own=own)


def _decode_own(coef, local, shard, backend):
    """Σ over this rank's selected latents of coef · W_dec[i] (zero coefficients elsewhere)."""
    W = shard.W_dec
    return sparse_decode(coef.to(W.dtype), local, W, backend=backend).to(coef.dtype)


def sharded_topk_encode(x, shard: ShardedSAE, k: int | None = None):
    """The sharded :func:`sae_sparse.topk_encode`: (values, global indices, overflow count)
    on every rank; gradients reach x, b_pre and each rank's rows of W_enc, b_enc."""
    shape = x.shape
    enc = _encode(x.reshape(-1, shape[-1]), shard, k or shard.k)
    return (enc.values.view(*shape[:-1], -1), enc.indices.view(*shape[:-1], -1),
            enc.overflow.sum())


def sharded_auxk_encode(x, shard: ShardedSAE, dead_mask, k_aux: int):
    """The sharded :func:`sae_sparse.auxk_encode`: the ``min(k_aux, n_dead)`` largest
    pre-activations among the dead latents (``dead_mask`` [S] bool, the same on every rank),
    as (values, global indices); no threshold, entries with pre-activation <= 0 valued 0."""
    if dead_mask.shape != (shard.d_sae,) or dead_mask.dtype != torch.bool:
        raise ValueError(f"dead_mask must be a bool tensor of shape [{shard.d_sae}], got "
                         f"{dead_mask.dtype} {list(dead_mask.shape)}")
    kk = min(int(k_aux), int(dead_mask.sum()))
    shape = x.shape
    if kk == 0:
        return (x.new_empty(*shape[:-1], 0),
                torch.empty(*shape[:-1], 0, dtype=torch.long, device=x.device))
    enc = _encode(x.reshape(-1, shape[-1]), shard, kk, candidates=dead_mask.to(x.device),
                  relu_only=True)
    return enc.values.view(*shape[:-1], -1), enc.indices.view(*shape[:-1], -1)


def sharded_decode(values, indices, shard: ShardedSAE, *, b_dec=True, backend=None):
    """The sharded :func:`sae_sparse.sparse_decode` of a code every rank holds (global
    indices): each rank decodes the latents it owns, one all_reduce of [N, D]."""
    shape = values.shape
    v, i = values.reshape(-1, shape[-1]), indices.reshape(-1, shape[-1])
    own = (i >= shard.offset) & (i < shard.owned[1])
    local = torch.where(own, i - shard.offset, torch.zeros_like(i))
    y = _decode_own(torch.where(own, v, torch.zeros_like(v)), local, shard, backend)
    y = _reduce(y, shard.group)
    if b_dec:
        y = y + shard.b_dec.to(y.dtype)
    return y.view(*shape[:-1], -1)


def shard_adapter(adapter: LatentAdapter, shard: ShardedSAE) -> LatentAdapter:
    """This rank's slice of a whole adapter (every rank passes the same adapter): a
    :class:`LatentAdapter` over the shard's latents, with ``b_in`` replicated."""
    s0, s1 = shard.owned
    if adapter.d_sae != shard.d_sae:
        raise ValueError(f"the adapter has {adapter.d_sae} latents, the SAE {shard.d_sae}")
    p = {n: getattr(adapter, n) for n in ("gain", "bias", "W_in", "b_in", "W_out")}
    mask = adapter.latent_mask[s0:s1] if adapter.latent_mask is not None else None
    ref = next(adapter.parameters())
    out = LatentAdapter(s1 - s0, max(adapter.hidden, 1), p["gain"] is not None,
                        p["bias"] is not None, p["W_in"] is not None, adapter.activation,
                        latent_mask=mask, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        for n, t in p.items():
            if t is None:
                continue
            sl = t[:, s0:s1] if n == "W_out" else t if n == "b_in" else t[s0:s1]
            getattr(out, n).copy_(sl)
    return out


def sharded_sae_edit(x, shard: ShardedSAE, adapter: LatentAdapter | None = None, *,
                     mode: str = "delta", backend=None):
    """The sharded :func:`sae_sparse.sae_edit` with an adapter from :func:`shard_adapter`:
    delta ``y = x + (z' − z)·W_dec``, replace ``y = z'·W_dec + b_dec``; identical on every
    rank, gradients as the one-process op's on each rank's slice."""
    if mode not in ("delta", "replace"):
        raise ValueError(f"mode must be 'delta' or 'replace', got {mode!r}")
    if adapter is not None and adapter.d_sae != shard.W_enc.shape[0]:
        raise ValueError(f"adapter holds {adapter.d_sae} latents; this rank's shard "
                         f"{shard.W_enc.shape[0]}: pass shard_adapter(adapter, shard)")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    enc = _encode(x2, shard, shard.k)
    shard.last_overflow_rows = enc.overflow
    ct = enc.v_own.dtype
    p = adapter.edit_params() if adapter is not None else {}
    v, local = enc.v_own, enc.local
    if mode == "delta":
        coef = v * p["gain"].to(ct)[local] if "gain" in p else None
    else:
        coef = v * (1 + p["gain"].to(ct)[local]) if "gain" in p else v
    W_dec = shard.W_dec.to(ct)
    y = (_decode_own(coef, local, shard, backend) if coef is not None
         else x2.new_zeros(x2.shape[0], shard.d_in, dtype=ct))
    if "bias" in p:
        y = y + p["bias"].to(ct) @ W_dec
    if "W_in" in p:
        h = F.embedding_bag(local, p["W_in"].to(ct), per_sample_weights=v, mode="sum")
        h = _reduce(h, shard.group) + p["b_in"].to(ct)
        # σ(h) is replicated but meets this rank's W_out·W_dec: its gradient is summed
        a = _copy(activation_fn(adapter.activation)(h), shard.group)
        y = y + a @ (p["W_out"].to(ct) @ W_dec)
    y = _reduce(y, shard.group)
    y = x2.to(ct) + y if mode == "delta" else y + shard.b_dec.to(ct)
    return y.to(x.dtype).view(shape)


def save_saelens_sharded(shard: ShardedSAE, path: str, *, hook_name: str | None = None,
                         write: bool = True, **cfg_extra) -> None:
    """Writes the whole SAE that ``shard``'s group holds as one SAELens directory (as
    :func:`sae_sparse.save_saelens` would), each rank writing its own rows into the one
    ``sae_weights.safetensors``: no rank holds more than its shard. Shard 0 writes the
    header and ``cfg.json`` and sizes the file; the others then write their rows in place
    (``W_enc`` is stored [D, S]: a rank's columns of every row). Collective over the shard
    group; ``write=False`` ranks (a second data-parallel replica of the same shards) only
    return. The path must be on a filesystem every rank of the group sees."""
    import json
    import os

    import numpy as np

    from ._safetensors import DTYPES, header as _st_header

    if not write:
        return
    if shard.b_pre is not None and shard.b_pre is not shard.b_dec:
        raise ValueError("SAELens has no separate input bias: b_pre must be tied to b_dec "
                         "(or None) to save in this format")
    rank, _ = _group_info(shard.group)
    S, D, dt = shard.d_sae, shard.d_in, shard.W_enc.dtype
    if dt not in DTYPES or not dt.is_floating_point:
        raise ValueError(f"cannot write {dt} weights in safetensors")
    shapes = {"W_dec": [S, D], "W_enc": [D, S], "b_dec": [D], "b_enc": [S]}
    if shard.threshold is not None:
        shapes["threshold"] = [S]
    item = torch.empty(0, dtype=dt).element_size()
    head, entries = _st_header({n: (dt, sh) for n, sh in shapes.items()})
    file = os.path.join(path, "sae_weights.safetensors")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        with open(file, "wb") as f:
            f.write(head)
            f.truncate(len(head) + entries["threshold" if "threshold" in entries
                                           else "b_enc"]["data_offsets"][1])
        cfg = {"architecture": "jumprelu" if shard.threshold is not None else "topk",
               "d_in": D, "d_sae": S, "k": shard.k,
               "apply_b_dec_to_input": shard.b_pre is not None,
               "dtype": str(dt).split(".")[-1], "metadata": {"hook_name": hook_name},
               **cfg_extra}
        with open(os.path.join(path, "cfg.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    dist.barrier(group=shard.group)
    ints = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.int16),
            4: (torch.int32, np.int32), 8: (torch.int64, np.int64)}[item]

    def region(name):  # the tensor's bytes in the file, as a writable array of its shape
        a, _ = entries[name]["data_offsets"]
        return np.memmap(file, dtype=ints[1], mode="r+", offset=len(head) + a,
                         shape=tuple(entries[name]["shape"]))

    def bits(t):
        return t.detach().to(dt).cpu().contiguous().view(ints[0]).numpy()

    s0, s1 = shard.owned
    for name, t, cols in (("W_dec", shard.W_dec, False), ("W_enc", shard.W_enc, True),
                          ("b_enc", shard.b_enc, False), ("threshold", shard.threshold, False)):
        if t is None:
            continue
        mm = region(name)
        if cols:
            mm[:, s0:s1] = bits(t).T
        else:
            mm[s0:s1] = bits(t)
        mm.flush()
        del mm
    if rank == 0:
        mm = region("b_dec")
        mm[:] = bits(shard.b_dec)
        mm.flush()
        del mm
    dist.barrier(group=shard.group)


def memory_model(S: int, D: int, P: int, *, k: int = 32, N: int = 8192, hidden: int = 16,
                 weight_bytes: int = 2, train_sae: bool = False, adapter: str = "gain,bias,ffn",
                 chunk: int = _CHUNK) -> dict:
    """Bytes per rank of a latent-sharded step (the largest shard: ceil(S / P) latents) and
    the bytes each rank sends per step; a model of this module's allocations, not a
    measurement.

    * weights: W_enc, W_dec (``weight_bytes`` each: 2 for bf16), b_enc; b_dec and b_pre
      replicated;
    * SAE training (``train_sae``): fp32 gradients and AdamW's two fp32 moments of every SAE
      weight (the weights in ``weight_bytes``);
    * adapter: its fp32 parameters, gradients and two AdamW moments (gain and bias: 1 float
      per latent each; ffn: 2·hidden per latent);
    * activations: the local selection's GEMM chunk [N, chunk] fp32 and its sort, the
      gathered candidates [N, P·(2k+1)] fp64, the [N, D] partial outputs and x;
    * communication (forward + backward, ring collectives): the candidates' all_gather, the
      values' [N, k] and the output's [N, D] all_reduce forward, dx's [N, D] backward, and
      the FFN's [N, hidden] each way.
    """
    s = -(-S // P)
    f32 = 4
    w = s * D * 2 * weight_bytes + s * weight_bytes + 2 * D * f32
    opt = (s * D * 2 + s) * f32 * 3 if train_sae else 0
    per_latent = (("gain" in adapter) + ("bias" in adapter)
                  + (2 * hidden if "ffn" in adapter else 0))
    ad = s * per_latent * f32 * 4 if not train_sae else 0
    act = (N * min(chunk, s) * f32 * 2 + N * P * (2 * k + 1) * 8 + 3 * N * D * f32
           + N * k * 24)
    ring = 2 * (P - 1) / P
    comm = (N * (P - 1) * (2 * k + 1) * 8 + ring * f32 * (N * k + 2 * N * D)
            + (ring * f32 * 2 * N * hidden if "ffn" in adapter and not train_sae else 0))
    total = w + opt + ad + act
    return {"latents_per_rank": s, "weights": w, "sae_optimizer": opt, "adapter": ad,
            "activations": act, "total": total, "comm_per_step": int(comm)}
