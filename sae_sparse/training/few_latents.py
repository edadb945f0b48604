"""Edits that need few latents: train the full edit, rank its latents by the share of the
edit's effect each carries, restrict the edit to the top n, train it again
(``sae-sparse train --max-latents N``).

    metrics = train_few_latents(model, tok, saes, "train.jsonl", "runs/x", cfg, max_latents=32)

``RUN/full/`` holds the first, unrestricted run (resumable like any run), ``RUN/latents.json``
the chosen latents per hook, and ``RUN`` itself the restricted run (``TrainConfig.latents =
{hook: ids}``), trained from scratch with the same settings. The metrics returned are the
restricted run's, with the full run's eval loss under ``"full"``.

The ranking (:func:`rank_latents`, on the first run's first ``RANK_RECORDS`` training records,
never its eval split) is by default ``"attribution"``: the loss reduction each latent carries,
measured by integrated gradients over per-latent gates
(:func:`sae_sparse.report.edit_attribution`, scope ``"latents"``, the scope of the restricted
run's mask). ``"readout"`` ranks by |mean Δ SAE code| of the edited output
(:func:`sae_sparse.report.edit_readout`), which is cheaper (forward passes only) but measures
how far the edit moves a latent, not what that does to the loss.
"""
from __future__ import annotations

import dataclasses
import json
import os

RANK_RECORDS = 64  # training records the ranking is measured on
RANKINGS = ("attribution", "readout")


def rank_latents(model, tokenizer, saes, adapters, records, *, mode="delta", skip_first=0,
                 n=None, by="attribution", loss="ce", max_len=256, batch_size=8) -> dict:
    """``{hook: latent ids}``, the first ``n`` (all when None) of each hook's latents, best
    first, ``by``:

    * ``"attribution"``: the loss reduction each latent carries (:func:`edit_attribution`,
      scope "latents", ``loss`` = the run's: "kl" needs records with ``teacher_prompt``);
    * ``"readout"``: the edit's readout (|mean Δ SAE code| of the edited output; the run's
      other hooks' edits on), largest first."""
    import torch

    from ..report.faithfulness import (ATTRIBUTION_STEPS, attribution_ranking,
                                       edit_attribution)
    from ..report.measure import edit_readout

    if by not in RANKINGS:
        raise ValueError(f"by must be one of {RANKINGS}, got {by!r}")
    if by == "attribution":
        a = edit_attribution(model, tokenizer, saes, adapters, records, loss=loss,
                             steps=ATTRIBUTION_STEPS, mode=mode, skip_first=skip_first,
                             max_len=max_len, batch_size=batch_size, scope="latents")
        if a["n_tokens"] == 0:
            raise ValueError("no record has a loss token to rank the latents on")
        return attribution_ranking(a["attribution"], n)
    out = {}
    for h, ad in adapters.items():
        others = {g: (saes[g], a) for g, a in adapters.items() if g != h}
        r = edit_readout(model, tokenizer, saes[h], ad, h, records, mode=mode,
                         skip_first=skip_first, upstream=others)
        if r is None:
            raise ValueError(f"no record has a token to rank the latents at {h} on")
        order = torch.argsort(r.abs(), descending=True)
        out[h] = order[:n].tolist() if n else order.tolist()
    return out


def train_few_latents(model, tokenizer, saes: dict, data, out_dir: str, config, max_latents: int,
                      by="attribution", **kwargs) -> dict:
    """See the module docstring (``by``: the ranking); ``kwargs`` go to both
    :func:`train_adapter` calls."""
    from .adapters import load_adapter
    from .data import load_jsonl
    from .trainer import train_adapter

    if max_latents < 1:
        raise ValueError(f"max_latents must be >= 1, got {max_latents}")
    if config.baseline is not None or config.latents is not None:
        raise ValueError("max_latents: the first run is the full sparse edit (no baseline, "
                         "no latents of its own)")
    full_dir = os.path.join(out_dir, "full")
    full = train_adapter(model, tokenizer, saes, data, full_dir, config, **kwargs)
    ads, conf = load_adapter(full_dir)
    records = load_jsonl(os.path.join(full_dir, "train.jsonl"))
    if by == "attribution" and config.loss == "kl":
        records = [r for r in records if "teacher_prompt" in r]
    records = records[:RANK_RECORDS]
    for t in ads.values():  # the loaded adapters, where the SAEs are
        t.to(next(iter(saes.values())).W_dec.device)
    top = rank_latents(model, tokenizer, saes, ads, records, mode=conf["mode"],
                       skip_first=conf.get("skip_first") or 0, n=max_latents, by=by,
                       loss=config.loss, max_len=config.max_len, batch_size=config.batch_size)
    os.makedirs(out_dir, exist_ok=True)
    what = {"attribution": "the loss reduction each latent carries (integrated gradients, "
                           "scope latents)",
            "readout": "|mean Δ SAE code| of the edited output"}[by]
    with open(os.path.join(out_dir, "latents.json"), "w") as f:
        json.dump({"max_latents": max_latents, "ranking": f"{what} (full/, its first "
                   f"{len(records)} training records)", "by": by, "latents": top}, f,
                  indent=1)
    restricted = dataclasses.replace(config, latents=top)
    m = train_adapter(model, tokenizer, saes, data, out_dir, restricted, **kwargs)
    m["full"] = {k: full.get(k) for k in ("base_eval_loss", "final_eval_loss",
                                          "final_train_loss")}
    m["latents"] = top
    return m
