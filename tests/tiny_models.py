"""Tiny Hugging Face causal LMs built and saved by the tests themselves (no downloads)."""
from __future__ import annotations

import torch


def tiny_gpt2(vocab=50, d=32, layers=2, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab=50, d=32, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def saved_tiny_gpt2(path, **kw):
    """A tiny GPT-2 over the demo's word tokenizer, both saved in ``path`` (a model directory
    the CLI takes); -> (model, tokenizer)."""
    from sae_sparse.demo import word_tokenizer

    tok = word_tokenizer()
    model = tiny_gpt2(vocab=len(tok), **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok
