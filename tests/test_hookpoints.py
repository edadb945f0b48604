"""Hook names: module paths, sparsify hookpoints and TransformerLens names, mapped to module
paths for GPT-2, GPT-NeoX, Llama / Mistral / Qwen and Gemma (models built from small configs
on the meta device: no weights), and the widths of their outputs."""
import pytest
import torch

pytest.importorskip("transformers")

import sae_sparse as ss  # noqa: E402
from sae_sparse.hookpoints import hook_width, meta_model, resolve_hook  # noqa: E402

from tiny_models import tiny_gpt2  # noqa: E402


def config(kind):
    import transformers as tf
    small = dict(vocab_size=64, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=32)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32)
    if kind == "neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **small)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config}[kind]
    extra = dict(head_dim=8) if kind.startswith("gemma") else {}
    return cls(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **small, **extra)


EXPECTED = {  # kind -> (resid_post 1, resid_pre 0, mlp_out 2, attn_out 0)
    "gpt2": ("transformer.h.1", "transformer.drop", "transformer.h.2.mlp",
             "transformer.h.0.attn"),
    "neox": ("gpt_neox.layers.1", "gpt_neox.embed_in", "gpt_neox.layers.2.mlp",
             "gpt_neox.layers.0.attention"),
    "llama": ("model.layers.1", "model.embed_tokens", "model.layers.2.mlp",
              "model.layers.0.self_attn"),
    "mistral": ("model.layers.1", "model.embed_tokens", "model.layers.2.mlp",
                "model.layers.0.self_attn"),
    "qwen2": ("model.layers.1", "model.embed_tokens", "model.layers.2.mlp",
              "model.layers.0.self_attn"),
    "gemma": ("model.layers.1", None, "model.layers.2.mlp", "model.layers.0.self_attn"),
    "gemma2": ("model.layers.1", None, "model.layers.2.post_feedforward_layernorm",
               "model.layers.0.post_attention_layernorm"),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_transformer_lens_names_map_to_modules(kind):
    m = meta_model(config(kind))
    post, pre0, mlp, attn = EXPECTED[kind]
    assert resolve_hook(m, "blocks.1.hook_resid_post") == post
    assert resolve_hook(m, "blocks.2.hook_resid_pre") == post  # block 1's output
    assert resolve_hook(m, "blocks.2.hook_mlp_out") == mlp
    assert resolve_hook(m, "blocks.0.hook_attn_out") == attn
    if pre0 is None:
        with pytest.raises(ValueError, match="scales its embeddings"):
            resolve_hook(m, "blocks.0.hook_resid_pre")
    else:
        assert resolve_hook(m, "blocks.0.hook_resid_pre") == pre0
    for name in ("blocks.1.hook_resid_post", "blocks.2.hook_mlp_out",
                 "blocks.0.hook_attn_out"):
        assert hook_width(m, resolve_hook(m, name)) == 32
    with pytest.raises(ValueError, match="has 3 blocks"):
        resolve_hook(m, "blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match="between attention and MLP"):
        resolve_hook(m, "blocks.1.hook_resid_mid")


def test_sparsify_hookpoints_and_close_matches():
    m = meta_model(config("llama"))
    assert resolve_hook(m, "layers.2") == "model.layers.2"  # relative to the base model
    assert resolve_hook(m, "model.layers.2.mlp") == "model.layers.2.mlp"
    with pytest.raises(ValueError, match="did you mean model.layers.2"):
        resolve_hook(m, "model.layer.2")
    assert hook_width(m, "model.layers.0.mlp.gate_proj") == 64


def test_tl_resid_pre_equals_the_embedding_output_on_gpt2():
    """blocks.0.hook_resid_pre on GPT-2 is transformer.drop's output: what block 0 reads."""
    model = tiny_gpt2(layers=2)
    seen = {}
    mod = model.get_submodule(resolve_hook(model, "blocks.0.hook_resid_pre"))
    h1 = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("hook", o))
    h2 = model.transformer.h[0].register_forward_pre_hook(
        lambda mod, a: seen.__setitem__("block0", a[0]))
    model(torch.randint(0, 50, (1, 5)))
    h1.remove()
    h2.remove()
    assert torch.equal(seen["hook"], seen["block0"])


def test_attach_and_train_at_a_transformer_lens_name(tmp_path):
    model = tiny_gpt2(layers=2)
    ids = torch.randint(0, 50, (2, 6))
    base = model(ids).logits
    sae = ss.SAE.random(32, 80, 4)
    ad = ss.LatentAdapter(80, 2)
    with torch.no_grad():
        ad.bias[5] = 2.0
    edits = ss.attach(model, {"blocks.1.hook_resid_post": (sae, ad)})
    by_name = model(ids).logits
    edits.remove()
    edits = ss.attach(model, {"transformer.h.1": (sae, ad)})
    by_path = model(ids).logits
    edits.remove()
    assert torch.equal(by_name, by_path) and (by_name - base).abs().max() > 1e-3
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_forward_to_stops_at_the_hook_and_reads_after_the_edit(make):
    """forward_to returns the module's output of a full forward (with an attached edit: the
    edited output) and runs nothing after the module: no later block, no LM head."""
    from sae_sparse.hookpoints import forward_to

    from tiny_models import tiny_llama
    model = (tiny_gpt2 if make == "gpt2" else tiny_llama)(layers=3, seed=1)
    path = "transformer.h.1" if make == "gpt2" else "model.layers.1"
    later = "transformer.h.2" if make == "gpt2" else "model.layers.2"
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(2, 7, dtype=torch.bool)
    attn[1, 5:] = False
    sae = ss.SAE.random(32, 40, 4, generator=torch.Generator().manual_seed(2))
    ad = ss.LatentAdapter(40, gain=False, ffn=False)
    with torch.no_grad():
        ad.bias.normal_(generator=torch.Generator().manual_seed(3))
    edits = ss.attach(model, {path: (sae, ad)})
    outputs = []
    for on in (False, True):
        full, calls = [], []
        h1 = model.get_submodule(path).register_forward_hook(
            lambda m, a, o: full.append(o[0] if isinstance(o, tuple) else o))
        h2 = model.get_submodule(later).register_forward_hook(lambda *a: calls.append(1))
        h3 = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(2))
        with torch.no_grad(), (edits.disabled() if not on else torch.enable_grad()):
            model(input_ids=ids, attention_mask=attn.long())
            assert calls == [1, 2]
            calls.clear()
            got = forward_to(model, path, ids, attn)
        assert calls == [], "forward_to ran the model past the hook"
        for h in (h1, h2, h3):
            h.remove()
        torch.testing.assert_close(got, full[0], rtol=0, atol=0)
        outputs.append(got)
    assert not torch.equal(*outputs), "the edit did not change the hooked output"
    model.add_module("unused", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'unused' is not run by the model's forward"):
        forward_to(model, "unused", ids)
