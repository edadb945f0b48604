"""Drop-in replacements for SAE-training code written against EleutherAI sparsify.

sparsify's TopK ``SparseCoder`` encodes with ``fused_encoder(x - b_dec, encoder.weight,
encoder.bias, k, "topk")`` and decodes with ``decoder_impl(top_indices, top_acts, W_dec.mT)``.
The functions here have the same signatures and return the same things, computed by this
package's fused op (gradients for input, weight, bias and W_dec), except that ``pre_acts`` --
the dense N x S pre-activations -- is never materialised and is returned as ``None``.
sparsify's AuxK loss selects from ``pre_acts``
(``torch.where(dead_mask[None], pre_acts, -inf).topk(k_aux)``); :func:`auxk_encoder` gives
that selection without them, and :func:`sae_sparse.auxk_decode` its decoded ``e_hat``
with dense GEMMs over the dead latents (cheaper than decoding ``k_aux = D // 2`` latents
per row as a sparse code). :func:`sae_sparse.sae_forward` replaces an ``encode`` +
``decode`` pair by one op (one grouping by latent in the backward instead of two).
Top-k comes back sorted in descending order (sparsify's is unsorted; the set is the same).

:func:`patch_sparsify` goes one level up: it replaces ``SparseCoder.forward`` itself (one
coder, or the class, so that sparsify's own ``Trainer`` trains on these ops) with
:func:`sparsify_forward`, which returns sparsify's ``ForwardOutput`` with the same losses
and gradients (tested against the installed sparsify).

For SAELens: :func:`patch_saelens` (its ``TopKTrainingSAE`` training step, so its
``SAETrainer``, on these ops) and :func:`from_saelens` / :func:`to_saelens` (its SAE objects
in memory); see :mod:`sae_sparse._saelens`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from ._patch import MethodPatch
from ._saelens import (SAELensPatch, from_saelens, patch_saelens,  # noqa: F401
                       saelens_training_forward_pass, to_saelens)
from .ops import auxk_decode, auxk_encode, sae_forward, sparse_decode, topk_encode


class EncoderOutput(NamedTuple):
    top_acts: torch.Tensor
    """Activations of the top-k latents, [..., k]."""
    top_indices: torch.Tensor
    """Their latent indices, [..., k] int64."""
    pre_acts: Optional[torch.Tensor]
    """Always None: the dense pre-activations are never materialised."""


def fused_encoder(input, weight, bias, k: int, activation: str = "topk", *,
                  backend=None) -> EncoderOutput:
    """``topk(relu(input @ weight.T + bias), k)`` without the N x S matrix.

    Args:
        input: [N, D] (sparsify passes ``x - b_dec``). weight: [S, D]. bias: [S]. k: int.
        activation: only "topk" (sparsify's "groupmax" is not supported).
    """
    if activation != "topk":
        raise NotImplementedError(f"activation={activation!r}: only 'topk' is supported")
    values, indices = topk_encode(input, weight, bias, k, backend=backend)
    return EncoderOutput(values, indices, None)


def decoder_impl(top_indices, top_acts, W_dec_T, *, backend=None):
    """``sum_j top_acts[..., j] * W_dec_T[:, top_indices[..., j]]`` with W_dec_T [D, S]
    (sparsify passes ``W_dec.mT``)."""
    return sparse_decode(top_acts, top_indices, W_dec_T.mT, backend=backend)


def auxk_encoder(input, weight, bias, dead_mask, k_aux: int, *, backend=None):
    """sparsify's AuxK selection, ``torch.where(dead_mask[None], pre_acts, -inf).topk(k_aux)``
    with ``k_aux`` clamped to the number of dead latents, without ``pre_acts``.
    Returns (auxk_acts, auxk_indices); see :func:`sae_sparse.auxk_encode`. Zero-valued
    entries may name other dead latents than sparsify's (its order among zeros is arbitrary);
    the decoded ``e_hat`` and the loss are the same. The gradient differs: ``auxk_acts``
    carries it into ``input``, ``weight`` and ``bias`` (the AuxK of the top-k SAE paper),
    while sparsify 1.3.3 drops its pre-activations' gradient, so its AuxK loss trains W_dec
    alone -- pass detached encoder tensors for that, or use :func:`patch_sparsify`."""
    return auxk_encode(input, weight, bias, dead_mask, k_aux, backend=backend)


# ------------------------------------------------------------- sparsify's SparseCoder.forward


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The encoder GEMM's dtype inside sparsify's forward, which runs under
    ``torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())``:
    bf16 for CUDA tensors where the card supports it, else None (the parameters' dtype)."""
    return torch.bfloat16 if x.is_cuda and torch.cuda.is_bf16_supported() else None


def sparsify_forward(sae, x, y=None, *, dead_mask=None, total_variance=None, backend=None):
    """``SparseCoder.forward`` of EleutherAI sparsify 1.3.3 (``x, y, dead_mask,
    total_variance`` -> ``ForwardOutput(sae_out, latent_acts, latent_indices, fvu, auxk_loss,
    multi_topk_fvu)``) computed by this package's ops, without the dense ``[N, S]``
    pre-activations sparsify's fused encoder returns.

    It follows sparsify's forward step by step, including what its autograd does:

    * encode ``x - b_dec`` (``x`` for a transcoder) with a top-k, decode, add ``b_dec`` and
      the skip connection; ``fvu`` over ``total_variance`` (the batch's, when not given).
      When nothing is cast (CPU, or no bf16 on the card) encode and decode are one op,
      :func:`sae_sparse.sae_forward`. On a CUDA card with bf16, sparsify's forward runs
      under bf16 autocast, which puts its encoder GEMM (and so the selection) in bf16 and
      leaves the decode in the parameters' dtype (the skip connection's matmul is in bf16
      too); this does the same casts, explicitly.
    * AuxK (``dead_mask`` with a dead latent): ``k_aux = y.shape[-1] // 2`` clamped to the
      number of dead latents, ``scale = min(n_dead / k_aux, 1)``, ``e_hat`` decoded without
      ``b_dec``, by :func:`sae_sparse.auxk_decode` (dense GEMMs over the dead rows, in the
      parameters' dtype). sparsify's fused encoder drops the gradient of its dense
      pre-activations, from which AuxK's activations are taken, so the AuxK loss reaches
      only ``W_dec``; the encoder here is detached for it, with the same result.
    * ``multi_topk``: the top ``4k`` latents decoded with ``b_dec`` (no skip), again with the
      encoder detached; as in sparsify, the ``sae_out``, ``latent_acts`` and
      ``latent_indices`` returned are then the ``4k`` ones.

    Differences: top-k lists come back sorted (sparsify's are unsorted; same sets);
    selections may differ at near-ties (bf16 on GPU); and in a row with fewer than ``k``
    positive pre-activations, sparsify's encoder backward passes gradient into the selected
    zeros (its backward does not apply ReLU's mask) while this op gives them none. sparsify's
    ``groupmax`` activation is not supported.

    Args:
        sae: a ``sparsify.SparseCoder`` (with a decoder; ``activation="topk"``).
        x: [N, d_in]. y: optional target [N, d_out] (a transcoder's), else ``x``.
        dead_mask: optional [num_latents] bool. total_variance: optional 0-dim tensor.
        backend: as in :func:`sae_sparse.topk_encode`.
    """
    from sparsify.sparse_coder import ForwardOutput

    cfg = sae.cfg
    if cfg.activation != "topk":
        raise NotImplementedError(f"sparsify_forward: activation={cfg.activation!r} is not "
                                  f"supported, only 'topk'")
    if sae.W_dec is None:
        raise ValueError("sparsify_forward: the SparseCoder has no decoder (decoder=False)")
    W_enc, b_enc, W_dec, b_dec = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
    dt, k = W_enc.dtype, cfg.k
    enc_dt = _autocast_dtype(x) or dt
    if y is None:
        y = x
    with torch.autocast(x.device.type, enabled=False):  # every cast below is explicit
        xp = x.to(dt)
        # the encoder as autocast hands it to F.linear (cast once per forward, as autocast's
        # cache does; Multi-TopK reuses it)
        We, be = (W_enc, b_enc) if enc_dt == dt else (W_enc.to(enc_dt), b_enc.to(enc_dt))
        x_in = xp if cfg.transcode else xp - b_dec  # the encoder's input
        if enc_dt == dt:
            sae_out, top_acts, top_indices = sae_forward(
                xp, W_enc, b_enc, W_dec, b_dec, k, b_pre=None if cfg.transcode else b_dec,
                backend=backend)
        else:
            top_acts, top_indices = topk_encode(x_in.to(enc_dt), We, be, k, backend=backend)
            sae_out = sparse_decode(top_acts.to(dt), top_indices, W_dec, b_dec, backend=backend)
        if sae.W_skip is not None:  # a matmul: in autocast's dtype, added to the fp32 output
            sae_out = sae_out + (xp.to(enc_dt) @ sae.W_skip.to(enc_dt).mT).to(dt)
        e = y - sae_out
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()

        if dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0:
            k_aux = y.shape[-1] // 2
            scale = min(num_dead / k_aux, 1.0)
            e_hat = auxk_decode(x_in.detach(), W_enc.detach(), b_enc.detach(), W_dec,
                                dead_mask, min(k_aux, num_dead), backend=backend)
            auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = sae_out.new_tensor(0.0)
        fvu = e.pow(2).sum() / total_variance
        if cfg.multi_topk:
            with torch.no_grad():
                top_acts, top_indices = topk_encode(x_in.detach().to(enc_dt), We, be, 4 * k,
                                                    backend=backend)
            sae_out = sparse_decode(top_acts.to(dt), top_indices, W_dec, b_dec, backend=backend)
            multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
        else:
            multi_topk_fvu = sae_out.new_tensor(0.0)
    return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)


class SparsifyPatch(MethodPatch):
    """Returned by :func:`patch_sparsify`: ``remove()`` (or leaving a ``with`` block) puts
    sparsify's own forward back."""

    name = "forward"


def patch_sparsify(coder=None, *, backend=None) -> SparsifyPatch:
    """Makes sparsify's ``SparseCoder.forward`` run :func:`sparsify_forward` (this package's
    ops, same ``ForwardOutput``, losses and gradients).

    ``coder=None`` patches the class, so every coder -- including those sparsify's
    ``Trainer`` creates -- uses it; pass one ``SparseCoder`` to patch only that one. Undo
    with the returned handle's ``remove()``, or use it as a context manager::

        from sparsify import Trainer
        from sae_sparse.compat import patch_sparsify
        with patch_sparsify():
            Trainer(cfg, dataset, model).fit()
    """
    from sparsify.sparse_coder import SparseCoder

    if coder is not None and not isinstance(coder, SparseCoder):
        raise TypeError(f"patch_sparsify: coder must be a sparsify SparseCoder or None, got "
                        f"{type(coder).__name__}")
    owner = SparseCoder if coder is None else coder
    previous = owner.__dict__.get("forward")

    if coder is None:
        @functools.wraps(SparseCoder.forward)
        def forward(self, x, y=None, *, dead_mask=None, total_variance=None):
            return sparsify_forward(self, x, y, dead_mask=dead_mask,
                                    total_variance=total_variance, backend=backend)
    else:
        def forward(x, y=None, *, dead_mask=None, total_variance=None):
            return sparsify_forward(coder, x, y, dead_mask=dead_mask,
                                    total_variance=total_variance, backend=backend)
    owner.forward = forward
    return SparsifyPatch(owner, previous)
