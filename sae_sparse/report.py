"""``sae-sparse report RUN_DIR``: what did the fine-tune change, in SAE latents.

Writes ``report.md`` and PNG plots into the run directory:
* latents ranked by |gain_i|, by |bias_i|·‖W_dec[i]‖, and by the mean |Δz_i| measured on the
  run's eval split (Δz = z' − z over every latent, computed in token chunks);
* for each FFNN hidden unit, the latents it reads (largest |W_in| rows) and writes (largest
  |W_out| columns × decoder norms);
* for a residual-LoRA baseline run, its pullback into SAE basis: how strongly the update writes
  each latent's encoder direction (‖W_enc[i] (AB)ᵀ‖) and reads each decoder direction
  (‖W_dec[i] A‖);
* Neuronpedia links where the SAE's config names an id.
"""
from __future__ import annotations

import json
import os

import torch

from .baselines import ResidualLoRA
from .modules import LatentAdapter
from .reference import activation_fn


def _top(scores: torch.Tensor, n: int):
    n = min(n, scores.numel())
    v, i = torch.topk(scores.float(), n)
    return [(int(a), float(b)) for a, b in zip(i, v)]


READOUT = "|mean Δ SAE code| of the edited output"
SWITCHED = "|mean Δ SAE code| where the edit switches the latent on or off"
TARGET = "|mean Δ SAE code| of the teacher's prompt (the distillation's target)"
# score name -> (an ASCII slug for file names, the signed value shown beside it)
SCORES = {"|gain|": "gain", "|bias|·‖W_dec‖": "bias", "mean |Δz| (eval)": "delta_z",
          "LoRA writes ‖W_enc[i]·(AB)ᵀ‖": "lora_writes", "LoRA reads ‖W_dec[i]·A‖": "lora_reads",
          READOUT: "readout", SWITCHED: "switched", TARGET: "target"}


def latent_scores(adapter: LatentAdapter, sae) -> dict:
    dn = sae.W_dec.detach().float().norm(dim=1)
    p = adapter.edit_params()  # latent mask applied
    out = {}
    if "gain" in p:
        out["|gain|"] = p["gain"].detach().float().abs()
    if "bias" in p:
        out["|bias|·‖W_dec‖"] = p["bias"].detach().float().abs() * dn
    return out


def _md(text) -> str:
    """A table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _loss_curve(path, history, base):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    if history.get("step"):
        ax.plot(history["step"], history["train_loss"], lw=1, color="tab:blue", label="train")
    if history.get("eval_step"):
        ax.plot(history["eval_step"], history["eval_loss"], "o-", color="tab:orange",
                label="eval (edited)")
    if base is not None and base == base:
        ax.axhline(base, color="gray", ls="--", lw=1, label="eval (unedited)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def mean_abs_delta_z(model, tokenizer, sae, adapter, hook, records, *, max_tokens=4096,
                     chunk_elems=1 << 22, skip_first=0):
    """Mean |z'_i − z_i| per latent over the hooked activations of ``records`` (less each
    record's first ``skip_first`` positions, which the edit leaves alone)."""
    from .hookpoints import forward_to, resolve_hook
    from .models import input_device

    path = resolve_hook(model, hook)
    acts = []
    n = 0
    for r in records:
        text = r["text"] if "text" in r else r["prompt"] + r["completion"]
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        h = forward_to(model, path, ids.to(input_device(model)))[:, skip_first:]
        acts.append(h.detach().reshape(-1, h.shape[-1]).float())
        n += h.shape[0] * h.shape[1]
        if n >= max_tokens:
            break
    if not acts:
        return None
    x = torch.cat(acts)[:max_tokens].to(sae.W_dec.dtype)
    S = sae.d_sae
    p = {k: v.detach() for k, v in adapter.edit_params().items()}
    act = activation_fn(adapter.activation)
    total = torch.zeros(S, dtype=torch.float64, device=x.device)
    step = max(1, chunk_elems // S)
    for i in range(0, x.shape[0], step):
        v, idx = sae.encode(x[i:i + step])
        z = torch.zeros(v.shape[0], S, dtype=v.dtype, device=v.device).scatter(1, idx, v)
        dz = torch.zeros_like(z)
        if "gain" in p:
            dz += z * p["gain"]
        if "bias" in p:
            dz += p["bias"]
        if "W_in" in p:
            h = z @ p["W_in"] + p.get("b_in", 0)
            dz += act(h) @ p["W_out"]
        total += dz.abs().sum(0).double()
    return (total / x.shape[0]).float()


def _record_ids(tokenizer, r, max_len, completion_only=True):
    """-> (the record's first ``max_len`` token ids, the index of its first completion token:
    0 for ``text`` records, or when not ``completion_only``)."""
    if "text" in r:
        ids, start = tokenizer(r["text"], add_special_tokens=False)["input_ids"], 0
    else:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        ids, start = p + c, (len(p) if completion_only else 0)
    return ids[:max_len], start


@torch.no_grad()
def edit_readout(model, tokenizer, sae, adapter, hook, records, *, mode="delta",
                 max_tokens=4096, max_len=256, switched=False, skip_first=0, upstream=None):
    """The edit as the SAE itself reads it: per latent, the mean over ``records``' tokens
    (completion tokens of prompt/completion records) of ``enc(edited output) − enc(output)``
    at ``hook``, signed. Unlike the adapter's own weights, which an overcomplete dictionary
    does not determine (a bias over S latents writes one d-dimensional vector, and Adam moves
    every coordinate it touches by about the same step), this reads which latents the edited
    residual turns on or off. None when the records hold no token.

    ``switched=True`` returns ``(readout, switched)``, the second counting on each token only
    the latents the edit switches: active in the edited code and not in the unedited one
    (+ their edited value) or the reverse (− their unedited value). A latent that is already
    active and only grows or shrinks (a frequent one, such as a comma's) is left out, so this
    part names what the edit adds to or removes from the residual's description.

    ``upstream``: a multi-layer run's other edits, ``{hook: (sae, adapter)}``, on as well, so
    that at a later layer this reads the whole run's effect so far (its edits before ``hook``
    and the one at it), not the one adapter's on the unedited residual; edits after ``hook``
    play no part."""
    from .hookpoints import forward_to, resolve_hook
    from .hooks import attach
    from .models import input_device

    path = resolve_hook(model, hook)
    if upstream and hook in upstream:
        raise ValueError(f"upstream: holds the edit at {hook!r} itself; pass the run's other "
                         "edits only")
    edits = attach(model, {**(upstream or {}), hook: (sae, adapter)}, mode=mode,
                   skip_first=skip_first)  # forward_to reads after the hooked module
    total = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device)
    flips = torch.zeros_like(total)
    n = 0
    try:
        for r in records:
            ids, start = _record_ids(tokenizer, r, max_len)
            if len(ids) <= start:
                continue
            x = torch.tensor([ids], device=input_device(model))
            with edits.disabled():
                off = forward_to(model, path, x)[0, start:].to(sae.W_dec.dtype)
            on = forward_to(model, path, x)[0, start:].to(sae.W_dec.dtype)
            codes = []
            for h, sign in ((on, 1.0), (off, -1.0)):
                v, i = sae.encode(h)
                total.index_add_(0, i.reshape(-1), sign * v.reshape(-1).double())
                active = v > 0  # a TopK code may hold zeros; they are not active
                row = torch.arange(v.shape[0], device=v.device)[:, None].expand_as(i)
                codes.append((sign, v[active].double(), i[active], (row * sae.d_sae + i)[active]))
            (s1, v1, i1, k1), (s0, v0, i0, k0) = codes
            new = ~torch.isin(k1, k0)  # (token, latent) pairs in one code and not the other
            gone = ~torch.isin(k0, k1)
            flips.index_add_(0, i1[new], s1 * v1[new])
            flips.index_add_(0, i0[gone], s0 * v0[gone])
            n += off.shape[0]
            if n >= max_tokens:
                break
    finally:
        edits.remove()
    if not n:
        return (None, None) if switched else None
    return ((total / n).float(), (flips / n).float()) if switched else (total / n).float()


@torch.no_grad()
def target_readout(model, tokenizer, sae, hook, records, *, max_tokens=4096, max_len=256):
    """What a distillation's edit aims at, as the SAE reads it: per latent, the mean over the
    completion tokens of ``records`` (prompt/completion records with a ``teacher_prompt``) of
    ``enc(h after teacher_prompt + completion) − enc(h after prompt + completion)`` at ``hook``
    of the unedited model, the same completion tokens after the two prompts. An edit that made
    the student's residual there the teacher's would have exactly this readout
    (``edit_readout``). None when no record has a teacher prompt and a completion token."""
    from .hookpoints import forward_to, resolve_hook
    from .models import input_device

    path = resolve_hook(model, hook)
    total = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device)
    n = 0
    for r in records:
        if "teacher_prompt" not in r or "completion" not in r:
            continue
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        ids = [tokenizer(r[key], add_special_tokens=False)["input_ids"]
               for key in ("teacher_prompt", "prompt")]
        m = min(len(c), *(max_len - len(p) for p in ids))  # the same tokens in both
        if m <= 0:
            continue
        for p, sign in zip(ids, (1.0, -1.0)):
            h = forward_to(model, path, torch.tensor([p + c[:m]], device=input_device(model)))
            v, i = sae.encode(h[0, len(p):].to(sae.W_dec.dtype))
            total.index_add_(0, i.reshape(-1), sign * v.reshape(-1).double())
        n += m
        if n >= max_tokens:
            break
    return (total / n).float() if n else None


@torch.no_grad()
def latent_activations(model, tokenizer, sae, hook, records, latents, *, completion_only=True,
                       max_len=256):
    """Per record: (token strings, activations [T, len(latents)]) of the chosen latents at the
    hooked module of the unedited model (completion tokens only for prompt/completion
    records when ``completion_only``)."""
    from .hookpoints import forward_to, resolve_hook
    from .models import input_device

    path = resolve_hook(model, hook)
    lat = torch.as_tensor(latents, dtype=torch.long)
    out = []
    for r in records:
        ids, start = _record_ids(tokenizer, r, max_len, completion_only)
        if len(ids) <= start:
            continue
        h = forward_to(model, path, torch.tensor([ids], device=input_device(model)))
        h = h[0].to(sae.W_dec.dtype)
        v, i = sae.encode(h)
        dense = torch.zeros(h.shape[0], sae.d_sae, dtype=v.dtype, device=v.device)
        dense.scatter_(1, i, v)
        out.append(([tokenizer.decode([t]) for t in ids[start:]],
                    dense[start:, lat.to(dense.device)].float().cpu()))
    return out


def activation_lift(model, tokenizer, sae, hook, latents, records_a, records_b):
    """Per latent: mean activation per token on ``records_a`` (e.g. the teacher's
    completions), on ``records_b`` (the base model's) and their ratio (the lift)."""
    def mean(recs):
        acts = [a for _, a in latent_activations(model, tokenizer, sae, hook, recs, latents)]
        return torch.cat(acts).mean(0) if acts else torch.zeros(len(latents))
    a, b = mean(records_a), mean(records_b)
    return [{"latent": int(i), "mean_a": float(x), "mean_b": float(y),
             "lift": float(x / y) if y > 0 else float("inf") if x > 0 else 1.0}
            for i, x, y in zip(latents, a, b)]


def directional_lift(x: dict) -> float:
    """A latent's lift in the direction its edit (``x["edit"]``, signed) pushes: a/b when the
    edit raises it, b/a when it lowers it (a latent the edit suppresses should be one the
    teacher uses less)."""
    if x.get("edit") is None or x["edit"] >= 0:
        return x["lift"]
    a, b = x["mean_a"], x["mean_b"]
    return b / a if a > 0 else float("inf") if b > 0 else 1.0


def _finite_mean(xs):
    xs = [v for v in xs if v != float("inf")]
    return sum(xs) / len(xs) if xs else float("nan")


def top_contexts(model, tokenizer, sae, hook, latents, records, *, n=5, window=8,
                 skip_first=1):
    """Per latent: its ``n`` top-activating tokens in ``records`` with ``window`` tokens of
    context on each side (the token in ⟦ ⟧), as SAE dashboards show them. A record's first
    ``skip_first`` positions are context only: the first is an attention sink in most
    models (a residual norm ~100x the others; ``train_sae`` leaves it out the same way), where
    an SAE's code is meaningless and huge."""
    acts = latent_activations(model, tokenizer, sae, hook, records, latents,
                              completion_only=False)
    out = {}
    for j, lat in enumerate(latents):
        best = []
        for toks, a in acts:
            col = a[skip_first:, j]
            for t in torch.topk(col, min(n, col.numel())).indices.tolist():
                if col[t] > 0:
                    best.append((float(col[t]), toks, t + skip_first))
        best.sort(key=lambda b: -b[0])
        out[int(lat)] = [{"activation": v, "context": _context(toks, t, window)}
                         for v, toks, t in best[:n]]
    return out


def _context(toks, t, window):
    def clean(ts):  # decoded token strings; line breaks shown as ⏎
        return "".join(ts).replace("\n", "⏎")
    return (clean(toks[max(0, t - window):t]) + "⟦" + clean([toks[t]]) + "⟧"
            + clean(toks[t + 1:t + 1 + window]))


def _bar(path, items, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar([str(i) for i, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_title(title)
    ax.set_xlabel("latent")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _link(np_id, i):
    return f"[{i}](https://www.neuronpedia.org/{np_id}/{i})" if np_id else str(i)


def write_report(run_dir: str, *, model=None, tokenizer=None, saes=None, planted=None,
                 top: int = 20, sae_paths: dict | None = None, lift_records=None,
                 context_records=None, n_interpret: int = 10) -> dict:
    """Writes ``report.md`` + PNGs into ``run_dir``; returns the rankings.

    ``model``/``tokenizer`` (for Δz on eval data) are loaded from the run's recorded base model
    when not given; ``sae_paths`` = ``{hook: path}`` for SAEs that moved since training;
    ``planted`` = ``{hook: [latents]}`` adds a recovery check (top-3 by the bias score, else
    |gain|) and marks those latents in every table. For the ``n_interpret`` top latents of the
    first ranking, ``lift_records = (records_a, records_b)`` adds each latent's activation
    lift (mean activation on a's completions over b's, e.g. a teacher's text over the base
    model's) and ``context_records`` its top-activating contexts.
    """
    from .training import load_adapter, load_run_saes

    trainables, conf = load_adapter(run_dir)
    saes = saes or load_run_saes(conf, paths=sae_paths)
    if model is None and conf.get("base_model"):
        from .models import load_model

        model, tokenizer = load_model(conf["base_model"])
    eval_path = os.path.join(run_dir, "eval.jsonl")
    records = []
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    metrics = {}
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json")) as f:
            metrics = json.load(f)

    def num(x):
        return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"

    lines = [f"# sae_sparse report: `{os.path.basename(os.path.abspath(run_dir))}`", ""]
    if metrics:
        what = {"kl": " (KL to the teacher per completion token)",
                "ce": " (cross-entropy per loss token)"}.get(metrics.get("loss"), "")
        ev = (f"eval loss{what}: base model {num(metrics.get('base_eval_loss'))} → edited "
              f"{num(metrics.get('final_eval_loss'))}" if metrics.get("n_eval")
              else f"no eval split{what.replace(' (', ' (loss: ')}")
        lines += [f"- {ev}; final train loss {num(metrics.get('final_train_loss'))} "
                  f"({metrics.get('n_train')} train / {metrics.get('n_eval')} eval records)"]
    lines += [f"- mode: {conf['mode']}, edit positions: {conf['edit_positions']}"
              + (f" less each sequence's first {conf['skip_first']}" if conf.get("skip_first")
                 else "") + f", baseline: {conf.get('baseline')}"]
    for h, o in (metrics.get("overflow") or {}).items():
        if o.get("architecture") == "topk":
            lines.append(f"- `{h}`: a TopK SAE, k = {o['k']} active latents on every token")
        else:
            rate = 100 * o["rate"]
            flag = " **(above 1%: raise --k)**" if rate > 1 else ""
            lines.append(f"- `{h}`: {o['overflow_tokens']} of {o['tokens']} edited tokens "
                         f"({rate:.2f}%) had more than k = {o['k']} active latents; the "
                         f"weakest were dropped{flag}")
    lines.append("")
    hist = metrics.get("history") or {}
    if hist.get("step") or hist.get("eval_step"):
        _loss_curve(os.path.join(run_dir, "loss_curve.png"), hist,
                    metrics.get("base_eval_loss"))
        lines += ["## Loss curve", "", "![loss curve](loss_curve.png)", ""]
    result = {"hooks": {}}
    for h, t in trainables.items():
        sae = saes[h]
        np_id = conf["hooks"][h].get("sae", {}).get("neuronpedia_id")
        marked = set((planted or {}).get(h, []))
        safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in h)

        def name_of(i):
            link = _link(np_id, i)
            return f"**{link}** (planted)" if i in marked else link

        lines += [f"## `{h}` (SAE: {_md(conf['hooks'][h]['sae'].get('path'))}, "
                  f"S={sae.d_sae})", ""]
        res = {}
        signed = {}
        if isinstance(t, ResidualLoRA):
            AB = (t.A @ t.B).detach().float()
            writes = (sae.W_enc.detach().float() @ AB.T).norm(dim=1)
            reads = (sae.W_dec.detach().float() @ t.A.detach().float()).norm(dim=1)
            scores = {"LoRA writes ‖W_enc[i]·(AB)ᵀ‖": writes, "LoRA reads ‖W_dec[i]·A‖": reads}
        else:
            scores = latent_scores(t, sae)
            p = t.edit_params()
            signed = {k: p[k].detach().float() for k in ("gain", "bias") if k in p}
            if model is not None and records:
                dz = mean_abs_delta_z(model, tokenizer, sae, t, h, records,
                                      skip_first=conf.get("skip_first", 0))
                if dz is not None:
                    scores["mean |Δz| (eval)"] = dz
        for name, sc in scores.items():
            ranked = _top(sc, top)
            res[name] = ranked
            png = f"{safe}_{SCORES.get(name, 'score')}.png"
            _bar(os.path.join(run_dir, png), ranked, f"{h}: top latents by {name}")
            cols = [k for k in ("gain", "bias") if k in signed]
            lines += [f"### Top latents by {_md(name)}", "", f"![{SCORES.get(name)}]({png})", "",
                      "| rank | latent | score |" + "".join(f" {c} |" for c in cols),
                      "|---|---|---|" + "---|" * len(cols)]
            for r, (i, v) in enumerate(ranked[:10]):
                extra = "".join(f" {float(signed[c][i]):+.4g} |" for c in cols)
                lines.append(f"| {r + 1} | {name_of(i)} | {v:.4g} |{extra}")
            lines.append("")
        if isinstance(t, LatentAdapter) and t.W_in is not None:
            dn = sae.W_dec.detach().float().norm(dim=1)
            p = t.edit_params()
            W_in, W_out = p["W_in"].detach().float(), p["W_out"].detach().float()
            strength = (W_out.abs() * dn).sum(1)
            lines += ["### FFNN hidden units (by write strength)", "",
                      "| unit | write strength | reads (top \\|W_in\\|) "
                      "| writes (top \\|W_out\\|·‖W_dec‖, signed) |",
                      "|---|---|---|---|"]
            units = []
            for u in torch.argsort(strength, descending=True).tolist():
                rd = _top(W_in[:, u].abs(), 5)
                wr = _top(W_out[u].abs() * dn, 5)
                units.append({"unit": u, "reads": rd, "writes": wr})
                lines.append(f"| {u} | {float(strength[u]):.3g} | "
                             + ", ".join(name_of(i) for i, _ in rd) + " | "
                             + ", ".join(f"{name_of(i)} ({float(W_out[u, i]):+.3g})"
                                         for i, _ in wr) + " |")
            res["ffn_units"] = units
            lines.append("")
        readouts = {}
        if model is not None and isinstance(t, LatentAdapter) and (records or lift_records):
            # a multi-layer run's other edits on too: at a later layer, its effect so far
            upstream = {g: (saes[g], u) if isinstance(u, LatentAdapter) else u
                        for g, u in trainables.items() if g != h}
            full, flips = edit_readout(model, tokenizer, sae, t, h, records or lift_records[0],
                                       mode=conf["mode"], switched=True,
                                       skip_first=conf.get("skip_first", 0), upstream=upstream)
            if full is not None:
                readouts = {READOUT: full, SWITCHED: flips}
                target = target_readout(model, tokenizer, sae, h, records or lift_records[0])
                if target is not None:
                    readouts[TARGET] = target
                    res["target_cosine"] = float(torch.nn.functional.cosine_similarity(
                        full.double(), target.double(), dim=0))
        where = f"the {'eval split' if records else 'first lift set'}'s completion tokens"
        about = {READOUT: "The edit as the SAE reads it: re-encoding the hooked module's edited "
                          "output and subtracting the code of its unedited output, per latent, "
                          f"averaged over {where} (signed: + the edit turns the latent on)."
                          + (" The run's edits at the other hooks are on too, so at a later "
                             "layer this is the whole run's effect so far, as this layer's SAE "
                             "reads it." if len(trainables) > 1 else ""),
                 SWITCHED: "The same difference counted only on the tokens where the edit "
                           "switches the latent: active in one of the two codes and not the "
                           "other (latents that are already active and only grow or shrink, "
                           "such as frequent ones, are left out).",
                 TARGET: "Not the edit: what it was trained to reproduce. The code of the "
                         "unedited model's output after the teacher's prompt minus the code "
                         "after the student's, on the same completion tokens, averaged over "
                         f"{where}; an edit that made the student's residual here the "
                         "teacher's would have exactly this readout. Cosine with the edit's "
                         f"readout: {res.get('target_cosine', float('nan')):.3f}."}
        for name, readout in readouts.items():
            ranked = _top(readout.abs(), top)
            res[name] = ranked
            res[SCORES[name]] = [(i, float(readout[i])) for i, _ in ranked]
            png = f"{safe}_{SCORES[name]}.png"
            _bar(os.path.join(run_dir, png), [(i, float(readout[i])) for i, _ in ranked],
                 f"{h}: top latents by {name}")
            edit = readouts[READOUT] if name == TARGET else None  # side by side
            lines += [f"### Top latents by {_md(name)}", "", about[name], "",
                      f"![{SCORES[name]}]({png})", "", "| rank | latent | mean Δ code |"
                      + (" the edit's |" if edit is not None else ""),
                      "|---|---|---|" + ("---|" if edit is not None else "")]
            lines += [f"| {r + 1} | {name_of(i)} | {float(readout[i]):+.4g} |"
                      + (f" {float(edit[i]):+.4g} |" if edit is not None else "")
                      for r, (i, _) in enumerate(ranked[:10])]
            lines.append("")
        first = next((k for k in (READOUT, "|bias|·‖W_dec‖", "|gain|", "mean |Δz| (eval)")
                      if k in res), None)
        interpreted = list(readouts) if readouts else [first] if first else []
        if model is not None and interpreted and isinstance(t, LatentAdapter) and (
                lift_records or context_records):
            res["interpret"] = {}
            # one pass over each record set for the union of the rankings' top latents
            union = sorted({i for name in interpreted for i, _ in res[name][:n_interpret]})
            lift_of = ({x["latent"]: x for x in activation_lift(
                model, tokenizer, sae, h, union, *lift_records)} if lift_records else {})
            ctx_of = (top_contexts(model, tokenizer, sae, h, union, context_records)
                      if context_records else {})
        for name in (interpreted if "interpret" in res else []):
            lats = [i for i, _ in res[name][:n_interpret]]
            out = res["interpret"][SCORES[name]] = {"ranking": name, "latents": lats}
            lines += [f"### What the top {len(lats)} latents by {_md(name)} are", ""]
            if lift_records:
                lift = [dict(lift_of[i]) for i in lats]
                sign = {**readouts, "|bias|·‖W_dec‖": signed.get("bias"),
                        "|gain|": signed.get("gain")}.get(name)
                for x in lift:
                    x["edit"] = float(sign[x["latent"]]) if sign is not None else None
                    x["lift_edit_dir"] = directional_lift(x)
                up = [x["lift"] for x in lift if (x["edit"] or 0) > 0]
                out.update(lift=lift, mean_lift=_finite_mean([x["lift"] for x in lift]),
                           mean_lift_edit_dir=_finite_mean([x["lift_edit_dir"] for x in lift]),
                           mean_lift_raised=_finite_mean(up) if up else None)
                lines += [f"Activation lift = mean activation per token on the first set's "
                          f"completions (a, e.g. the teacher's) over the second's (b): mean "
                          f"{out['mean_lift']:.2f}×. In the edit's direction (a/b for a latent "
                          f"the edit raises, b/a for one it lowers): mean "
                          f"{out['mean_lift_edit_dir']:.2f}×; "
                          + (f"over the {len(up)} it raises: mean "
                             f"{out['mean_lift_raised']:.2f}×" if up else "it raises none")
                          + " (∞ left out of the means).", "",
                          "| latent | edit | mean act. (a) | mean act. (b) | lift a/b "
                          "| lift in the edit's direction |",
                          "|---|---|---|---|---|---|"]
                lines += [f"| {name_of(x['latent'])} | "
                          + (f"{x['edit']:+.3g}" if x["edit"] is not None else "")
                          + f" | {x['mean_a']:.4g} | {x['mean_b']:.4g} | {x['lift']:.2f}× | "
                          f"{x['lift_edit_dir']:.2f}× |" for x in lift]
                lines.append("")
            if context_records:
                ctx = {i: ctx_of[i] for i in lats}
                out["contexts"] = ctx
                lines += ["Top-activating contexts (the token in ⟦ ⟧):", "",
                          "| latent | activation | context |", "|---|---|---|"]
                for lat, rows in ctx.items():
                    for r in rows[:3]:
                        lines.append(f"| {name_of(lat)} | {r['activation']:.3g} | "
                                     f"{_md(r['context'])} |")
                lines.append("")
            if name == interpreted[0]:  # the first ranking's, at the top level too
                res.update({k: v for k, v in out.items() if k not in ("ranking", "latents")})
        if planted and h in planted:
            key = next((k for k in ("|bias|·‖W_dec‖", "|gain|") if k in res), None)
            want = sorted(planted[h])
            got = [i for i, _ in res[key][:len(want)]] if key else []
            ok = sorted(got) == want
            res["planted"] = {"latents": want, "top": got, "score": key, "recovered": ok}
            lines += [f"### Planted edit: {'RECOVERED' if ok else 'NOT recovered'}", "",
                      f"planted latents {want}; top {len(want)} by {_md(key)}: {got}", ""]
        result["hooks"][h] = res
    with open(os.path.join(run_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
