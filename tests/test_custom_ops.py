"""The kernel libraries as torch.library custom ops: opcheck and torch.compile tracing."""
import os

import pytest
import torch

import sae_sparse as ss
from sae_sparse import _cpp, backends

LIBS = []
if "cpp" in ss.available_backends():
    LIBS.append(pytest.param(_cpp.OPS, "cpu", id="cpp"))
if "triton" in ss.available_backends() and (torch.cuda.is_available()
                                            or os.environ.get("TRITON_INTERPRET") == "1"):
    LIBS.append(pytest.param(backends.TRITON_OPS, "cuda" if torch.cuda.is_available() else "cpu",
                             id="triton"))


def sample(device, N=5, D=24, S=90, k=6, h=3):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x, W, b, bp, thr = r(N, D), r(S, D) / 5, r(S) * 0.1, r(D) * 0.1, r(S).abs() * 0.1
    v = r(N, k).abs()
    i = torch.stack([torch.randperm(S, generator=g)[:k] for _ in range(N)]).to(device)
    return dict(x=x, W=W, b=b, bp=bp, thr=thr, v=v, i=i, gain=r(S), W_in=r(S, h), b_in=r(h),
                M=r(h, D), c=r(D), dy=r(N, D), h_pre=r(N, h), S=S, k=k)


@pytest.mark.parametrize("lib,device", LIBS)
def test_opcheck(lib, device):
    s = sample(device)
    ops = lib.ops
    torch.library.opcheck(ops["topk_encode"], (s["x"], s["W"], s["b"], s["k"], s["bp"], s["thr"]))
    torch.library.opcheck(ops["topk_encode"], (s["x"], s["W"], s["b"], s["k"], None, None))
    for mode in (0, 1, 2):
        torch.library.opcheck(ops["edit_decode_fwd"],
                              (s["x"], s["v"], s["i"], s["W"], s["b"][:24], s["gain"], s["W_in"],
                               s["b_in"], s["M"], s["c"], 1, mode))
    torch.library.opcheck(ops["edit_decode_fwd"], (None, s["v"], s["i"], s["W"], None, None, None,
                                                   None, None, None, 2, 2))
    torch.library.opcheck(ops["edit_decode_bwd"], (s["dy"], s["v"], s["i"], s["W"], s["gain"],
                                                   s["W_in"], s["h_pre"], s["M"], 0, 1))
    if lib is backends.TRITON_OPS:  # static output sizes (the cpp one's are data-dependent)
        torch.library.opcheck(ops["latent_csr"], (s["i"], s["S"]))
        torch.library.opcheck(ops["fold"], (s["M"].T[:s["S"] // 10].T.contiguous(),
                                            s["W"][:s["S"] // 10]))  # [h, 9] @ [9, D]
        torch.library.opcheck(ops["fold_t"], (s["M"], s["W"]))
        torch.library.opcheck(ops["fold_w"], (s["M"].T[:s["S"] // 10].T.contiguous(), s["M"]))
    off, order, active = ops["latent_csr"](s["i"], s["S"])
    torch.library.opcheck(ops["segment_rows"], (off, order, active, s["v"].reshape(-1), s["dy"],
                                                s["bp"], s["S"], s["k"]))


@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton")
                                     if b in ss.available_backends()])
def test_torch_compile_traces_the_op(backend):
    """torch.compile (aot_eager: fake tensors + autograd tracing) matches eager and the float64
    reference, forward and backward (W is both encoder and decoder: three gradient paths)."""
    if backend == "triton" and not (torch.cuda.is_available()
                                    or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no GPU")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    enc, dec = backends.encode_fn(backend), backends.decode_fn(backend)
    s = sample(device)
    W_out = torch.randn(3, s["S"], device=device) * 0.1
    params = [s["W"].clone().requires_grad_(), s["gain"].clone().requires_grad_(),
              W_out.requires_grad_()]

    def step(x, W, gain, W_out):
        v, i, _ = enc(x, W, s["b"], s["k"], s["bp"], None)
        y = dec(x, v, i, W, None, gain, None, s["W_in"], s["b_in"], W_out, "relu", "delta")
        return y.square().sum()

    eager = step(s["x"], *params)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(s["x"], *params)
    g = torch.autograd.grad(out, params)

    # Both against the float64 reference (the same step on the torch backend), then against
    # each other: tolerances relative to each gradient's scale, as a sum of N*k fp32 terms.
    enc64, dec64 = backends.encode_fn("torch"), backends.decode_fn("torch")
    r = {n: t.detach().cpu().double() for n, t in s.items() if isinstance(t, torch.Tensor)}
    p64 = [t.detach().cpu().double().requires_grad_() for t in params]
    v, i, _ = enc64(r["x"], p64[0], r["b"], s["k"], r["bp"], None)
    y = dec64(r["x"], v, i, p64[0], None, p64[1], None, r["W_in"], r["b_in"], p64[2], "relu",
              "delta")
    ref = y.square().sum()
    g_ref = torch.autograd.grad(ref, p64)
    with torch.no_grad():  # the same selection (the sample has no near-ties)
        assert torch.equal(i, enc(s["x"], params[0], s["b"], s["k"], s["bp"], None)[1].cpu())
    for name, (run, grads) in {"eager": (eager, g_eager), "compiled": (out, g)}.items():
        torch.testing.assert_close(run.cpu().double(), ref, rtol=1e-5, atol=0,
                                   msg=lambda m: f"{name} loss: {m}")
        for pn, a, b in zip(("W", "gain", "W_out"), grads, g_ref):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-5 * b.abs().max(),
                                       msg=lambda m: f"{name} d{pn} vs float64: {m}")
    for pn, a, b in zip(("W", "gain", "W_out"), g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max(),
                                   msg=lambda m: f"compiled vs eager d{pn}: {m}")


@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton")
                                     if b in ss.available_backends()])
def test_torch_compile_traces_the_public_api(backend):
    """The public API under torch.compile(aot_eager, fullgraph): SAE.forward (one op: encode
    + decode; b_pre tied to b_dec, passed to the op once; a loss on y and on the values) and
    sae_edit through the same trainable SAE give eager's losses and gradients; non-finite x
    still raises, from inside the compiled graph."""
    if backend == "triton" and not (torch.cuda.is_available()
                                    or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no GPU")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    s = sample(device)
    sae = ss.SAE(s["W"], s["b"], s["W"].flip(0) * 0.5, s["bp"], s["k"], b_pre=s["bp"])
    ad = ss.LatentAdapter(s["S"], 3, device=device)
    with torch.no_grad():
        for p in (ad.gain, ad.bias, ad.W_out):
            p.normal_()

    def step(x):
        y, v, _ = sae(x, backend=backend, return_code=True)
        edited = ss.sae_edit(x, sae, ad, backend=backend)
        return y.square().sum() + v.sum() + edited.square().sum()

    params = list(sae.parameters()) + list(ad.parameters())
    names = [n for n, _ in sae.named_parameters()] + [n for n, _ in ad.named_parameters()]
    eager = step(s["x"])
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(s["x"])
    g = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=0)
    for name, a, b in zip(names, g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max(),
                                   msg=lambda m: f"compiled vs eager d{name}: {m}")
    bad = s["x"].clone()
    bad[2, 3] = float("nan")
    if backend == "triton":  # no host sync to look: the non-finite row's loss is NaN
        assert torch.isnan(compiled(bad))
    else:
        with pytest.raises((RuntimeError, ValueError), match="NaN"):  # checked in the graph
            compiled(bad)


@pytest.mark.parametrize("S", [7, 90])
def test_triton_latent_csr_is_padded_and_sync_free(S):
    """The triton grouping by latent: a stable order, offsets, and min(N*k, S) latents (static
    sizes for torch.compile): with fewer pairs than latents the active ones in increasing
    order padded with S; with at least as many (S = 7 here, 12 pairs, latent 3 unused) every
    latent, so segment_rows writes every row of its [S, C] output -- zeros for latent 3 over
    the poisoned torch.empty -- and needs no zero fill."""
    from sae_sparse import triton as _triton
    g = torch.Generator().manual_seed(S)
    idx = torch.randint(0, S, (4, 3), generator=g)
    idx[idx == 3] = 4
    off, order, active = _triton.latent_csr(idx, S)
    flat = idx.reshape(-1)
    assert torch.equal(order, torch.sort(flat, stable=True).indices)
    counts = torch.bincount(flat, minlength=S)
    assert torch.equal(off, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert active.numel() == min(12, S)
    if 12 >= S:
        assert torch.equal(active, torch.arange(S))
    else:
        want = torch.nonzero(counts).reshape(-1)
        assert torch.equal(active[:want.numel()], want) and (active[want.numel():] == S).all()
    coef, src, sub = (torch.randn(12, generator=g), torch.randn(4, 5, generator=g),
                      torch.randn(5, generator=g))
    out, csum = _triton.segment_rows(off, order, active, coef, src, sub, S, 3)
    dense = torch.zeros(12, S).scatter_(1, flat[:, None], coef[:, None])  # [pair, latent]
    want_csum = dense.sum(0)
    want_out = dense.T @ src.repeat_interleave(3, 0) - want_csum[:, None] * sub
    torch.testing.assert_close(csum, want_csum)
    torch.testing.assert_close(out, want_out)
    assert (out[3] == 0).all() and csum[3] == 0
