"""``compute_report``: a run's report as data (rankings, readouts, lift, contexts, the planted
check), a JSON-ready dict that tests read and :mod:`.render` turns into markdown and plots.

What it reads when the caller gives nothing else (``sae-sparse report RUN`` alone):
* the run's eval split (``eval.jsonl``) for Δz and the edit's readout;
* for each top latent's *lift*, the target text against the base model's own: the records'
  completions (a distillation's teacher answers) over the unedited model's greedy answers to
  the same prompts, generated once and kept in ``RUN/student_answers.jsonl``;
* for its *contexts*, the run's training text (the first ``CONTEXT_RECORDS`` records of
  ``train.jsonl``, itself a seeded shuffle).
Records given explicitly (``lift_records``, ``context_records``) win.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..baselines import ResidualLoRA
from ..modules import LatentAdapter
from .faithfulness import NS
from .measure import (_finite_mean, _top, activation_lift, directional_lift, edit_readout,
                      latent_scores, mean_abs_delta_z, target_readout, top_contexts)

READOUT = "|mean Δ SAE code| of the edited output"
SWITCHED = "|mean Δ SAE code| where the edit switches the latent on or off"
TARGET = "|mean Δ SAE code| of the teacher's prompt (the distillation's target)"
ATTRIBUTION = "loss reduction it carries (integrated gradients)"
WEIGHT_SCORES = ("|gain|", "|bias|·‖W_dec‖", "LoRA writes ‖W_enc[i]·(AB)ᵀ‖",
                 "LoRA reads ‖W_dec[i]·A‖")
# ranking name -> an ASCII slug (file names, report.json keys of signed values)
SCORES = {ATTRIBUTION: "attribution", "|gain|": "gain", "|bias|·‖W_dec‖": "bias",
          "mean |Δz| (eval)": "delta_z",
          "LoRA writes ‖W_enc[i]·(AB)ᵀ‖": "lora_writes", "LoRA reads ‖W_dec[i]·A‖": "lora_reads",
          READOUT: "readout", SWITCHED: "switched", TARGET: "target"}
STUDENT_ANSWERS = "student_answers.jsonl"
CONTEXT_RECORDS = 128  # the training records searched for contexts by default
ATTRIBUTION_RECORDS = 64  # the training records the attribution ranking is measured on
ATTRIBUTION_SCOPE = "writes"  # its gates: each latent's gain, bias and W_out column


def read_jsonl(path) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class _Inputs:
    """What every part of the report reads."""
    run_dir: str
    conf: dict
    trainables: dict
    saes: dict
    model: object
    tokenizer: object
    records: list  # the eval split
    lift_records: tuple | None
    context_records: list | None
    planted: dict
    top: int
    n_interpret: int
    orders: dict  # hook -> the ranking faithfulness measures (attribution, else readout)
    attribution: dict | None = None  # edit_attribution's result


def compute_report(run_dir: str, *, model=None, tokenizer=None, saes=None, planted=None,
                   top: int = 20, sae_paths: dict | None = None, lift_records=None,
                   context_records=None, n_interpret: int = 10, standalone: bool = True,
                   answer_tokens: int = 64, faithful: bool = True) -> dict:
    """The report of the run in ``run_dir`` as a dict (see :func:`..write_report` for the
    arguments). ``standalone``: fill missing lift / context records from the run's own data
    (module docstring); ``answer_tokens`` caps the base model's generated answers;
    ``faithful``: measure how much of the edit the readout ranking's top latents carry
    (:mod:`.faithfulness`; a dozen evaluations of the eval split)."""
    from ..training.adapters import load_adapter, load_run_saes

    trainables, conf = load_adapter(run_dir)
    saes = saes or load_run_saes(conf, paths=sae_paths)
    if model is None and conf.get("base_model"):
        from ..models import load_model

        model, tokenizer = load_model(conf["base_model"])
    records = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    sources = {"lift": "given" if lift_records else None,
               "contexts": "given" if context_records else None}
    if standalone and model is not None:
        if lift_records is None:
            lift_records = default_lift_records(run_dir, model, tokenizer, records,
                                                max_new_tokens=answer_tokens)
            sources["lift"] = "run" if lift_records else None
        if context_records is None:  # a sample of the training text (one forward each)
            context_records = (read_jsonl(os.path.join(run_dir, "train.jsonl"))
                               or records)[:CONTEXT_RECORDS] or None
            sources["contexts"] = "run" if context_records else None
    inp = _Inputs(run_dir, conf, trainables, saes, model, tokenizer, records, lift_records,
                  context_records, planted or {}, top, n_interpret, {})
    metrics = _read_metrics(run_dir)
    loss = metrics.get("loss") or conf.get("train_config", {}).get("loss", "ce")
    if faithful and model is not None:
        inp.attribution = _attribution(inp, loss)
    data = {"run": os.path.basename(os.path.abspath(run_dir)),
            "metrics": metrics,
            "edit": {k: conf.get(k) for k in ("mode", "edit_positions", "skip_first",
                                               "baseline")},
            "sources": sources, "n_hooks": len(trainables),
            "hooks": {h: _hook_report(inp, h, t) for h, t in trainables.items()}}
    if inp.attribution is not None:
        a = inp.attribution
        data["attribution"] = {k: a[k] for k in ("loss_none", "loss_full", "completeness",
                                                  "n_tokens", "steps", "scope", "records",
                                                  "n_records")}
    if faithful and inp.orders and len(inp.orders) == len(trainables):
        data["faithfulness"] = _faithfulness(inp, loss)
    return data


def _attribution(inp, loss):
    """:func:`.faithfulness.edit_attribution` of every LatentAdapter edit on the first
    ``ATTRIBUTION_RECORDS`` training records (else the eval split), or None."""
    from .faithfulness import ATTRIBUTION_STEPS, edit_attribution

    ads = {h: t for h, t in inp.trainables.items() if isinstance(t, LatentAdapter)}
    if not ads or len(ads) != len(inp.trainables):
        return None
    train = read_jsonl(os.path.join(inp.run_dir, "train.jsonl"))
    recs, where = (train, "training records") if train else (inp.records, "eval split")
    if loss == "kl":
        recs = [r for r in recs if "teacher_prompt" in r]
    recs = recs[:ATTRIBUTION_RECORDS]
    if not recs:
        return None
    tc = inp.conf.get("train_config", {})
    out = edit_attribution(inp.model, inp.tokenizer, inp.saes, ads, recs, loss=loss,
                           steps=ATTRIBUTION_STEPS, scope=ATTRIBUTION_SCOPE,
                           mode=inp.conf["mode"],
                           skip_first=inp.conf.get("skip_first") or 0,
                           max_len=tc.get("max_len", 256), batch_size=tc.get("batch_size", 8))
    return {**out, "records": f"first {len(recs)} {where}", "n_records": len(recs)}


def _faithfulness(inp, loss):
    """:func:`.faithfulness.faithfulness` of the attribution ranking (else the readout
    ranking) on the eval split (else the lift's first set)."""
    from .faithfulness import faithfulness

    recs = inp.records or (inp.lift_records[0] if inp.lift_records else [])
    if loss == "kl":
        recs = [r for r in recs if "teacher_prompt" in r]
    if not recs:
        return None
    tc = inp.conf.get("train_config", {})
    out = faithfulness(inp.model, inp.tokenizer, inp.saes, inp.trainables, recs, inp.orders,
                       loss=loss, mode=inp.conf["mode"],
                       skip_first=inp.conf.get("skip_first") or 0,
                       max_len=tc.get("max_len", 256), batch_size=tc.get("batch_size", 8))
    ranking = ATTRIBUTION if inp.attribution is not None else READOUT
    return {**out, "ranking": ranking, "n_records": len(recs),
            "records": "eval split" if inp.records else "first lift set"}


def _read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def default_lift_records(run_dir, model, tokenizer, records, *, max_new_tokens=64,
                         max_records=32):
    """``(target, base)``: up to ``max_records`` prompt/completion records of the run (eval
    split, else training split) and the same prompts answered greedily by the unedited
    model, generated once into ``RUN/student_answers.jsonl``. None when the run has no
    prompt/completion records."""
    from ..generate import generate_answers

    pool = records or read_jsonl(os.path.join(run_dir, "train.jsonl"))
    from ..generate import context_length

    room = context_length(model) - 8
    target = [r for r in pool if "prompt" in r and "completion" in r and len(
        tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) < room][:max_records]
    if not target:
        return None
    cache = os.path.join(run_dir, STUDENT_ANSWERS)
    have = {r["prompt"]: r for r in read_jsonl(cache)}
    todo = [r["prompt"] for r in target if r["prompt"] not in have]
    if todo:
        answers = generate_answers(model, tokenizer, todo, max_new_tokens=max_new_tokens)
        with open(cache, "a", encoding="utf-8") as f:
            for p, a in zip(todo, answers):
                have[p] = {"prompt": p, "completion": a}
                f.write(json.dumps(have[p]) + "\n")
    return target, [have[r["prompt"]] for r in target]


def _hook_report(inp: _Inputs, h: str, t) -> dict:
    sae = inp.saes[h]
    entry = inp.conf["hooks"][h]
    res = {"sae": entry["sae"].get("path"), "d_sae": sae.d_sae,
           "neuronpedia_id": entry.get("sae", {}).get("neuronpedia_id"),
           "planted_latents": sorted(inp.planted.get(h, []))}
    scores, signed = _weight_scores(inp, h, t, sae)
    for name, sc in scores.items():
        res[name] = _top(sc, inp.top)
    shown = {i for name in scores for i, _ in res[name][:10]}
    res["edit_values"] = {str(i): {k: float(v[i]) for k, v in signed.items()}
                          for i in sorted(shown)} if signed else {}
    if isinstance(t, LatentAdapter) and t.W_in is not None:
        res["ffn_units"] = ffn_units(t, sae)
    readouts = _readouts(inp, h, t, sae, res)
    for name, r in readouts.items():
        res[name] = _top(r.abs(), inp.top)
        res[SCORES[name]] = [(i, float(r[i])) for i, _ in res[name]]
    if inp.attribution is not None and h in inp.attribution["attribution"]:
        carried = -inp.attribution["attribution"][h]  # + lowers the loss
        res[ATTRIBUTION] = _top(carried, inp.top)
        inp.orders[h] = torch.argsort(carried, descending=True, stable=True)[:max(NS)].tolist()
    if TARGET in readouts:
        res["edit_at_target"] = {str(i): float(readouts[READOUT][i]) for i, _ in res[TARGET]}
    _interpret(inp, h, t, sae, res, readouts, signed)
    if h in inp.planted:
        res["planted"] = planted_check(res, inp.planted[h])
    return res


def _weight_scores(inp, h, t, sae):
    """-> (rankings from the trained weights (and Δz on eval), their signed gain/bias)."""
    if isinstance(t, ResidualLoRA):
        AB = (t.A @ t.B).detach().float()
        writes = (sae.W_enc.detach().float() @ AB.T).norm(dim=1)
        reads = (sae.W_dec.detach().float() @ t.A.detach().float()).norm(dim=1)
        return {WEIGHT_SCORES[2]: writes, WEIGHT_SCORES[3]: reads}, {}
    scores = latent_scores(t, sae)
    p = t.edit_params()
    signed = {k: p[k].detach().float() for k in ("gain", "bias") if k in p}
    if inp.model is not None and inp.records:
        dz = mean_abs_delta_z(inp.model, inp.tokenizer, sae, t, h, inp.records,
                              skip_first=inp.conf.get("skip_first", 0))
        if dz is not None:
            scores["mean |Δz| (eval)"] = dz
    return scores, signed


def ffn_units(t: LatentAdapter, sae) -> list:
    """Each FFN hidden unit, strongest writer first: the latents it reads (top |W_in|) and
    writes (top |W_out|·‖W_dec‖, with the signed W_out)."""
    dn = sae.W_dec.detach().float().norm(dim=1)
    p = t.edit_params()
    W_in, W_out = p["W_in"].detach().float(), p["W_out"].detach().float()
    strength = (W_out.abs() * dn).sum(1)
    return [{"unit": u, "strength": float(strength[u]), "reads": _top(W_in[:, u].abs(), 5),
             "writes": [(i, s, float(W_out[u, i])) for i, s in _top(W_out[u].abs() * dn, 5)]}
            for u in torch.argsort(strength, descending=True).tolist()]


def _readouts(inp, h, t, sae, res) -> dict:
    """The edit's readout, its switched part and the distillation's target, as the SAE at
    ``h`` reads them, with the run's other edits on (a later layer: the effect so far)."""
    source = inp.records or (inp.lift_records[0] if inp.lift_records else None)
    if inp.model is None or not isinstance(t, LatentAdapter) or not source:
        return {}
    res["readout_source"] = "eval split" if inp.records else "first lift set"
    upstream = {g: (inp.saes[g], u) if isinstance(u, LatentAdapter) else u
                for g, u in inp.trainables.items() if g != h}
    full, flips = edit_readout(inp.model, inp.tokenizer, sae, t, h, source,
                               mode=inp.conf["mode"], switched=True,
                               skip_first=inp.conf.get("skip_first", 0), upstream=upstream)
    if full is None:
        return {}
    inp.orders[h] = torch.argsort(full.abs(), descending=True)[:max(NS)].tolist()
    out = {READOUT: full, SWITCHED: flips}
    target = target_readout(inp.model, inp.tokenizer, sae, h, source)
    if target is not None:
        out[TARGET] = target
        res["target_cosine"] = float(torch.nn.functional.cosine_similarity(
            full.double(), target.double(), dim=0))
    return out


def _interpret(inp, h, t, sae, res, readouts, signed):
    """For the top ``n_interpret`` latents of each readout ranking (or of the first weight
    ranking when there is none): activation lift, in the edit's direction, and contexts."""
    first = next((k for k in (READOUT, "|bias|·‖W_dec‖", "|gain|", "mean |Δz| (eval)")
                  if k in res), None)
    names = list(readouts) if readouts else [first] if first else []
    if ATTRIBUTION in res:  # the measured ranking first: its lift goes to the top level
        names = [ATTRIBUTION] + names
    if inp.model is None or not names or not isinstance(t, LatentAdapter) or not (
            inp.lift_records or inp.context_records):
        return
    union = sorted({i for name in names for i, _ in res[name][:inp.n_interpret]})
    lift_of = ({x["latent"]: x for x in activation_lift(
        inp.model, inp.tokenizer, sae, h, union, *inp.lift_records)}
        if inp.lift_records else {})
    ctx_of = (top_contexts(inp.model, inp.tokenizer, sae, h, union, inp.context_records,
                           skip_first=max(1, inp.conf.get("skip_first") or 0))
              if inp.context_records else {})
    res["interpret"] = {}
    for name in names:
        lats = [i for i, _ in res[name][:inp.n_interpret]]
        out = res["interpret"][SCORES[name]] = {"ranking": name, "latents": lats}
        if lift_of:
            sign = {**readouts, "|bias|·‖W_dec‖": signed.get("bias"),
                    "|gain|": signed.get("gain"),
                    ATTRIBUTION: readouts.get(READOUT)}.get(name)
            out.update(lift_summary([dict(lift_of[i]) for i in lats], sign))
        if ctx_of:
            out["contexts"] = {i: ctx_of[i] for i in lats}
        if name == names[0]:  # the first ranking's, at the top level too
            res.update({k: v for k, v in out.items() if k not in ("ranking", "latents")})


AGAINST = 0.8  # a lift in the edit's direction below this: the target uses the latent
# at least 1.25x less in the direction the edit moves it


def lift_summary(lift: list, sign) -> dict:
    """Each latent's lift with the edit's sign, its lift in the edit's direction and whether
    the edit moves it against the target (``against``: that lift below ``AGAINST``); their
    means."""
    for x in lift:
        x["edit"] = float(sign[x["latent"]]) if sign is not None else None
        x["lift_edit_dir"] = directional_lift(x)
        x["against"] = x["edit"] is not None and x["lift_edit_dir"] < AGAINST
    up = [x["lift"] for x in lift if (x["edit"] or 0) > 0]
    return {"lift": lift, "mean_lift": _finite_mean([x["lift"] for x in lift]),
            "mean_lift_edit_dir": _finite_mean([x["lift_edit_dir"] for x in lift]),
            "mean_lift_raised": _finite_mean(up) if up else None,
            "n_against": sum(x["against"] for x in lift)}


def planted_check(res: dict, planted: list) -> dict:
    """Are the planted latents the top ones by the bias score (else |gain|)?"""
    key = next((k for k in ("|bias|·‖W_dec‖", "|gain|") if k in res), None)
    want = sorted(planted)
    got = [i for i, _ in res[key][:len(want)]] if key else []
    return {"latents": want, "top": got, "score": key, "recovered": sorted(got) == want}
