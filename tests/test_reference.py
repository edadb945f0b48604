"""The torch backend against the brute-force definitions of DESIGN.md (float64)."""
import pytest
import torch

from sae_sparse import edit_decode, reference as R, sparse_decode, topk_encode

from helpers import adapter_kw, assert_close, dense_forward, grads_of, make_case

SHAPES = [
    pytest.param(5, 33, 1000, 7, id="N5-D33-S1000-k7"),
    pytest.param(1, 17, 50, 50, id="N1-D17-S50-kS"),
    pytest.param(9, 8, 37, 1, id="N9-D8-S37-k1"),
]


@pytest.mark.parametrize("N,D,S,k", SHAPES)
@pytest.mark.parametrize("threshold", [False, True], ids=["topk", "jumprelu"])
@pytest.mark.parametrize("b_pre", [False, True], ids=["nobpre", "bpre"])
def test_encode_matches_dense(N, D, S, k, threshold, b_pre):
    t = make_case(N, D, S, k, b_pre=b_pre, threshold=threshold)
    v, i, over = R.topk_encode_torch(t["x"], t["W_enc"], t["b_enc"], k, t.get("b_pre"),
                                     t.get("threshold"))
    dv, di, dover = R.dense_topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t.get("b_pre"),
                                        t.get("threshold"))
    assert torch.equal(i, di)
    assert_close(v, dv, rtol=1e-12, atol=1e-12, name="values")
    assert torch.equal(over, dover)
    gw = torch.randn_like(v)
    g1 = grads_of(v * gw, t)
    g2 = grads_of(dv * gw, t)
    for n in g1:
        assert_close(g1[n], g2[n], rtol=1e-10, atol=1e-12, name=n)


def test_chunked_selection_breaks_ties_by_smaller_index():
    # Every latent has the same pre-activation in groups; chunking must not change the order.
    D, S, k = 4, 50, 12
    W = torch.zeros(S, D, dtype=torch.float64)
    W[:, 0] = (torch.arange(S) % 5).double()  # 5 distinct values, 10 latents each
    x = torch.ones(3, D, dtype=torch.float64)
    b = torch.zeros(S, dtype=torch.float64)
    idx, _ = R.select_topk(x, W, b, k, chunk=7)
    want = torch.cat([torch.arange(4, S, 5), torch.arange(3, S, 5)[:2]])
    assert torch.equal(idx[0], want)
    dv, di, _ = R.dense_topk_encode(x, W, b, k)
    assert torch.equal(idx, di)


@pytest.mark.parametrize("mode", ["delta", "replace"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_edit_decode_matches_dense(mode, activation):
    N, D, S, k = 6, 33, 200, 7
    t = make_case(N, D, S, k, b_pre=True, threshold=True)
    v, i = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, b_pre=t["b_pre"],
                       threshold=t["threshold"], backend="torch")
    y = edit_decode(t["x"], v, i, t["W_dec"], t["b_dec"], activation=activation, mode=mode,
                    backend="torch", **adapter_kw(t))
    yd = dense_forward(t, k, mode, activation)
    assert_close(y, yd, rtol=1e-11, atol=1e-11, name="y")
    g1, g2 = grads_of(y, t), grads_of(yd, t)
    for n in g1:
        assert_close(g1[n], g2[n], rtol=1e-9, atol=1e-11, name=n)


def test_sparse_decode_matches_dense():
    v = torch.randn(4, 3, 5, dtype=torch.float64)
    i = torch.randint(0, 40, (4, 3, 5))
    W = torch.randn(40, 9, dtype=torch.float64)
    b = torch.randn(9, dtype=torch.float64)
    y = sparse_decode(v, i, W, b, backend="torch")
    want = torch.einsum("abk,abkd->abd", v, W[i]) + b
    assert_close(y, want, rtol=1e-12, atol=1e-12, name="y")


def test_zero_edit_in_delta_mode_returns_x_exactly():
    t = make_case(4, 16, 100, 5, gain=False, bias=False, ffn=False)
    v, i = topk_encode(t["x"], t["W_enc"], t["b_enc"], 5, backend="torch")
    y = edit_decode(t["x"], v, i, t["W_dec"], t["b_dec"], mode="delta", backend="torch",
                    gain=torch.zeros(100, dtype=torch.float64))
    assert torch.equal(y, t["x"])
