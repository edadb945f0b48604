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
    model = tiny_gpt2(layers=3)
    ids = torch.randint(0, 50, (1, 7))
    base = model(ids).logits
    saes = {f"transformer.h.{i}": (ss.SAE.random(32, 100, 5), ss.LatentAdapter(100, 3))
            for i in range(3)}
    edits = attach(model, saes, mode="replace")
    out = model(ids).logits
    assert out.shape == base.shape and (out - base).abs().max() > 0  # SAE error replaces h
    edits.remove()


def test_bad_module_path():
    with pytest.raises(ValueError, match="model has no module 'transformer.h.9'"):
        attach(tiny_gpt2(), {"transformer.h.9": (ss.SAE.random(32, 50, 3), None)})


def test_lora_baseline_starts_at_identity():
    model = tiny_gpt2()
    ids = torch.randint(0, 50, (2, 5))
    base = model(ids).logits
    edits = attach(model, {"transformer.h.0": ResidualLoRA(32, 4)})
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    edits.remove()
