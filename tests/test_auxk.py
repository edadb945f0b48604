"""AuxK encode (top-k over the dead latents) against its dense definition, on every backend."""
import os

import pytest
import torch
import torch.nn.functional as F

import sae_sparse as ss
from sae_sparse.compat import auxk_encoder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ss.available_backends()
            if b != "triton" or torch.cuda.is_available()
            or os.environ.get("TRITON_INTERPRET") == "1"]


def dense_auxk(x, W, b, dead, k_aux, b_pre=None):
    """sparsify's definition: top-k of where(dead, relu(pre), -inf), k clamped to n_dead."""
    pre = F.linear(x - b_pre if b_pre is not None else x, W, b)
    kk = min(k_aux, int(dead.sum()))
    return torch.where(dead[None], pre, float("-inf")).topk(kk, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_dead,k_aux", [(37, 9), (5, 9), (1, 1)])
def test_auxk_matches_the_dense_definition(backend, n_dead, k_aux):
    g = torch.Generator().manual_seed(n_dead)
    N, D, S = 11, 19, 301
    dt = torch.float64 if backend != "triton" else torch.float32
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(S, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = 0.5 * torch.randn(S, generator=g, dtype=torch.float64)
    b_pre = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    dead = torch.zeros(S, dtype=torch.bool)
    dead[torch.randperm(S, generator=g)[:n_dead]] = True
    w_out = torch.randn(N, min(k_aux, n_dead), generator=g, dtype=torch.float64)

    def run(fn, dtype, device):
        ts = [t.detach().to(device, dtype).requires_grad_() for t in (x, W, b, b_pre)]
        v, i = fn(*ts)
        (v * w_out.to(device, dtype)).sum().backward()
        return v, i, [t.grad for t in ts]

    v1, i1, g1 = run(lambda x_, W_, b_, bp: ss.auxk_encode(
        x_, W_, b_, dead.to(x_.device), k_aux, b_pre=bp, backend=backend), dt,
        DEVICE if backend == "triton" else "cpu")
    pre, i0 = dense_auxk(x, W, b, dead, k_aux, b_pre)
    v0 = pre.relu()
    assert dead[i1.cpu()].all()
    pos = v0 > 0  # zero-valued picks may differ (arbitrary order among zeros in topk)
    assert torch.equal(i1.cpu()[pos], i0[pos])
    torch.testing.assert_close(v1.cpu().double(), v0, rtol=1e-5, atol=1e-6)
    ts = [t.detach().clone().requires_grad_() for t in (x, W, b, b_pre)]
    p, _ = dense_auxk(*ts[:3], dead, k_aux, ts[3])
    (p.relu() * w_out).sum().backward()
    for n, a, e in zip(("x", "W_enc", "b_enc", "b_pre"), g1, ts):
        torch.testing.assert_close(a.cpu().double(), e.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_auxk_with_no_dead_latent_and_errors():
    x, W, b = torch.randn(2, 3, 8), torch.randn(20, 8), torch.zeros(20)
    v, i = ss.auxk_encode(x, W, b, torch.zeros(20, dtype=torch.bool), 4)
    assert v.shape == (2, 3, 0) and i.shape == (2, 3, 0) and i.dtype == torch.long
    with pytest.raises(ValueError, match=r"dead_mask must have shape \[20\]"):
        ss.auxk_encode(x, W, b, torch.zeros(19, dtype=torch.bool), 4)
    with pytest.raises(TypeError, match="dead_mask must have dtype torch.bool"):
        ss.auxk_encode(x, W, b, torch.zeros(20), 4)
    with pytest.raises(ValueError, match="k_aux must be an int >= 1"):
        ss.auxk_encode(x, W, b, torch.ones(20, dtype=torch.bool), 0)


def test_auxk_loss_of_a_training_step_matches_sparsify():
    """The AuxK term of a sparsify-style step (compat.auxk_encoder + decode) has sparsify's
    loss and gradients, leading dims kept."""
    torch.manual_seed(1)
    sae = ss.SAE.random(d_in=16, d_sae=200, k=6, b_pre=True, dtype=torch.float64)
    sae.requires_grad_(True)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    dead = torch.rand(200) < 0.3
    k_aux = x.shape[-1] // 2

    def loss(acts, idx):
        e = x - sae(x)
        e_hat = ss.sparse_decode(acts, idx, sae.W_dec)
        scale = min(int(dead.sum()) / k_aux, 1.0)
        return scale * (e_hat - e.detach()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()

    ours = loss(*auxk_encoder(x - sae.b_pre, sae.W_enc, sae.b_enc, dead, k_aux))
    g1 = torch.autograd.grad(ours, [sae.W_enc, sae.b_enc, sae.W_dec])
    assert torch.equal(sae.auxk_encode(x, dead, k_aux)[1],
                       auxk_encoder(x - sae.b_pre, sae.W_enc, sae.b_enc, dead, k_aux)[1])
    pre = F.relu(F.linear(x - sae.b_pre, sae.W_enc, sae.b_enc))
    acts, idx = torch.where(dead, pre, float("-inf")).topk(min(k_aux, int(dead.sum())))
    ref = loss(acts, idx)
    g0 = torch.autograd.grad(ref, [sae.W_enc, sae.b_enc, sae.W_dec])
    torch.testing.assert_close(ours, ref)
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e)
