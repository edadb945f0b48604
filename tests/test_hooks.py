"""Attaching SAE edits to Hugging Face causal LMs."""
import pytest
import torch

import sae_sparse as ss
from sae_sparse.baselines import ResidualLoRA
from sae_sparse.hooks import attach

from tiny_models import tiny_gpt2, tiny_llama

pytest.importorskip("transformers")

MODELS = [pytest.param(tiny_gpt2, "transformer.h.1", id="gpt2"),
          pytest.param(tiny_llama, "model.layers.0", id="llama")]


@pytest.mark.parametrize("make,hook", MODELS)
def test_zero_adapter_keeps_logits_and_removal_is_clean(make, hook):
    model = make()
    ids = torch.randint(0, 50, (2, 9))
    base = model(ids).logits
    sae = ss.SAE.random(32, 200, 6, b_pre=True)
    edits = attach(model, {hook: (sae, ss.LatentAdapter(200, 4))}, mode="delta")
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    # a non-zero edit changes the logits; a token mask limits where
    ad = ss.LatentAdapter(200, 4)
    with torch.no_grad():
        ad.bias[:50] = 1.0
    edits.remove()
    edits = attach(model, {hook: (sae, ad)}, mode="delta")
    edited = model(ids).logits
    assert (edited - base).abs().max() > 1e-3
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 5:] = True
    with edits.token_mask(mask):
        part = model(ids).logits
    torch.testing.assert_close(part[:, :5], base[:, :5], rtol=1e-5, atol=1e-5)  # causal
    assert (part[:, 5:] - base[:, 5:]).abs().max() > 1e-3
    with edits.disabled():
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    edits.remove()
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)


def test_several_layers_and_replace_mode():
    """replace mode with zero adapters at three blocks: each block's output is replaced by
    the SAE's reconstruction, equal to hooks that do that by hand with the float64 reference;
    a bias edit at block 1 then moves the output by exactly bias·W_dec at every position."""
    model = tiny_gpt2(layers=3)
    ids = torch.randint(0, 50, (2, 7))
    base = model(ids).logits
    saes = {f"transformer.h.{i}": (ss.SAE.random(32, 100, 5), ss.LatentAdapter(100, 3))
            for i in range(3)}
    edits = attach(model, saes, mode="replace")
    out = model(ids).logits
    edits.remove()

    def by_hand(sae):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            y = sae.double()(h.double(), backend="torch").to(h.dtype)
            sae.float()
            return (y, *output[1:]) if isinstance(output, tuple) else y
        return hook

    handles = [model.get_submodule(p).register_forward_hook(by_hand(s))
               for p, (s, _) in saes.items()]
    want = model(ids).logits
    for h in handles:
        h.remove()
    assert (want - base).abs().max() > 1e-3  # reconstruction error changes the logits
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)

    sae, ad = saes["transformer.h.1"]
    with torch.no_grad():
        ad.bias[[4, 9]] = torch.tensor([1.5, -0.5])
    seen = []  # what block 2 receives: block 1's output, edited or not
    grab = model.get_submodule("transformer.h.2").register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach()))
    edits = attach(model, {"transformer.h.1": (sae, ad)}, mode="delta")
    with edits.disabled():
        model(ids)
    model(ids)
    edits.remove()
    grab.remove()
    delta = (ad.bias.detach().double() @ sae.W_dec.detach().double()).float()
    assert delta.abs().max() > 0.1
    torch.testing.assert_close(seen[1] - seen[0], delta.expand_as(seen[0]), rtol=1e-5,
                               atol=1e-5)


def test_bad_module_path():
    with pytest.raises(ValueError, match="has no module 'transformer.h.9'"):
        attach(tiny_gpt2(), {"transformer.h.9": (ss.SAE.random(32, 50, 3), None)})


def test_two_edits_for_one_module_are_refused():
    """Two names for one module (a module path and its TransformerLens hook name): the second
    would silently replace the first."""
    sae = ss.SAE.random(32, 50, 3)
    with pytest.raises(ValueError, match="edits 'transformer.h.1' and "
                                         "'blocks.1.hook_resid_post' name the same module"):
        attach(tiny_gpt2(), {"transformer.h.1": (sae, None),
                             "blocks.1.hook_resid_post": (sae, None)})


def test_lora_baseline_starts_at_identity():
    model = tiny_gpt2()
    ids = torch.randint(0, 50, (2, 5))
    base = model(ids).logits
    edits = attach(model, {"transformer.h.0": ResidualLoRA(32, 4)})
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    edits.remove()


@pytest.mark.parametrize("make,hook", MODELS)
def test_skip_first_leaves_the_sink_unedited(make, hook):
    """skip_first=1: the first position's logits are the unedited model's (causal: position 0
    sees only itself) and the hooked output there is the module's own; every other position
    is edited exactly as without it, and the edit at those positions is the same as with a
    token mask that excludes position 0."""
    model = make()
    ids = torch.randint(0, 50, (3, 11))
    base = model(ids).logits
    sae = ss.SAE.random(32, 150, 5, b_pre=True)
    ad = ss.LatentAdapter(150, 4)
    with torch.no_grad():
        ad.bias.normal_()
        ad.gain.normal_()
    seen = {}
    module = model.get_submodule(hook)
    h = module.register_forward_hook(lambda m, a, o: seen.__setitem__(
        "out", (o[0] if isinstance(o, tuple) else o).detach()))
    model(ids)
    raw = seen["out"]
    edits = attach(model, {hook: (sae, ad)}, skip_first=1)
    h.remove()  # registered before the edit: re-register after it to see the edited output
    h = module.register_forward_hook(lambda m, a, o: seen.__setitem__(
        "out", (o[0] if isinstance(o, tuple) else o).detach()))
    out = model(ids).logits
    torch.testing.assert_close(seen["out"][:, 0], raw[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 0], base[:, 0], rtol=0, atol=0)
    assert (out[:, 1:] - base[:, 1:]).abs().max() > 1e-3
    edits.skip_first = 0
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[:, 0] = False
    with edits.token_mask(mask):
        torch.testing.assert_close(model(ids).logits, out, rtol=0, atol=0)
    assert (model(ids).logits[:, 0] - base[:, 0]).abs().max() > 1e-3  # 0: position 0 edited
    h.remove()
    edits.remove()
    with pytest.raises(ValueError, match="skip_first"):
        attach(model, {hook: (sae, ad)}, skip_first=-1)


def test_skip_first_follows_position_ids_left_padding_and_the_kv_cache():
    """With left padding and position ids (as generate passes them), the first real token is
    the one left unedited: a left-padded row's logits equal the unpadded row's; decoding
    with a KV cache (one token per forward) edits the new tokens, as the full forward does."""
    model = tiny_llama()
    sae = ss.SAE.random(32, 150, 5, b_pre=True)
    ad = ss.LatentAdapter(150, 4)
    with torch.no_grad():
        ad.bias.normal_()
    edits = attach(model, {"model.layers.0": (sae, ad)}, skip_first=1)
    ids = torch.randint(1, 50, (1, 7))
    alone = model(ids).logits
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)],
                     1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=attn, position_ids=pos).logits
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-4, atol=1e-4)
    with edits.disabled():
        unedited = model(padded, attention_mask=attn, position_ids=pos).logits
    torch.testing.assert_close(out[:, 3], unedited[:, 3], rtol=0, atol=0)
    # the KV cache: the prompt's forward, then one token at a time
    step = model(ids[:, :4], use_cache=True)
    logits = [step.logits]
    cache = step.past_key_values
    for t in range(4, 7):
        step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, 1), alone, rtol=1e-4, atol=1e-4)
    edits.remove()
