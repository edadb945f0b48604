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
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .ops import auxk_encode, sparse_decode, topk_encode


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
    the decoded ``e_hat``, the loss and every gradient are the same."""
    return auxk_encode(input, weight, bias, dead_mask, k_aux, backend=backend)
