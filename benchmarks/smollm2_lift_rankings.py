"""How much the top-10 activation lift of a SmolLM2 distillation run depends on the ranking
and on the 40-question split: the edit's readout (``report.edit_readout``) and every latent's
lift (``report.activation_lift``, teacher answers over base answers) over all S latents, on
the validation and the held-out questions, then the mean lift of the top 10 of several
rankings on each.

The last row is the distillation's target (``report.target_readout``): the system prompt's
own effect as the SAE reads it, the code of the teacher's residual (with the system prompt)
minus the student's (without) on the same answer tokens, averaged over them. An edit that
reproduced the teacher's residual at the layer exactly would have this readout, so its row
says what the ranking can show with this SAE for a perfect edit. The cosine of the two
readouts is printed too.

    python benchmarks/smollm2_lift_rankings.py --out runs/smollm2 \\
        --run run_gain_bias_ffn_lr0.01          # after benchmarks/smollm2_distill.py

A multi-layer run is read at one of its layers with ``--hook`` (its SAE from the extra-saes
stage): ``--run run_multi_gain_bias_ffn_lr0.02 --hook model.layers.23``. As in the report,
its edits at the other layers are on too, so a later layer reads the whole run's effect so
far (``edit_readout(upstream=)``).
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

RANKINGS = {  # name: score per latent from (readout Δ, switched Δ, unedited mean activation)
    "|mean Δ code| (the report's readout)": lambda d, f, a: d.abs(),
    "|switched Δ| (the report's second)": lambda d, f, a: f.abs(),
    "Δ > 0 only (latents the edit raises)": lambda d, f, a: d.clamp(min=0),
    "|Δ| / (unedited mean + 0.2)": lambda d, f, a: d.abs() / (a + 0.2),
    "|Δ| / sqrt(unedited mean + 0.05)": lambda d, f, a: d.abs() / (a + 0.05).sqrt(),
}


TARGET = "the system prompt itself: |teacher − student code| (the target; no edit)"


def top_lift(delta, lift, score, n=10):
    """Mean lift a/b and mean lift in the edit's direction of the top n latents by score,
    as the report computes them (``lift``: ``report.activation_lift``'s rows)."""
    from sae_sparse.report import _finite_mean, directional_lift
    top = [dict(lift[i], edit=float(delta[i])) for i in torch.topk(score, n).indices.tolist()]
    return (_finite_mean([x["lift"] for x in top]),
            _finite_mean([directional_lift(x) for x in top]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="smollm2_distill.py's --out")
    ap.add_argument("--run", default="run_gain_bias_ffn_lr0.01",
                    help="a run directory under <out>/methods")
    ap.add_argument("--hook", default=None,
                    help="the layer to read a multi-layer run at (default: model.layers.15)")
    a = ap.parse_args()
    from smollm2_distill import HOOK, _layer, load, sae_dir
    hook = a.hook or HOOK

    from sae_sparse.io import load_sae
    from sae_sparse.report import activation_lift, edit_readout, target_readout
    from sae_sparse.training import load_adapter, load_jsonl
    torch.set_grad_enabled(False)
    model, tok = load(a.out)
    sae = load_sae(os.path.join(a.out, sae_dir(hook)))
    adapters, conf = load_adapter(os.path.join(a.out, "methods", a.run))
    if hook not in adapters:
        raise SystemExit(f"--hook {hook}: {a.run} edits only {sorted(adapters)}")
    adapter, skip = adapters[hook], conf.get("skip_first", 0)
    # the run's other layers on too, as the report reads a multi-layer run: at a later layer
    # the whole run's effect so far
    upstream = {h: (load_sae(os.path.join(a.out, sae_dir(h))), ad)
                for h, ad in adapters.items() if h != hook}
    n_val = json.load(open(os.path.join(a.out, "prepare.json")))["n_val"]

    def recs(name, split):
        return load_jsonl(os.path.join(a.out, f"{name}_{split}.jsonl"))
    splits = {"validation": (recs("teacher", "train")[:n_val], recs("base", "train")[:n_val]),
              "held-out": (recs("teacher", "heldout"), recs("base", "heldout"))}
    rows, cosines = {}, {}
    for split, (teacher, base) in splits.items():
        delta, flips = edit_readout(model, tok, sae, adapter, hook, teacher, switched=True,
                                    skip_first=skip, upstream=upstream)
        lift = activation_lift(model, tok, sae, hook, list(range(sae.d_sae)), teacher, base)
        ma = torch.tensor([x["mean_a"] for x in lift])
        for name, score in RANKINGS.items():
            rows.setdefault(name, {})[split] = top_lift(delta, lift, score(delta, flips, ma))
        ideal = target_readout(model, tok, sae, hook, teacher)  # (the records' teacher_prompt)
        rows.setdefault(TARGET, {})[split] = top_lift(ideal, lift, ideal.abs())
        cosines[split] = float(torch.nn.functional.cosine_similarity(ideal, delta, dim=0))
    lines = [f"Top-10 mean activation lift (teacher answers over base answers; a/b, and in "
             f"the edit's direction) of `{a.run}` at `{hook}` by ranking, on {n_val} questions "
             "each:", "",
             "| ranking | validation | held-out |", "|---|---|---|"]
    for name, r in rows.items():
        cell = name.replace("|", "\\|")
        lines.append(f"| {cell} | " + " | ".join(
            f"{r[s][0]:.2f}× / {r[s][1]:.2f}×" for s in splits) + " |")
    lines += ["", "Cosine of the edit's readout with the system prompt's: " + ", ".join(
        f"{s} {c:.2f}" for s, c in cosines.items()) + "."]
    text = "\n".join(lines)
    name = "lift_rankings.md" if hook == HOOK else f"lift_rankings_l{_layer(hook)}.md"
    with open(os.path.join(a.out, "methods", a.run, name), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
