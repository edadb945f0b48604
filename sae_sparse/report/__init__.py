"""``sae-sparse report RUN_DIR``: what did the fine-tune change, in SAE latents.

Two steps, each its own module: :func:`compute_report` (:mod:`.compute`) measures and returns
the report as a dict; :mod:`.render` makes ``report.md`` and the PNG plots from that dict
alone. :func:`write_report` does both and writes ``report.json``. The measurements
themselves (:mod:`.measure`) are functions a notebook can call directly:

* latents ranked by what the edit does to the SAE's own reading of the residual
  (``edit_readout``: enc(edited output) − enc(output), signed, and its *switched* part), by
  the distillation's target (``target_readout``), by mean |Δz| on the eval split, and by the
  adapter's weights (|gain_i|, |bias_i|·‖W_dec[i]‖; kept in report.json);
* for each FFN hidden unit, the latents it reads and writes;
* for a residual-LoRA baseline run, its pullback into the SAE basis;
* for the top latents: activation lift (the target's text over the base model's) in the
  edit's direction, latents the edit moves against it flagged, and top-activating contexts;
* attribution (:mod:`.faithfulness`): each latent's share of the edit's loss reduction,
  measured by integrated gradients over per-latent gates: the ranking that names the latents
  carrying the edit's effect;
* faithfulness (:mod:`.faithfulness`): the fraction of the edit's loss reduction the
  attribution ranking's top n latents keep alone, and the fraction lost without them;
* Neuronpedia links where the SAE's config names an id.
"""
from __future__ import annotations

import json
import os

from .compute import (ATTRIBUTION, READOUT, SCORES, SWITCHED, TARGET, compute_report,
                      default_lift_records)
from .faithfulness import (SCOPES, attribution_ranking, edit_attribution, faithfulness,
                           restricted)
from .measure import (_finite_mean, activation_lift, directional_lift, edit_readout,
                      latent_activations, latent_scores, mean_abs_delta_z, target_readout,
                      top_contexts)
from .render import render_markdown, write_plots

__all__ = ["write_report", "compute_report", "render_markdown", "write_plots", "faithfulness",
           "restricted", "edit_attribution", "attribution_ranking", "SCOPES", "ATTRIBUTION",
           "default_lift_records", "edit_readout", "target_readout", "mean_abs_delta_z",
           "latent_scores", "latent_activations", "activation_lift", "directional_lift",
           "top_contexts", "READOUT", "SWITCHED", "TARGET", "SCORES", "_finite_mean"]


def write_report(run_dir: str, *, model=None, tokenizer=None, saes=None, planted=None,
                 top: int = 20, sae_paths: dict | None = None, lift_records=None,
                 context_records=None, n_interpret: int = 10, standalone: bool = True,
                 answer_tokens: int = 64, faithful: bool = True) -> dict:
    """Writes ``report.md``, ``report.json`` and PNGs into ``run_dir``; returns the report's
    data (:func:`compute_report`).

    ``model``/``tokenizer`` (for everything measured on text) are loaded from the run's
    recorded base model when not given; ``sae_paths`` = ``{hook: path}`` for SAEs that moved
    since training; ``planted`` = ``{hook: [latents]}`` adds a recovery check (top-3 by the
    bias score, else |gain|) and marks those latents in every table. For the
    ``n_interpret`` top latents of each readout ranking, ``lift_records = (records_a,
    records_b)`` gives each latent's activation lift (mean activation on a's completions
    over b's) and ``context_records`` its top-activating contexts; with ``standalone`` (the
    default) both come from the run itself when not given (see :mod:`.compute`; the base
    model's answers get ``answer_tokens`` tokens each). ``faithful``: the attribution
    ranking and the faithfulness table (:mod:`.faithfulness`): how much of the edit that
    ranking's top latents carry.
    """
    data = compute_report(run_dir, model=model, tokenizer=tokenizer, saes=saes,
                          planted=planted, top=top, sae_paths=sae_paths,
                          lift_records=lift_records, context_records=context_records,
                          n_interpret=n_interpret, standalone=standalone,
                          answer_tokens=answer_tokens, faithful=faithful)
    write_plots(data, run_dir)
    with open(os.path.join(run_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(data))
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(data, f, indent=1)
    return data
