"""The losses of a step: next-token cross-entropy, KL to a teacher's distribution, the
L1 penalty on an adapter, and the bf16 autocast they run under.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..models import input_device, model_logits
from ..modules import LatentAdapter
from .data import collate_teacher


def autocast(cfg, device):
    use = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def lm_loss(model, ids, attn, loss_mask, denom=None):
    """Mean next-token cross-entropy over the loss tokens; with ``denom``, their sum divided
    by it (a data-parallel rank's share of a global batch's mean)."""
    tgt = loss_mask[:, 1:]
    pred = F.pad(tgt, (0, 1))  # the positions that predict a loss token
    logits = model_logits(model, ids, attn, pred).float()
    ce = F.cross_entropy(logits, ids[:, 1:][tgt.to(ids.device)].to(logits.device),
                         reduction="sum")
    return ce / (denom if denom is not None else tgt.sum().clamp_min(1))


@torch.no_grad()
def teacher_logprobs(teacher, examples, pad_id):
    """The teacher's next-token log-probabilities [n, V] (float32) at the positions that
    predict the examples' completion tokens, in order (``teacher``: a model; edits attached
    to it should be off, see :func:`train_adapter`)."""
    ids, attn, mask = collate_teacher(examples, pad_id)
    dev = input_device(teacher)
    pred = F.pad(mask[:, 1:], (0, 1))  # the positions that predict a completion token
    return model_logits(teacher, ids.to(dev), attn.to(dev), pred).float().log_softmax(-1)


def kl_loss(model, ids, attn, loss_mask, teacher_logp, denom=None):
    """Mean KL(teacher ‖ student) per loss token: ``teacher_logp`` [n, V] from
    :func:`teacher_logprobs` for the same examples; with ``denom``, the sum divided by it."""
    pred = F.pad(loss_mask[:, 1:], (0, 1))  # the positions that predict a loss token
    s = model_logits(model, ids, attn, pred).float().log_softmax(-1)
    if s.shape != teacher_logp.shape:
        raise ValueError(f"the teacher's log-probs have shape {tuple(teacher_logp.shape)}, the "
                         f"student's {tuple(s.shape)} (loss tokens x vocabulary): the teacher "
                         "needs the same tokenizer and vocabulary as the student")
    kl = F.kl_div(s, teacher_logp.to(s.device), reduction="sum", log_target=True)
    return kl / (denom if denom is not None else max(s.shape[0], 1))


def teacher_targets(cfg, model, teacher, edits, examples, pad_id, device):
    """``loss="kl"``: the teacher's log-probs for a batch (the model's own edits off when it
    is its own teacher); ``"ce"``: None."""
    if cfg.loss == "ce":
        return None
    off = edits.disabled() if teacher is None and edits is not None else (
        contextlib.nullcontext())
    with off, autocast(cfg, device):
        return teacher_logprobs(teacher if teacher is not None else model, examples, pad_id)


def batch_loss(model, ids, attn, loss_mask, teacher_logp, denom=None):
    if teacher_logp is None:
        return lm_loss(model, ids, attn, loss_mask, denom)
    return kl_loss(model, ids, attn, loss_mask, teacher_logp, denom)


def latent_group_norms(adapter, sae):
    """Per latent, the norm of everything the adapter holds for it: [S] =
    ``sqrt(gain² + (bias·‖W_dec[s]‖)² + ‖W_in[s]‖² + ‖W_out[:, s]‖²·‖W_dec[s]‖² + 1e-12)``
    (bias and W_out scaled by the decoder norm, as in :func:`l1_penalty`). None for an
    adapter that is not a :class:`LatentAdapter`."""
    if not isinstance(adapter, LatentAdapter):
        return None
    dn = sae.W_dec.detach().norm(dim=1).to(next(adapter.parameters()).dtype)
    sq = torch.full_like(dn, 1e-12)
    if adapter.gain is not None:
        sq = sq + adapter.gain.square()
    if adapter.bias is not None:
        sq = sq + (adapter.bias * dn).square()
    if adapter.W_in is not None:
        sq = sq + adapter.W_in.square().sum(1) + adapter.W_out.square().sum(0) * dn.square()
    return sq.sqrt()


@torch.no_grad()
def shrink_latents(adapter, sae, tau: float) -> int:
    """Group soft-thresholding over latents, decoupled from the optimizer as AdamW's weight
    decay is (``--l1-group``): each latent's parameters (gain, bias, W_in row, W_out column)
    are scaled together by ``max(0, 1 − tau / latent_group_norms[s])``, so a latent whose
    norm is below ``tau`` becomes exactly zero. -> the number of latents left nonzero."""
    norms = latent_group_norms(adapter, sae)
    if norms is None:
        return 0
    scale = (1 - tau / norms).clamp_min(0)
    if adapter.gain is not None:
        adapter.gain.mul_(scale)
    if adapter.bias is not None:
        adapter.bias.mul_(scale)
    if adapter.W_in is not None:
        adapter.W_in.mul_(scale[:, None])
        adapter.W_out.mul_(scale[None, :])
    return int((scale > 0).sum())


def l1_penalty(adapter, sae):
    if not isinstance(adapter, LatentAdapter):
        return None
    dn = sae.W_dec.detach().norm(dim=1)
    terms = []
    if adapter.gain is not None:
        terms.append(adapter.gain.abs().sum())
    if adapter.bias is not None:
        terms.append((adapter.bias.abs() * dn).sum())
    if adapter.W_out is not None:
        terms.append((adapter.W_out.abs() * dn).sum())
    return sum(terms)
