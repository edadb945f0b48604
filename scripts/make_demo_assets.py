"""Builds sae_sparse/demo_assets: tiny LM, word tokenizer, TopK SAE (SAELens format), planted edit.

    python scripts/make_demo_assets.py            # deterministic; takes about a minute on CPU
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sae_sparse as ss  # noqa: E402
from sae_sparse.demo import ASSETS, HOOK, WORDS, bigram_chain, sample_chain, word_tokenizer  # noqa: E402


D, S, K = 32, 128, 4  # residual width (< vocabulary, so a residual edit is identifiable), SAE


def main():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tok = word_tokenizer()
    offset = 3
    P = bigram_chain(len(WORDS))
    cfg = GPT2Config(vocab_size=len(WORDS) + offset, n_embd=D, n_layer=2, n_head=4,
                     n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     pad_token_id=0, eos_token_id=2, bos_token_id=2)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(400):
        ids = sample_chain(P, 32, 24, offset, g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"LM loss after training: {loss.item():.3f}")
    model.eval()

    acts = []
    h = model.get_submodule(HOOK).register_forward_hook(
        lambda m, a, o: acts.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        for _ in range(20):
            model(input_ids=sample_chain(P, 64, 24, offset, g))
    h.remove()
    x = torch.cat(acts).reshape(-1, D)
    sae = ss.SAE.random(D, S, K, b_pre=True, generator=g)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    sopt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    for step in range(600):
        xb = x[torch.randint(0, x.shape[0], (512,), generator=g)]
        loss = (sae(xb) - xb).pow(2).sum(-1).mean() / (xb - xb.mean(0)).pow(2).sum(-1).mean()
        sopt.zero_grad()
        loss.backward()
        sopt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    print(f"SAE fraction of variance unexplained: {loss.item():.3f}")

    with torch.no_grad():
        v, i = sae.encode(x)
    freq = torch.zeros(S).index_add_(0, i.reshape(-1), (v.reshape(-1) > 0).float()) / x.shape[0]
    alive = torch.nonzero(freq > 0.01).squeeze(1)
    pick = alive[torch.randperm(alive.numel(), generator=g)[:3]].sort().values
    scale = float(x.norm(dim=1).mean())
    planted = {"hook": HOOK, "latents": pick.tolist(), "bias": [0.5 * scale] * 3,
               "note": "teacher = model + delta-mode bias on these latents"}
    print("planted", planted)

    os.makedirs(ASSETS, exist_ok=True)
    model.save_pretrained(os.path.join(ASSETS, "model"))
    tok.save_pretrained(os.path.join(ASSETS, "model"))
    ss.save_saelens(sae, os.path.join(ASSETS, "sae"), hook_name=HOOK)
    with open(os.path.join(ASSETS, "planted.json"), "w") as f:
        json.dump(planted, f, indent=2)


if __name__ == "__main__":
    main()
