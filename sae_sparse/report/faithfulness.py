"""Does the report's explanation carry the edit? (``sae-sparse report``'s faithfulness table.)

For a trained run and a ranking of its latents, the edit is *restricted* to the top n latents,
and the top n are *removed* from it, and the loss the run trained on (KL to the teacher, or
cross-entropy) is measured on records:

* ``sufficiency(n) = (L_none − L_top-n) / (L_none − L_full)``: the fraction of the edit's loss
  reduction that its top n latents keep alone;
* ``necessity(n) = (L_without-top-n − L_full) / (L_none − L_full)``: the fraction lost when
  only those n are taken out of the full edit.

"Restricted to a set L of latents" has two scopes:

* ``"latents"`` (the adapter's latent mask, ``LatentAdapter.latent_mask``, intersected with the
  run's own): ``gain_i``, ``bias_i``, ``W_out``'s column i and ``W_in``'s row i are zero for i
  outside L, so the edit changes no latent outside L and its FFN reads only L's activations;
  ``b_in`` is kept (a unit's constant, written only into L). The strict reading: everything
  of the edit outside L is gone.
* ``"writes"``: ``gain_i``, ``bias_i`` and ``W_out``'s column i are zero for i outside L and
  ``W_in`` is whole, so the edit still changes no latent outside L (every other latent keeps
  its SAE value) but its FFN reads every active latent. This is "the edit of the latents in
  L": which latents are moved, with the conditions under which they are moved intact.

"Removing L" is the complement's restriction, in the same scope. For a run with edits at
several hooks, n latents are kept (or removed) at each hook, by that hook's own ranking.

:func:`edit_attribution` ranks the latents by what they measurably do to the loss
(integrated gradients over per-latent gates, in the same scopes); the report's faithfulness
table uses that ranking by default.
"""
from __future__ import annotations

import copy

import torch

NS = (1, 3, 10, 30, 100)
SCOPES = ("latents", "writes")
ATTRIBUTION_STEPS = 4  # the report's and --max-latents' integration points (completeness
# 0.997-1.02 on the SmolLM2 edits)


def gated_params(adapter, scope: str) -> dict:
    """``{name: axis}``: the adapter's parameters that belong to one latent each, and the
    axis that indexes the latent, in ``scope`` (module docstring)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    axes = {"gain": 0, "bias": 0, "W_out": 1}
    if scope == "latents":
        axes["W_in"] = 0
    return {k: ax for k, ax in axes.items() if getattr(adapter, k, None) is not None}


def _scaled(t, gate, axis):
    gate = gate.to(t.dtype)
    return t * (gate[:, None] if axis == 0 and t.dim() == 2 else gate)


def restricted(adapter, keep: torch.Tensor, scope: str = "latents"):
    """A copy of ``adapter`` whose edit touches only the latents in ``keep`` (bool [S]) and
    those its own mask allows, in ``scope`` (module docstring)."""
    axes = gated_params(adapter, scope)
    out = copy.deepcopy(adapter)
    mask = keep.to(torch.bool)
    if adapter.latent_mask is not None:
        mask = mask & adapter.latent_mask.to(mask.device)
    dev = next(adapter.parameters()).device
    if scope == "writes":
        with torch.no_grad():
            for name, ax in axes.items():
                p = getattr(out, name)
                p.copy_(_scaled(p, mask.to(dev), ax))
        return out
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


class _Gates:
    """Working copies of ``adapters`` whose per-latent parameters (:func:`gated_params`) are
    set to ``original * gate`` by :meth:`set`; attached once, switched per variant."""

    def __init__(self, adapters: dict, scope: str):
        self.work = {h: copy.deepcopy(a) for h, a in adapters.items()}
        self.axes = {h: gated_params(a, scope) for h, a in adapters.items()}
        self.orig = {h: {n: getattr(a, n).detach().clone() for n in self.axes[h]}
                     for h, a in adapters.items()}

    @torch.no_grad()
    def set(self, gates: dict):
        """``gates``: ``{hook: float or bool [S]}``; a hook not named gets its whole edit."""
        for h, ad in self.work.items():
            g = gates.get(h)
            for n, ax in self.axes[h].items():
                o = self.orig[h][n]
                getattr(ad, n).copy_(o if g is None else _scaled(o, g.to(o.device), ax))


@torch.no_grad()
def faithfulness(model, tokenizer, saes: dict, adapters: dict, records, ranking: dict, *,
                 ns=NS, loss="kl", mode="delta", skip_first=0, max_len=256,
                 batch_size=8, scope="latents") -> dict:
    """The faithfulness of ``ranking`` (``{hook: [latent, ...]}``, best first) as an
    explanation of the edit ``adapters`` (``{hook: LatentAdapter}``) over ``saes``
    (``{hook: SAE}``): the loss on ``records`` with no edit, the full edit, and the edit
    restricted to / without each hook's top ``n`` for ``n`` in ``ns`` (those above the
    ranking's length dropped), in ``scope``, and the fractions (module docstring).
    ``loss="kl"`` needs records with ``teacher_prompt`` (the teacher is the model with the
    edits off); ``"ce"``: cross-entropy on the completions (or the texts).

    -> ``{"loss", "scope", "n_tokens", "loss_none", "loss_full", "ns", "loss_top",
    "loss_without", "sufficiency", "necessity"}``; the fractions are None when the full edit
    does not lower the loss (nothing to explain)."""
    from ..hooks import attach

    hooks = list(adapters)
    longest = min(len(ranking[h]) for h in hooks)
    ns = [n for n in ns if n <= longest]
    gates = _Gates(adapters, scope)
    own = {h: (torch.ones(saes[h].d_sae, dtype=torch.bool) if a.latent_mask is None
               else a.latent_mask.detach().cpu().bool()) for h, a in adapters.items()}
    variants = {"full": {}}
    for n in ns:
        top = {h: _mask(saes[h].d_sae, ranking[h][:n], "cpu") for h in hooks}
        variants[("top", n)] = top
        variants[("without", n)] = {h: ~m & own[h] for h, m in top.items()}
    edits = attach(model, {h: (saes[h], gates.work[h]) for h in hooks}, mode=mode,
                   skip_first=skip_first)
    sums = {"none": 0.0, **{v: 0.0 for v in variants}}
    n_tok = 0
    try:
        for ids, attn, lm, t_logp, n in _batches(model, tokenizer, edits, records, loss=loss,
                                                 max_len=max_len, batch_size=batch_size):
            with edits.disabled():
                sums["none"] += float(_summed_loss(model, ids, attn, lm, t_logp))
            for name, masks in variants.items():
                gates.set(masks)
                sums[name] += float(_summed_loss(model, ids, attn, lm, t_logp))
            n_tok += n
    finally:
        edits.remove()
    mean = {k: v / max(n_tok, 1) for k, v in sums.items()}
    gap = mean["none"] - mean["full"]
    frac = (lambda x: x / gap) if gap > 0 else (lambda x: None)
    return {"loss": loss, "scope": scope, "n_tokens": n_tok, "loss_none": mean["none"],
            "loss_full": mean["full"], "ns": ns,
            "loss_top": [mean[("top", n)] for n in ns],
            "loss_without": [mean[("without", n)] for n in ns],
            "sufficiency": [frac(mean["none"] - mean[("top", n)]) for n in ns],
            "necessity": [frac(mean[("without", n)] - mean["full"]) for n in ns]}


def edit_attribution(model, tokenizer, saes: dict, adapters: dict, records, *, steps=8,
                     loss="kl", mode="delta", skip_first=0, max_len=256, batch_size=8,
                     scope="writes") -> dict:
    """Each latent's share of the edit's effect on the loss, measured: integrated gradients
    along the path that scales every latent's part of the edit (:func:`gated_params` in
    ``scope``) from 0 to 1 together,

        ``A_i = ∫₀¹ ∂L/∂g_i (α·1) dα``,  with latent i's parameters = g_i · their trained value,

    by the midpoint rule over ``steps`` points, on ``records`` (``loss`` as in
    :func:`faithfulness`). Completeness: ``Σ_i A_i = L_full − L_none`` up to the rule's
    error, which the result reports (``"completeness"``: that sum over the measured gap). A
    latent with ``A_i < 0`` lowers the loss; ranking by ``A`` ascending puts the latents
    that carry the edit's effect first (:func:`attribution_ranking`). The loss is smooth in
    the gates (kinks aside) at one hook; with edits at several hooks an earlier edit can
    switch a later SAE's top-k selection, where the loss jumps and no derivative sees it: the
    completeness then shows what the integral misses.

    Costs ``steps`` forward-backward passes (model frozen, gradients for the gates only) and
    two forward passes per batch, plus the teacher's. -> ``{"attribution": {hook: float64
    [S]} (per loss token), "loss_none", "loss_full", "completeness", "n_tokens", "steps",
    "scope", "loss"}``."""
    import itertools

    from ..hooks import attach

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    hooks = list(adapters)
    gates = _Gates(adapters, scope)
    frozen = [p for p in itertools.chain(model.parameters(),
                                         *(saes[h].parameters() for h in hooks))
              if p.requires_grad]
    attr = {h: torch.zeros(saes[h].d_sae, dtype=torch.float64) for h in hooks}
    sums = {"none": 0.0, "full": 0.0}
    n_tok = 0
    edits = attach(model, {h: (saes[h], gates.work[h]) for h in hooks}, mode=mode,
                   skip_first=skip_first)
    for p in frozen:
        p.requires_grad_(False)
    try:
        for ids, attn, lm, t_logp, n in _batches(model, tokenizer, edits, records, loss=loss,
                                                 max_len=max_len, batch_size=batch_size):
            with torch.no_grad():
                with edits.disabled():
                    sums["none"] += float(_summed_loss(model, ids, attn, lm, t_logp))
                gates.set({})
                sums["full"] += float(_summed_loss(model, ids, attn, lm, t_logp))
            for j in range(steps):
                alpha = (j + 0.5) / steps
                gates.set({h: torch.full((saes[h].d_sae,), alpha) for h in hooks})
                params = [getattr(gates.work[h], name) for h in hooks for name in gates.axes[h]]
                with torch.enable_grad():
                    grads = torch.autograd.grad(_summed_loss(model, ids, attn, lm, t_logp),
                                                params, allow_unused=True)
                it = iter(grads)
                for h in hooks:
                    for name, ax in gates.axes[h].items():
                        g = next(it)
                        if g is None:
                            continue
                        o = gates.orig[h][name]
                        dims = [d for d in range(o.dim()) if d != ax]
                        part = (o * g).double()
                        attr[h] += (part.sum(dims) if dims else part).cpu() / steps
            n_tok += n
    finally:
        gates.set({})
        edits.remove()
        for p in frozen:
            p.requires_grad_(True)
    denom = max(n_tok, 1)
    attr = {h: a / denom for h, a in attr.items()}
    none, full = sums["none"] / denom, sums["full"] / denom
    total = float(sum(a.sum() for a in attr.values()))
    return {"attribution": attr, "loss_none": none, "loss_full": full,
            "completeness": total / (full - none) if full != none else None,
            "n_tokens": n_tok, "steps": steps, "scope": scope, "loss": loss}


def attribution_ranking(attribution: dict, n=None) -> dict:
    """``{hook: latent ids}`` from :func:`edit_attribution`'s ``"attribution"``, the latent
    that lowers the loss most first (the first ``n``)."""
    return {h: torch.argsort(a, stable=True)[:n].tolist() for h, a in attribution.items()}


def _summed_loss(model, ids, attn, lm, t_logp):
    from ..training.losses import kl_loss, lm_loss

    if t_logp is None:
        return lm_loss(model, ids, attn, lm, denom=1.0)
    return kl_loss(model, ids, attn, lm, t_logp, denom=1.0)


def _batches(model, tokenizer, edits, records, *, loss, max_len, batch_size):
    """-> per batch of ``records``: (ids, attention, loss mask, the teacher's log-probs or
    None, loss tokens); the teacher (the model, ``edits`` off) runs once per batch."""
    from ..models import input_device
    from ..training.data import collate, tokenize
    from ..training.losses import teacher_logprobs

    data = tokenize(records, tokenizer, max_len, teacher=loss == "kl")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    for i in range(0, len(data), batch_size):
        batch = data[i:i + batch_size]
        ids, attn, lm, _ = (t.to(device) for t in collate(batch, pad))
        t_logp = None
        if loss == "kl":
            with torch.no_grad(), edits.disabled():
                t_logp = teacher_logprobs(model, batch, pad)
        yield ids, attn, lm, t_logp, int(lm[:, 1:].sum())
