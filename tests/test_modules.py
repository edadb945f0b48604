"""SAE and LatentAdapter modules."""
import pytest
import torch

import sae_sparse as ss

from helpers import assert_close

BACKENDS = ss.available_backends()


def dtype_for(backend):
    return torch.float32 if backend == "triton" else torch.float64  # triton: no fp64 kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_zero_adapter_is_identity_edit(backend, mode):
    dt = dtype_for(backend)
    sae = ss.SAE.random(24, 300, 6, b_pre=True, dtype=dt)
    ad = ss.LatentAdapter(300, hidden=4, dtype=dt)
    x = torch.randn(5, 7, 24, dtype=dt)
    y = ss.sae_edit(x, sae, ad, mode=mode, backend=backend)
    want = x if mode == "delta" else sae(x, backend=backend)
    tol = 1e-12 if dt == torch.float64 else 1e-6
    assert_close(y, want, rtol=tol, atol=tol, name="y")
    if mode == "delta":
        assert torch.equal(y, x)


def test_tied_b_pre_is_one_parameter():
    b = torch.randn(10)
    sae = ss.SAE(torch.randn(40, 10), torch.zeros(40), torch.randn(40, 10), b, 4, b_pre=b)
    assert sae.b_pre is sae.b_dec and sae.tied_b_pre
    names = [n for n, _ in sae.named_parameters()]
    assert names.count("b_dec") == 1 and "b_pre" not in names  # deduplicated
    untied = ss.SAE(torch.randn(40, 10), torch.zeros(40), torch.randn(40, 10), b, 4,
                    b_pre=b.clone())
    assert untied.b_pre is not untied.b_dec


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_through_the_op_updates_sae_and_adapter(backend):
    torch.manual_seed(0)
    dt = dtype_for(backend)
    sae = ss.SAE.random(16, 200, 5, b_pre=True, dtype=dt)
    ad = ss.LatentAdapter(200, hidden=4, dtype=dt)
    x = torch.randn(32, 16, dtype=dt)
    y = ss.sae_edit(x, sae, ad, mode="replace", backend=backend)
    ((y - x) ** 2).mean().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(sae, name).grad is not None and getattr(sae, name).grad.abs().sum() > 0
    assert ad.W_out.grad.abs().sum() > 0 and ad.bias.grad.abs().sum() > 0
    assert sae.threshold is None
    sae.requires_grad_(False)
    ad.zero_grad()
    y = ss.sae_edit(x, sae, ad, backend=backend)
    y.pow(2).sum().backward()
    assert sae.W_enc.grad.abs().sum() > 0  # from before; no new grads needed
    assert ad.gain.grad is not None


def test_latent_mask_restricts_edit():
    S = 50
    mask = torch.zeros(S, dtype=torch.bool)
    mask[:10] = True
    ad = ss.LatentAdapter(S, hidden=3, latent_mask=mask)
    with torch.no_grad():
        ad.bias.fill_(1.0)
        ad.gain.fill_(1.0)
        ad.W_out.fill_(1.0)
    p = ad.edit_params()
    assert torch.equal(p["bias"][10:], torch.zeros(S - 10))
    assert torch.equal(p["W_out"][:, 10:], torch.zeros(3, S - 10))
    assert torch.equal(p["W_in"][10:], torch.zeros(S - 10, 3))


def test_overflow_is_recorded():
    sae = ss.SAE.random(16, 100, 3, threshold=True)
    sae.encode(torch.randn(8, 16))
    assert sae.last_overflow is not None and 0 <= int(sae.last_overflow) <= 8


def test_low_precision_activations_with_fp32_sae():
    sae = ss.SAE.random(16, 100, 4)
    ad = ss.LatentAdapter(100, 4)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = ss.sae_edit(x, sae, ad)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tied", [False, True])
def test_sae_training_step_gradients(backend, tied):
    """An SAE training step (x needs no gradient, b_pre does: the backward takes b_pre's
    gradient from the per-latent sums, not from a dx) against the float64 torch backend."""
    dt = dtype_for(backend)
    g = torch.Generator().manual_seed(2)
    W_enc, W_dec = torch.randn(2, 170, 20, generator=g, dtype=torch.float64) / 5
    b_enc, b_dec, b_pre = (0.1 * torch.randn(n, generator=g, dtype=torch.float64)
                           for n in (170, 20, 20))
    x = torch.randn(3, 11, 20, generator=g, dtype=torch.float64)

    def step(dtype, be):
        ps = [t.to(dtype) for t in (W_enc, b_enc, W_dec, b_dec, b_pre)]
        sae = ss.SAE(*ps[:4], 5, b_pre=ps[3] if tied else ps[4])
        assert sae.tied_b_pre == tied
        xx = x.to(dtype)
        loss = (sae(xx, backend=be) - xx).square().sum()
        return torch.autograd.grad(loss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
                                   + ([] if tied else [sae.b_pre]))

    tol = 1e-9 if dt == torch.float64 else 2e-4
    for n, g1, g0 in zip(("W_enc", "b_enc", "W_dec", "b_dec", "b_pre"), step(dt, backend),
                         step(torch.float64, "torch")):
        assert_close(g1, g0, rtol=tol, atol=tol * g0.abs().max().item(), name=n)
