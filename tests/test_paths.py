"""The triton backend's choice between its fused kernels and a torch composition
(sae_sparse/triton/paths.py), driven by a fake timer: the faster per shape bucket, timed
once, cached; overridden by the path= argument and $SAE_SPARSE_PATH; and both paths give
the float64 reference's outputs and gradients."""
import os

import pytest
import torch

import sae_sparse as ss
from sae_sparse.triton import paths

from helpers import assert_close

pytestmark = pytest.mark.skipif(
    "triton" not in ss.available_backends() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="drives the choice on CPU tensors under the Triton interpreter")


@pytest.fixture
def timer(monkeypatch):
    """A fake timer: the candidates' names in the order they were timed, and the times it
    reports (set per test)."""
    calls, times = [], {"fused": 1.0, "torch": 2.0}

    def fake(fn):
        name = {v: k for k, v in cands.items()}.get(fn)
        calls.append(name)
        return times[name]
    cands = {}
    real_choose = paths.choose

    def spy(key, device, candidates, compare=None):  # which callable is which candidate
        cands.clear()
        cands.update(candidates)
        return real_choose(key, device, candidates, compare)
    monkeypatch.setattr(paths, "choose", spy)
    monkeypatch.setattr(paths, "_TIMER", fake)
    monkeypatch.setattr(paths, "_CACHE", {})
    monkeypatch.setattr(paths, "_REFUSED", {})
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    return calls, times


def _case(N=9, D=21, S=300, k=5, dtype=torch.float32, g=0):
    gen = torch.Generator().manual_seed(g)
    sae = ss.SAE.random(D, S, k, b_pre=True, generator=gen, dtype=dtype)
    return sae, torch.randn(N, D, generator=gen).to(dtype)


def test_the_faster_path_is_chosen_once_per_bucket(timer):
    calls, times = timer
    sae, x = _case()
    times.update(fused=3.0, torch=1.0)  # torch faster: chosen, and both timed once
    v, i = ss.topk_encode(x, sae.W_enc, sae.b_enc, sae.k, b_pre=sae.b_pre, backend="triton")
    assert sorted(calls) == ["fused", "torch"]
    key = next(iter(paths._CACHE))
    assert paths._CACHE[key] == "torch"
    ss.topk_encode(torch.randn(12, 21), sae.W_enc, sae.b_enc, sae.k, b_pre=sae.b_pre,
                   backend="triton")
    assert len(calls) == 2  # N = 12 and 9 share the bucket (16): no new timing
    ss.topk_encode(torch.randn(40, 21), sae.W_enc, sae.b_enc, sae.k, b_pre=sae.b_pre,
                   backend="triton")
    assert len(calls) == 4  # N = 40: a new bucket
    v0, i0 = ss.topk_encode(x.double(), sae.W_enc.double(), sae.b_enc.double(), sae.k,
                            b_pre=sae.b_pre.double(), backend="torch")
    assert torch.equal(i, i0)
    assert_close(v.double(), v0, rtol=1e-5, atol=1e-6, name="values")


def test_ties_go_to_the_fused_path(timer):
    calls, times = timer
    times.update(fused=1.0, torch=1.0)
    sae, x = _case()
    ss.topk_encode(x, sae.W_enc, sae.b_enc, sae.k, backend="triton")
    assert set(paths._CACHE.values()) == {"fused"}


def test_argument_and_environment_override(timer, monkeypatch):
    calls, times = timer
    sae, x = _case()
    times.update(fused=3.0, torch=1.0)
    monkeypatch.setenv(paths.ENV_VAR, "fused")
    ss.topk_encode(x, sae.W_enc, sae.b_enc, sae.k, backend="triton")
    assert calls == [] and not paths._CACHE
    ss.topk_encode(x, sae.W_enc, sae.b_enc, sae.k, backend="triton", path="auto")
    assert sorted(calls) == ["fused", "torch"]  # the argument wins over the variable
    monkeypatch.setenv(paths.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="SAE_SPARSE_PATH must be one of"):
        ss.topk_encode(x, sae.W_enc, sae.b_enc, sae.k, backend="triton")
    with pytest.raises(ValueError, match="path must be one of"):
        ss.topk_encode(x, sae.W_enc, sae.b_enc, sae.k, backend="triton", path="fast")


@pytest.mark.parametrize("threshold", [False, True])
def test_torch_path_matches_the_reference_with_every_gradient(timer, threshold):
    """The SAE step and the edit step forced onto the torch composition (encode: F.linear +
    torch.topk; plain decode: embedding_bag), against the float64 torch backend; a row with
    a NaN comes back NaN as on the fused path, the overflow counts agree."""
    calls, times = timer
    times.update(fused=5.0, torch=1.0)
    g = torch.Generator().manual_seed(4)
    D, S, k = 19, 133, 7
    sae = ss.SAE.random(D, S, k, b_pre=True, threshold=threshold, generator=g)
    x = torch.randn(13, D, generator=g)
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc,
                                                                 sae.W_dec, sae.b_dec))
    sae64 = ss.SAE(W_enc, b_enc, W_dec, b_dec, k, b_pre=b_dec,  # tied, as sae's
                   threshold=sae.threshold.double() if threshold else None)
    y, v, i = sae(x, backend="triton", return_code=True)
    assert set(paths._CACHE.values()) == {"torch"} and len(paths._CACHE) == 2  # enc, dec
    y0, v0, i0 = sae64(x.double(), backend="torch", return_code=True)
    assert torch.equal(i, i0) and int(sae.last_overflow) == int(sae64.last_overflow)
    assert_close(y.double(), y0, rtol=1e-5, atol=1e-5, name="y")
    w = torch.randn(13, D, generator=g)
    (y * w).sum().backward()
    (y0 * w.double()).sum().backward()
    for n, p in sae.named_parameters():
        p0 = dict(sae64.named_parameters())[n]
        if n == "threshold":  # no gradient
            assert p.grad is None
            continue
        assert_close(p.grad.double(), p0.grad, rtol=1e-4,
                     atol=1e-5 * p0.grad.abs().max().item(), name=n)
    bad = x.clone()
    bad[3, 2] = float("nan")
    _, vb, _ = sae(bad, backend="triton", return_code=True)
    assert torch.isnan(vb[3]).all() and not torch.isnan(vb[[0, 12]]).any()


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_edit_step_on_the_torch_path(timer, mode):
    """sae_edit with a gain + bias + gelu FFN adapter, the encode and the edit + decode
    forward on the torch composition (embedding_bag gathers of W_dec and W_in, fp32 dense
    terms), against the float64 torch backend: y and every gradient (x, adapter, SAE)."""
    calls, times = timer
    times.update(fused=5.0, torch=1.0)
    g = torch.Generator().manual_seed(6)
    D, S, k = 19, 133, 7
    sae = ss.SAE.random(D, S, k, b_pre=True, generator=g)
    ad = ss.LatentAdapter(S, 5, activation="gelu")
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(11, D, generator=g).requires_grad_()
    y = ss.sae_edit(x, sae, ad, mode=mode, backend="triton")
    assert set(paths._CACHE.values()) == {"torch"} and len(paths._CACHE) == 2
    W_enc, b_enc, W_dec, b_dec = (t.detach().double().requires_grad_()
                                  for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    sae64 = ss.SAE(W_enc, b_enc, W_dec, b_dec, k, b_pre=b_dec)
    ad64 = ss.LatentAdapter(S, 5, activation="gelu", dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(ad64.parameters(), ad.parameters()):
            p.copy_(q)
    x64 = x.detach().double().requires_grad_()
    y0 = ss.sae_edit(x64, sae64, ad64, mode=mode, backend="torch")
    assert_close(y.double(), y0, rtol=1e-5, atol=1e-5, name="y")
    w = torch.randn(11, D, generator=g)
    (y * w).sum().backward()
    (y0 * w.double()).sum().backward()
    pairs = [("x", x, x64)] + [(n, p, dict(sae64.named_parameters())[n])
                               for n, p in sae.named_parameters()]
    pairs += [(n, p, dict(ad64.named_parameters())[n]) for n, p in ad.named_parameters()]
    for n, p, p0 in pairs:
        assert_close(p.grad.double(), p0.grad, rtol=1e-4,
                     atol=1e-5 * p0.grad.abs().max().item(), name=n)


def _corrupt(kind):
    """A fused encode that is wrong on purpose, as a kernel miscompiled on some card."""
    from sae_sparse.triton import encode as _enc
    real = _enc._topk_encode_fused

    def wrong(*a):
        v, i, ovf, *rest = real(*a)
        if kind == "values":
            v = v * 1.01
        elif kind == "indices":  # the last slot names its neighbour latent
            i = i.clone()
            i[:, -1] = (i[:, -1] + 1) % a[1].shape[0]
        elif kind == "duplicate":
            i = i.clone()
            i[:, -1] = i[:, 0]
        elif kind == "overflow":
            ovf = torch.zeros_like(ovf)
        return (v, i, ovf, *rest)
    return wrong


@pytest.mark.parametrize("kind", ["values", "indices", "duplicate", "overflow"])
def test_a_wrong_fused_encode_is_refused_though_faster(timer, monkeypatch, kind):
    """The fused encode times faster but its outputs disagree with the torch composition's:
    the bucket takes the torch path, one warning names the op, shape and difference, and
    backend_status reports it; the outputs are the reference's."""
    from sae_sparse.triton import encode as _enc
    calls, times = timer
    times.update(fused=1.0, torch=2.0)
    monkeypatch.setattr(_enc, "_topk_encode_fused", _corrupt(kind))
    sae, x = _case(N=40, S=300, k=5)
    b = torch.full((300,), 0.3) if kind == "overflow" else sae.b_enc  # most rows overflow
    with pytest.warns(RuntimeWarning, match=r"fused triton encode disagrees .*N <= 64, \(21,\)"):
        v, i = ss.topk_encode(x, sae.W_enc, b, sae.k, b_pre=sae.b_pre, backend="triton")
    assert set(paths._CACHE.values()) == {"torch"} and len(paths.refused()) == 1
    assert "refused for 1 shape bucket" in ss.backend_status()["triton"]
    v0, i0 = ss.topk_encode(x.double(), sae.W_enc.double(), b.double(), sae.k,
                            b_pre=sae.b_pre.double(), backend="torch")
    assert torch.equal(i, i0)
    assert_close(v.double(), v0, rtol=1e-5, atol=1e-6, name="values")
    ss.topk_encode(x[:33], sae.W_enc, b, sae.k, b_pre=sae.b_pre, backend="triton")  # cached


def test_a_wrong_fused_decode_is_refused(timer, monkeypatch):
    from sae_sparse.triton import edit_decode as _ed
    calls, times = timer
    times.update(fused=1.0, torch=2.0)
    real = _ed._edit_decode
    monkeypatch.setattr(_ed, "_edit_decode", lambda *a: real(*a).mul_(1.001))
    sae, x = _case()
    with pytest.warns(RuntimeWarning, match="fused triton edit_decode disagrees .* y differ"):
        y = sae(x, backend="triton")
    assert paths._CACHE[next(k for k in paths._CACHE if k[0] == "edit_decode")] == "torch"
    assert paths._CACHE[next(k for k in paths._CACHE if k[0] == "encode")] == "fused"
    sae64 = ss.SAE(*(t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                    sae.b_dec)), sae.k, b_pre=None)
    sae64.b_pre = sae64.b_dec
    assert_close(y.double(), sae64(x.double(), backend="torch"), rtol=1e-5, atol=1e-5,
                 name="y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_keep_exact_ties_by_the_smaller_index(timer, dtype):
    """Duplicated encoder rows and an all-zero row: the fused kernels and the torch
    composition select the same latents (smaller index first), and the check trusts both."""
    calls, times = timer
    g = torch.Generator().manual_seed(2)
    D, S, k = 16, 300, 6
    W = torch.randn(S, D, generator=g) / 4
    W[[77, 150, 299]] = W[3].clone()
    x = torch.randn(5, D, generator=g)
    x[0] = 10 * W[3]
    x[2] = 0
    W, x, b = W.to(dtype), x.to(dtype), torch.zeros(S, dtype=dtype)
    out = {p: ss.topk_encode(x, W, b, k, backend="triton", path=p)[1] for p in paths.PATHS}
    assert out["fused"][0, :4].tolist() == [3, 77, 150, 299]
    assert out["fused"][2].tolist() == list(range(k))
    assert torch.equal(out["fused"], out["torch"])
    times.update(fused=1.0, torch=2.0)
    ss.topk_encode(x, W, b, k, backend="triton")  # timed and checked: trusted
    assert set(paths._CACHE.values()) == {"fused"} and not paths.refused()
