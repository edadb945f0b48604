"""The offline demo: a tiny causal LM and TopK SAE shipped in ``sae_sparse/demo_assets``, a
synthetic task with a *planted* latent edit, training, and the report.

``sae-sparse train`` with no arguments runs :func:`run_demo`. The assets are produced by
``python scripts/make_demo_assets.py`` (deterministic; anyone can rerun it):
1. a word-level tokenizer over a 40-word vocabulary;
2. a 2-layer GPT-2 (d=32) trained on a random sparse bigram language;
3. a TopK SAE (S=128, k=4) trained through this package's own op on the output of
   ``transformer.h.1`` (the last block, so a residual edit there is identifiable from the
   next-token distribution: the vocabulary is wider than the residual), saved in SAELens format;
4. ``planted.json``: three latents and the bias that, added in delta mode, defines the
   "teacher" whose samples are the training data.
The student trains an adapter (gain + bias, L1) on the teacher's samples; the report then ranks
latents by |bias|·‖W_dec‖ and checks that the planted three come first.
"""
from __future__ import annotations

import json
import os
import time

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_assets")
HOOK = "transformer.h.1"
WORDS = ("the a cat dog bird fish tree house river stone sun moon star cloud rain snow wind "
         "fire red blue green old new big small fast slow runs sees eats makes finds sings "
         "jumps sleeps over under near far and then").split()


def word_tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


def bigram_chain(n_words, seed=0, fanout=4):
    """The demo language's transition matrix: the same for the same seed, whatever the global
    RNG's state (the Dirichlet draws come from the global RNG, so it is forked and seeded;
    ``scripts/make_demo_assets.py`` trained the shipped model on ``bigram_chain(40, 0)``)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.zeros(n_words, n_words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for w in range(n_words):
            nxt = torch.randperm(n_words, generator=g)[:fanout]
            P[w, nxt] = torch.distributions.Dirichlet(torch.ones(fanout)).sample()
    return P


def sample_chain(P, n, length, offset, g):
    w = torch.randint(0, P.shape[0], (n,), generator=g)
    out = [w]
    for _ in range(length - 1):
        w = torch.multinomial(P[w], 1, generator=g).squeeze(1)
        out.append(w)
    return torch.stack(out, 1) + offset


def load_assets():
    """-> (model, tokenizer, sae, planted dict) from the shipped files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import load_sae

    model = AutoModelForCausalLM.from_pretrained(os.path.join(ASSETS, "model")).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "model"))
    sae = load_sae(os.path.join(ASSETS, "sae"))
    with open(os.path.join(ASSETS, "planted.json")) as f:
        planted = json.load(f)
    return model, tok, sae, planted


def teacher_adapter(sae, planted):
    from .modules import LatentAdapter

    ad = LatentAdapter(sae.d_sae, gain=False, bias=True, ffn=False)
    with torch.no_grad():
        for i, b in zip(planted["latents"], planted["bias"]):
            ad.bias[i] = b
    return ad


@torch.no_grad()
def make_data(path, n=1500, seed=0, prompt_len=2, completion_len=14):
    """Samples prompt/completion records from the teacher (model + planted edit)."""
    from .hooks import attach
    from .ops import cached_folds

    model, tok, sae, planted = load_assets()
    edits = attach(model, {planted["hook"]: (sae, teacher_adapter(sae, planted))})
    g = torch.Generator().manual_seed(seed)
    offset = len(tok.convert_tokens_to_ids(["<pad>", "<unk>", "<eos>"]))
    P = bigram_chain(len(WORDS))
    try:
        ids = sample_chain(P, n, prompt_len, offset, g)
        with cached_folds():  # the teacher's c = bias W_dec, folded once
            for _ in range(completion_len):
                logits = model(input_ids=ids).logits[:, -1].float()
                logits[:, :offset] = -float("inf")
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
                ids = torch.cat([ids, nxt], 1)
    finally:
        edits.remove()
    with open(path, "w") as f:
        for row in ids.tolist():
            words = tok.convert_ids_to_tokens(row)
            f.write(json.dumps({"prompt": " ".join(words[:prompt_len]),
                                "completion": " " + " ".join(words[prompt_len:])}) + "\n")
    return planted


def run_demo(out_dir="sae_sparse_demo_run", *, seed=0, steps=600, progress=True, log=print):
    """Runs the whole demo; returns the report dict (with the planted-recovery verdict)."""
    from .io import content_hash
    from .report import write_report
    from .training import TrainConfig, train_adapter

    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, "data.jsonl")
    planted = make_data(data, seed=seed)
    log(f"[demo] wrote {data}: teacher samples with a planted bias on latents "
        f"{planted['latents']} of the SAE at {planted['hook']}")
    model, tok, sae, _ = load_assets()
    sae_dir = os.path.join(ASSETS, "sae")
    src = {planted["hook"]: {"format": "saelens", "path": sae_dir, "sha256": content_hash(sae_dir),
                             "hook_name": planted["hook"]}}
    cfg = TrainConfig(edit="gain,bias", steps=steps, batch_size=16, lr=0.05, l1=3e-3,
                      eval_frac=0.1, eval_every=200, checkpoint_every=200, seed=seed)
    metrics = train_adapter(model, tok, {planted["hook"]: sae}, data, out_dir, cfg,
                            sae_sources=src, model_source=os.path.join(ASSETS, "model"),
                            progress=progress, overwrite=True, log=log)
    rep = write_report(out_dir, model=model, tokenizer=tok, saes={planted["hook"]: sae},
                       planted={planted["hook"]: planted["latents"]})
    verdict = rep["hooks"][planted["hook"]]["planted"]
    log(f"[demo] eval loss {metrics['base_eval_loss']:.4f} (unedited) -> "
        f"{metrics['final_eval_loss']:.4f} (edited)")
    log(f"[demo] planted latents {verdict['latents']}, top-3 by {verdict['score']}: "
        f"{verdict['top']} -> {'RECOVERED' if verdict['recovered'] else 'NOT recovered'}")
    log(f"[demo] report: {os.path.join(out_dir, 'report.md')} ({time.time() - t0:.0f} s)")
    return rep
