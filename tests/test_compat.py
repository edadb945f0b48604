"""sparsify drop-in: fused_encoder / decoder_impl against sparsify's own (dense) definitions."""
import pytest
import torch
import torch.nn.functional as F

import sae_sparse as ss
from sae_sparse.compat import decoder_impl, fused_encoder

BACKENDS = [b for b in ss.available_backends() if b != "triton"]


def sparsify_reference(x, W, b, W_dec, b_dec, k):
    pre = F.relu(F.linear(x - b_dec, W, b))
    acts, idx = pre.topk(k, sorted=True)
    y = F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum") + b_dec
    return acts, idx, y


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparsify_style_training_step_matches(backend):
    torch.manual_seed(0)
    N, D, S, k = 40, 24, 300, 8
    x = torch.randn(N, D, dtype=torch.float64)
    params = dict(W=torch.randn(S, D, dtype=torch.float64) / 5,
                  b=0.1 * torch.randn(S, dtype=torch.float64),
                  W_dec=torch.randn(S, D, dtype=torch.float64) / 5,
                  b_dec=0.1 * torch.randn(D, dtype=torch.float64))
    grads = {}
    for name in ("ours", "sparsify"):
        p = {n: v.clone().requires_grad_() for n, v in params.items()}
        if name == "ours":
            out = fused_encoder(x - p["b_dec"], p["W"], p["b"], k, "topk", backend=backend)
            assert out.pre_acts is None
            y = decoder_impl(out.top_indices, out.top_acts, p["W_dec"].mT, backend=backend)
            y = y + p["b_dec"]
            acts, idx = out.top_acts, out.top_indices
        else:
            acts, idx, y = sparsify_reference(x, p["W"], p["b"], p["W_dec"], p["b_dec"], k)
        (y - x).pow(2).sum(-1).mean().backward()
        grads[name] = ({n: v.grad for n, v in p.items()}, acts, idx, y)
    g1, a1, i1, y1 = grads["ours"]
    g0, a0, i0, y0 = grads["sparsify"]
    assert torch.equal(i1, i0)
    torch.testing.assert_close(a1, a0)
    torch.testing.assert_close(y1, y0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)


def test_groupmax_is_refused():
    with pytest.raises(NotImplementedError, match="only 'topk'"):
        fused_encoder(torch.randn(2, 4), torch.randn(8, 4), torch.zeros(8), 2, "groupmax")
