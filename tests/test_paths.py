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

    def spy(key, device, candidates):  # record which callable is which candidate
        cands.clear()
        cands.update(candidates)
        return real_choose(key, device, candidates)
    monkeypatch.setattr(paths, "choose", spy)
    monkeypatch.setattr(paths, "_TIMER", fake)
    monkeypatch.setattr(paths, "_CACHE", {})
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
