"""Does the report's explanation carry the edit? (``sae-sparse report``'s faithfulness table.)

For a trained run and a ranking of its latents (the report's readout ranking by default), the
edit is *restricted* to the top n latents, and the top n are *removed* from it, and the loss
the run trained on (KL to the teacher, or cross-entropy) is measured on records:

* ``sufficiency(n) = (L_none − L_top-n) / (L_none − L_full)``: the fraction of the edit's loss
  reduction that its top n latents keep alone;
* ``necessity(n) = (L_without-top-n − L_full) / (L_none − L_full)``: the fraction lost when
  only those n are taken out of the full edit.

"Restricted to a set L of latents" is the adapter's latent mask (``LatentAdapter``'s
``latent_mask``, intersected with the run's own): ``gain_i``, ``bias_i`` and ``W_out``'s
column i are zero for i outside L, so the edit changes no latent outside L; ``W_in``'s row i
is zero too, so the FFN reads only L's activations; ``b_in`` is kept (a unit's constant,
written only into L). "Removing L" is the mask of the complement. For a run with edits at
several hooks, n latents are kept (or removed) at each hook, by that hook's own ranking.
"""
from __future__ import annotations

import copy

import torch

NS = (1, 3, 10, 30, 100)


def restricted(adapter, keep: torch.Tensor):
    """A copy of ``adapter`` whose edit touches only the latents in ``keep`` (bool [S]) and
    those its own mask allows (module docstring)."""
    out = copy.deepcopy(adapter)
    mask = keep.to(torch.bool)
    if adapter.latent_mask is not None:
        mask = mask & adapter.latent_mask.to(mask.device)
    dev = next(adapter.parameters()).device
    if out.latent_mask is None:
        del out.latent_mask  # a plain None attribute: a buffer from here on
        out.register_buffer("latent_mask", mask.to(dev))
    else:
        out.latent_mask = mask.to(dev)
    return out


def _mask(S, latents, device):
    m = torch.zeros(S, dtype=torch.bool, device=device)
    if len(latents):
        m[torch.as_tensor(list(latents), dtype=torch.long, device=device)] = True
    return m


@torch.no_grad()
def faithfulness(model, tokenizer, saes: dict, adapters: dict, records, ranking: dict, *,
                 ns=NS, loss="kl", mode="delta", skip_first=0, max_len=256,
                 batch_size=8) -> dict:
    """The faithfulness of ``ranking`` (``{hook: [latent, ...]}``, best first) as an
    explanation of the edit ``adapters`` (``{hook: LatentAdapter}``) over ``saes``
    (``{hook: SAE}``): the loss on ``records`` with no edit, the full edit, and the edit
    restricted to / without each hook's top ``n`` for ``n`` in ``ns`` (those above the
    ranking's length dropped), and the fractions (module docstring).
    ``loss="kl"`` needs records with ``teacher_prompt`` (the teacher is the model with the
    edits off); ``"ce"``: cross-entropy on the completions (or the texts).

    -> ``{"loss", "n_tokens", "loss_none", "loss_full", "ns", "loss_top", "loss_without",
    "sufficiency", "necessity"}``; the fractions are None when the full edit does not lower
    the loss (nothing to explain)."""
    from ..hooks import attach

    hooks = list(adapters)
    longest = min(len(ranking[h]) for h in hooks)
    ns = [n for n in ns if n <= longest]
    work = {h: restricted(adapters[h], torch.ones(saes[h].d_sae, dtype=torch.bool))
            for h in hooks}
    variants = {"full": {h: None for h in hooks}}
    for n in ns:
        top = {h: _mask(saes[h].d_sae, ranking[h][:n], saes[h].W_dec.device) for h in hooks}
        variants[("top", n)] = top
        variants[("without", n)] = {h: ~m for h, m in top.items()}
    edits = attach(model, {h: (saes[h], work[h]) for h in hooks}, mode=mode,
                   skip_first=skip_first)
    try:
        sums, n_tok = _losses(model, tokenizer, edits, work, variants, records, loss=loss,
                              max_len=max_len, batch_size=batch_size)
    finally:
        edits.remove()
    mean = {k: v / max(n_tok, 1) for k, v in sums.items()}
    gap = mean["none"] - mean["full"]
    frac = (lambda x: x / gap) if gap > 0 else (lambda x: None)
    return {"loss": loss, "n_tokens": n_tok, "loss_none": mean["none"],
            "loss_full": mean["full"], "ns": ns,
            "loss_top": [mean[("top", n)] for n in ns],
            "loss_without": [mean[("without", n)] for n in ns],
            "sufficiency": [frac(mean["none"] - mean[("top", n)]) for n in ns],
            "necessity": [frac(mean[("without", n)] - mean["full"]) for n in ns]}


def _losses(model, tokenizer, edits, work, variants, records, *, loss, max_len, batch_size):
    """Summed loss over ``records`` with the edits off (``"none"``) and under each variant
    (``{hook: mask, or None for the run's own}`` written into the ``work`` adapters' latent
    masks); the teacher's log-probs computed once per batch. -> (sums, loss tokens)."""
    from ..models import input_device
    from ..training.data import collate, tokenize
    from ..training.losses import kl_loss, lm_loss, teacher_logprobs

    data = tokenize(records, tokenizer, max_len, teacher=loss == "kl")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    own = {h: ad.latent_mask.clone() for h, ad in work.items()}
    sums = {"none": 0.0, **{v: 0.0 for v in variants}}
    n_tok = 0
    for i in range(0, len(data), batch_size):
        batch = data[i:i + batch_size]
        ids, attn, lm, _ = (t.to(device) for t in collate(batch, pad))
        t_logp = None
        if loss == "kl":
            with edits.disabled():
                t_logp = teacher_logprobs(model, batch, pad)

        def measure():
            if t_logp is None:
                return float(lm_loss(model, ids, attn, lm, denom=1.0))
            return float(kl_loss(model, ids, attn, lm, t_logp, denom=1.0))

        with edits.disabled():
            sums["none"] += measure()
        for name, masks in variants.items():
            for h, ad in work.items():
                ad.latent_mask.copy_(own[h] if masks[h] is None else masks[h] & own[h])
            sums[name] += measure()
        n_tok += int(lm[:, 1:].sum())
    return sums, n_tok
