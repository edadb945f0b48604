"""A computed report (:func:`.compute.compute_report`'s dict) as markdown and PNG plots.
Nothing here measures anything: every number comes from the dict."""
from __future__ import annotations

import os

from .compute import ATTRIBUTION, READOUT, SCORES, SWITCHED, TARGET, WEIGHT_SCORES

ABOUT = {
    READOUT: "The edit as the SAE reads it: re-encoding the hooked module's edited output and "
             "subtracting the code of its unedited output, per latent, averaged over {where} "
             "(signed: + the edit turns the latent on).{multi}",
    SWITCHED: "The same difference counted only on the tokens where the edit switches the "
              "latent: active in one of the two codes and not the other (latents that are "
              "already active and only grow or shrink, such as frequent ones, are left out).",
    TARGET: "Not the edit: what it was trained to reproduce. The code of the unedited model's "
            "output after the teacher's prompt minus the code after the student's, on the "
            "same completion tokens, averaged over {where}; an edit that made the student's "
            "residual here the teacher's would have exactly this readout. Cosine with the "
            "edit's readout: {cosine:.3f}. ⚠ marks a latent the edit moves against the target.",
}
ABOUT_ATTRIBUTION = (
    "Measured, not read off the weights: each latent's share of the edit's effect on the "
    "run's loss (integrated gradients over a gate per latent that scales {gated} "
    "together, from 0 to 1; {records}, {steps} integration points). The scores sum to the "
    "loss reduction of the whole edit, {gap:.4g} here (sum over latents / measured "
    "reduction: {completeness}); a latent the edit moves against the loss scores below zero."
    " This is the ranking the faithfulness table tests.")
GATED = {"writes": "its gain, bias and W_out column (what the edit writes into it; "
                   "W_in, which the FFN reads it with, is left whole)",
         "latents": "its gain, bias, W_in row and W_out column"}
MULTI = (" The run's edits at the other hooks are on too, so at a later layer this is the "
         "whole run's effect so far, as this layer's SAE reads it.")


def md_cell(text) -> str:
    """A table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def slug(hook: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in hook)


def png_name(hook: str, ranking: str) -> str:
    return f"{slug(hook)}_{SCORES.get(ranking, 'score')}.png"


def _num(x):
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def render_markdown(data: dict) -> str:
    lines = [f"# sae_sparse report: `{data['run']}`", ""] + _summary(data)
    if _history(data):
        lines += ["## Loss curve", "", "![loss curve](loss_curve.png)", ""]
    if data.get("faithfulness"):
        lines += _faithfulness_markdown(data["faithfulness"], data.get("n_hooks", 1))
    for h, res in data["hooks"].items():
        lines += _hook_markdown(data, h, res)
    return "\n".join(lines) + "\n"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _faithfulness_markdown(f, n_hooks):
    what = {"kl": "KL to the teacher", "ce": "cross-entropy"}.get(f["loss"], f["loss"])
    per = " at each hook (by its own ranking)" if n_hooks > 1 else ""
    lines = ["## Faithfulness: do the top latents carry the edit?", "",
             f"The edit restricted to the top n latents by "
             f"{md_cell(f.get('ranking', READOUT))}{per} "
             "(every other latent unedited; the FFN reads and writes only those), and the full "
             "edit "
             f"without them, measured by the run's loss ({what}) on the {f['records']} "
             f"({f['n_records']} records, {f['n_tokens']} loss tokens): no edit "
             f"{f['loss_none']:.4f}, the full edit {f['loss_full']:.4f}. Sufficiency = the "
             "fraction of the loss reduction the top n keep alone; necessity = the fraction "
             "lost without them.", ""]
    if f["sufficiency"] and f["sufficiency"][0] is None:
        lines += ["The full edit does not lower the loss here: there is nothing to explain.",
                  ""]
    lines += ["![faithfulness](faithfulness.png)", "",
              "| n | sufficiency | necessity | loss, top n only | loss, without the top n |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | {_pct(s)} | {_pct(ne)} | {lt:.4f} | {lw:.4f} |"
              for n, s, ne, lt, lw in zip(f["ns"], f["sufficiency"], f["necessity"],
                                          f["loss_top"], f["loss_without"])]
    return lines + [""]


def _history(data):
    hist = data["metrics"].get("history") or {}
    return hist if hist.get("step") or hist.get("eval_step") else None


def _summary(data):
    m, e, lines = data["metrics"], data["edit"], []
    if m:
        what = {"kl": " (KL to the teacher per completion token)",
                "ce": " (cross-entropy per loss token)"}.get(m.get("loss"), "")
        ev = (f"eval loss{what}: base model {_num(m.get('base_eval_loss'))} → edited "
              f"{_num(m.get('final_eval_loss'))}" if m.get("n_eval")
              else f"no eval split{what.replace(' (', ' (loss: ')}")
        lines.append(f"- {ev}; final train loss {_num(m.get('final_train_loss'))} "
                     f"({m.get('n_train')} train / {m.get('n_eval')} eval records)")
        if m.get("warnings"):
            lines += [f"- **warning:** {w}" for w in m["warnings"]]
    lines.append(f"- mode: {e['mode']}, edit positions: {e['edit_positions']}"
                 + (f" less each sequence's first {e['skip_first']}" if e.get("skip_first")
                    else "") + f", baseline: {e.get('baseline')}")
    for h, o in (m.get("overflow") or {}).items():
        if o.get("architecture") == "topk":
            lines.append(f"- `{h}`: a TopK SAE, k = {o['k']} active latents on every token")
        else:
            rate = 100 * o["rate"]
            flag = " **(above 1%: raise --k)**" if rate > 1 else ""
            lines.append(f"- `{h}`: {o['overflow_tokens']} of {o['tokens']} edited tokens "
                         f"({rate:.2f}%) had more than k = {o['k']} active latents; the "
                         f"weakest were dropped{flag}")
    src = data.get("sources") or {}
    if src.get("lift") == "run":
        lines.append("- lift: the run's completions (a) over the base model's own greedy "
                     "answers to the same prompts (b, `student_answers.jsonl`)")
    if src.get("contexts") == "run":
        lines.append("- contexts: the run's training text")
    return lines + [""]


def _name_fn(res):
    np_id, marked = res.get("neuronpedia_id"), set(res.get("planted_latents") or ())

    def name_of(i):
        link = f"[{i}](https://www.neuronpedia.org/{np_id}/{i})" if np_id else str(i)
        return f"**{link}** (planted)" if i in marked else link
    return name_of


def _measured(res):
    return READOUT in res or "mean |Δz| (eval)" in res


def shown_rankings(res) -> list:
    """The rankings the markdown shows (and plots): all but the raw |gain| and |bias| ones
    when a measured ranking stands beside them, whose scale says little."""
    return [n for n in SCORES if n in res
            and not (_measured(res) and n in WEIGHT_SCORES[:2])]


def _hook_markdown(data, h, res):
    name_of = _name_fn(res)
    lines = [f"## `{h}` (SAE: {md_cell(res['sae'])}, S={res['d_sae']})", ""]
    for name in [n for n in shown_rankings(res) if n not in (READOUT, SWITCHED, TARGET)]:
        lines += _ranking_table(h, name, res, name_of, data)
    if _measured(res) and any(n in res for n in WEIGHT_SCORES[:2]):
        lines += ["The rankings by the raw |gain| and |bias|·‖W_dec‖ are in `report.json`; "
                  "those below measure the edit on the model.", ""]
    if res.get("ffn_units"):
        lines += _ffn_table(res, name_of)
    for name in (READOUT, SWITCHED, TARGET):
        if name in res:
            lines += _readout_table(data, h, name, res, name_of)
    for out in (res.get("interpret") or {}).values():
        lines += _interpret_markdown(out, name_of)
    if "planted" in res:
        p = res["planted"]
        lines += [f"### Planted edit: {'RECOVERED' if p['recovered'] else 'NOT recovered'}", "",
                  f"planted latents {p['latents']}; top {len(p['latents'])} by "
                  f"{md_cell(p['score'])}: {p['top']}", ""]
    return lines


def _ranking_table(h, name, res, name_of, data=None):
    vals = res.get("edit_values") or {}
    cols = [c for c in ("gain", "bias") if any(c in v for v in vals.values())]
    lines = [f"### Top latents by {md_cell(name)}", ""]
    a = (data or {}).get("attribution")
    if name == ATTRIBUTION and a:
        c = a.get("completeness")
        gated = GATED.get(a.get("scope"), "its part of the edit")
        lines += [ABOUT_ATTRIBUTION.format(records=a["records"], steps=a["steps"],
                                           gated=gated, gap=a["loss_none"] - a["loss_full"],
                                           completeness="n/a" if c is None else f"{c:.3f}"),
                  ""]
    lines += [f"![{SCORES[name]}]({png_name(h, name)})",
              "", "| rank | latent | score |" + "".join(f" {c} |" for c in cols),
             "|---|---|---|" + "---|" * len(cols)]
    for r, (i, v) in enumerate(res[name][:10]):
        extra = "".join(f" {vals[str(i)][c]:+.4g} |" if str(i) in vals else " |" for c in cols)
        lines.append(f"| {r + 1} | {name_of(i)} | {v:.4g} |{extra}")
    return lines + [""]


def _ffn_table(res, name_of):
    lines = ["### FFNN hidden units (by write strength)", "",
             "| unit | write strength | reads (top \\|W_in\\|) "
             "| writes (top \\|W_out\\|·‖W_dec‖, signed) |", "|---|---|---|---|"]
    for u in res["ffn_units"]:
        lines.append(f"| {u['unit']} | {u['strength']:.3g} | "
                     + ", ".join(name_of(i) for i, _ in u["reads"]) + " | "
                     + ", ".join(f"{name_of(i)} ({w:+.3g})" for i, _, w in u["writes"]) + " |")
    return lines + [""]


def _readout_table(data, h, name, res, name_of):
    where = f"the {res.get('readout_source', 'eval split')}'s completion tokens"
    about = ABOUT[name].format(where=where, multi=MULTI if data.get("n_hooks", 1) > 1 else "",
                               cosine=res.get("target_cosine", float("nan")))
    edit = res.get("edit_at_target") if name == TARGET else None  # side by side
    lines = [f"### Top latents by {md_cell(name)}", "", about, "",
             f"![{SCORES[name]}]({png_name(h, name)})", "", "| rank | latent | mean Δ code |"
             + (" the edit's |" if edit is not None else ""),
             "|---|---|---|" + ("---|" if edit is not None else "")]
    for r, (i, v) in enumerate(res[SCORES[name]][:10]):
        tail = ""
        if edit is not None:
            e = edit[str(i)]
            tail = f" {e:+.4g}{' ⚠' if e * v < 0 else ''} |"
        lines.append(f"| {r + 1} | {name_of(i)} | {v:+.4g} |{tail}")
    return lines + [""]


def _interpret_markdown(out, name_of):
    lines = [f"### What the top {len(out['latents'])} latents by {md_cell(out['ranking'])} are",
             ""]
    if "lift" in out:
        up = out["mean_lift_raised"]
        lines += [f"Activation lift = mean activation per token on the first set's "
                  f"completions (a, e.g. the teacher's) over the second's (b): mean "
                  f"{out['mean_lift']:.2f}×. In the edit's direction (a/b for a latent the "
                  f"edit raises, b/a for one it lowers): mean {out['mean_lift_edit_dir']:.2f}×; "
                  + (f"over those it raises: mean {up:.2f}×" if up is not None
                     else "it raises none") + " (∞ left out of the means)."
                  + (f" **{out['n_against']} moved against the target** (⚠: lift in the "
                     "edit's direction below 0.8)." if out.get("n_against") else ""), "",
                  "| latent | edit | mean act. (a) | mean act. (b) | lift a/b "
                  "| lift in the edit's direction |", "|---|---|---|---|---|---|"]
        lines += [f"| {name_of(x['latent'])} | "
                  + (f"{x['edit']:+.3g}" if x["edit"] is not None else "")
                  + f" | {x['mean_a']:.4g} | {x['mean_b']:.4g} | {x['lift']:.2f}× | "
                  f"{x['lift_edit_dir']:.2f}×{' ⚠' if x.get('against') else ''} |"
                  for x in out["lift"]]
        lines.append("")
    if "contexts" in out:
        lines += ["Top-activating contexts (the token in ⟦ ⟧):", "",
                  "| latent | activation | context |", "|---|---|---|"]
        for lat, rows in out["contexts"].items():
            lines += [f"| {name_of(int(lat))} | {r['activation']:.3g} | {md_cell(r['context'])} |"
                      for r in rows[:3]]
        lines.append("")
    return lines


def write_plots(data: dict, run_dir: str):
    """The loss curve and one bar chart per ranking the markdown shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = _history(data)
    if hist:
        fig, ax = plt.subplots(figsize=(7, 3))
        if hist.get("step"):
            ax.plot(hist["step"], hist["train_loss"], lw=1, color="tab:blue", label="train")
        if hist.get("eval_step"):
            ax.plot(hist["eval_step"], hist["eval_loss"], "o-", color="tab:orange",
                    label="eval (edited)")
        base = data["metrics"].get("base_eval_loss")
        if base is not None and base == base:
            ax.axhline(base, color="gray", ls="--", lw=1, label="eval (unedited)")
        ax.set(xlabel="step", ylabel="loss")
        ax.legend()
        _save(fig, os.path.join(run_dir, "loss_curve.png"))
    f = data.get("faithfulness")
    if f and f["ns"] and f["sufficiency"][0] is not None:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(f["ns"], [100 * x for x in f["sufficiency"]], "o-", label="sufficiency (top n only)")
        ax.plot(f["ns"], [100 * x for x in f["necessity"]], "s--", label="necessity (without top n)")
        ax.set(xscale="log", xlabel=f"n (top latents by {f.get('ranking', READOUT)})",
               ylabel="% of the loss reduction", title="faithfulness")
        ax.axhline(100, color="gray", lw=0.8)
        ax.legend()
        _save(fig, os.path.join(run_dir, "faithfulness.png"))
    for h, res in data["hooks"].items():
        for name in shown_rankings(res):
            items = res[SCORES[name]] if name in (READOUT, SWITCHED, TARGET) else res[name]
            fig, ax = plt.subplots(figsize=(7, 3))
            ax.bar([str(i) for i, _ in items], [v for _, v in items], color="tab:blue")
            ax.set(title=f"{h}: top latents by {name}", xlabel="latent")
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
            _save(fig, os.path.join(run_dir, png_name(h, name)))


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
