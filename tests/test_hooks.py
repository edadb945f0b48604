"""Attaching SAE edits to Hugging Face causal LMs."""
import pytest
import torch

import sae_sparse as ss
from sae_sparse.hooks import ResidualLoRA, attach

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


def test_lora_baseline_starts_at_identity():
    model = tiny_gpt2()
    ids = torch.randint(0, 50, (2, 5))
    base = model(ids).logits
    edits = attach(model, {"transformer.h.0": ResidualLoRA(32, 4)})
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    edits.remove()
