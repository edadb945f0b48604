"""An adapter's training step over a dictionary of two million latents, on the CPU.

The point of the package is that an adapter's cost follows the k active latents, not S: at
S = 2^21 and N = 256 tokens one dense [N, S] fp32 tensor is 2 GiB. The step (encode, edit,
decode, backward) must allocate nothing of that size -- only the S-sized gradients of the
adapter's parameters -- and still be right: the selection against F.linear + topk, the
output and every adapter gradient against the float64 reference on that selection.
"""
import pytest
import torch
import torch.nn.functional as F

import sae_sparse as ss
from helpers import LiveBytes, assert_close

pytestmark = pytest.mark.skipif("cpp" not in ss.available_backends(),
                                reason="needs the C++ extension")


@pytest.mark.exhaustive  # ~15 s
def test_adapter_step_over_two_million_latents():
    N, D, S, k, h = 256, 48, 1 << 21, 16, 8
    g = torch.Generator().manual_seed(0)
    sae = ss.SAE.random(D, S, k, generator=g).requires_grad_(False)
    x = torch.randn(N, D, generator=g)
    gy = torch.randn(N, D, generator=g)
    ad = ss.LatentAdapter(S, hidden=h)
    with torch.no_grad():
        for p in (ad.gain, ad.bias, ad.W_out):
            p.copy_(0.01 * torch.randn(p.shape, generator=g))
    params = dict(ad.named_parameters())

    with LiveBytes(x, gy, *params.values(), *sae.parameters()) as mem:
        y = ss.sae_edit(x, sae, ad, backend="cpp")
        (y * gy).sum().backward()
    adapter = sum(p.numel() for p in params.values()) * 4  # 152 MiB of parameters
    # their gradients, and on the way the folds' [h, S] gradient for W_out: ~2 adapter sizes
    # (302 MiB when written), where one dense [N, S] fp32 tensor would be 2 GiB
    assert mem.peak < 2.5 * adapter, mem.peak / 2 ** 20
    assert mem.peak < N * S * 4 / 6

    values, indices = sae.encode(x, backend="cpp")
    for r in range(0, N, 64):  # the selection, against the dense pre-activations of 64 rows
        top = F.linear(x[r:r + 64], sae.W_enc, sae.b_enc).topk(k)
        assert torch.equal(indices[r:r + 64], top.indices)
        assert_close(values[r:r + 64], top.values.relu(), rtol=1e-5, atol=1e-5, name="values")

    ref = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    y0 = ss.edit_decode(x.double(), values.double(), indices, sae.W_dec.double(),
                        sae.b_dec.double(), mode="delta", backend="torch", **ref)
    (y0 * gy.double()).sum().backward()
    # fp32 folds M = W_out W_dec, c = bias W_dec sum 2^21 terms: relative to the largest entry
    assert_close(y, y0, rtol=1e-4, atol=1e-4 * y0.abs().max().item(), name="y")
    for n, p in params.items():
        g0 = ref[n].grad
        assert_close(p.grad, g0, rtol=1e-4, atol=1e-4 * g0.abs().max().item(), name=n)
        assert p.grad.abs().max() > 0, n
