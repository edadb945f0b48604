"""SAE and LatentAdapter modules."""
import pytest
import torch

import sae_sparse as ss
from sae_sparse import triton as _triton

from helpers import assert_close

# CPU tensors: triton only through the interpreter (on a GPU machine: test_triton_gpu.py)
BACKENDS = [b for b in ss.available_backends() if b != "triton" or _triton.interpreting()]


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
    """sae_edit's backward reaches the SAE's and the adapter's parameters with the float64
    reference's gradients; once the SAE is frozen, a new backward gives it none and the
    adapter the reference's."""
    torch.manual_seed(0)
    dt = dtype_for(backend)
    sae = ss.SAE.random(16, 200, 5, b_pre=True, dtype=dt)
    ad = ss.LatentAdapter(200, hidden=4, dtype=dt)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(32, 16, dtype=dt)
    ref_sae = ss.SAE(*(t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                     sae.b_dec)), 5)
    ref_sae.b_pre = ref_sae.b_dec  # tied, as in sae
    ref_ad = ss.LatentAdapter(200, hidden=4, dtype=torch.float64)
    ref_ad.load_state_dict({k: v.double() for k, v in ad.state_dict().items()})
    tol = 1e-9 if dt == torch.float64 else 2e-4

    def grads(s, a, xx, be, mode):
        y = ss.sae_edit(xx, s, a, mode=mode, backend=be)
        ((y - xx) ** 2).mean().backward()
        return {n: p.grad for n, p in [*s.named_parameters(), *a.named_parameters()]}

    got = grads(sae, ad, x, backend, "replace")
    want = grads(ref_sae, ref_ad, x.double(), "torch", "replace")
    for n, g in want.items():
        assert g is not None and got[n] is not None and g.abs().sum() > 0, n
        assert_close(got[n], g, rtol=tol, atol=tol * g.abs().max().item(), name="d" + n)
    assert sae.threshold is None
    for m in (sae, ad, ref_sae, ref_ad):
        m.zero_grad(set_to_none=True)
    sae.requires_grad_(False)
    ref_sae.requires_grad_(False)
    got = grads(sae, ad, x, backend, "delta")
    want = grads(ref_sae, ref_ad, x.double(), "torch", "delta")
    assert all(p.grad is None for p in sae.parameters())  # frozen: no gradient
    for n, p in ad.named_parameters():
        assert_close(p.grad, want[n], rtol=tol, atol=tol * want[n].abs().max().item(),
                     name="d" + n)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_is_recorded(backend):
    """last_overflow counts exactly the rows with more than k active latents (the dense
    reference's count; the case has rows of both kinds), after encode, forward and sae_edit."""
    from sae_sparse import reference as R
    g = torch.Generator().manual_seed(3)
    dt = dtype_for(backend)
    sae = ss.SAE.random(16, 100, 3, threshold=True, generator=g, dtype=dt)
    with torch.no_grad():
        sae.threshold.copy_(1.8 + 0.4 * torch.rand(100, generator=g, dtype=dt))
    assert sae.last_overflow is None
    x = torch.randn(40, 16, generator=g, dtype=dt)
    _, _, rows = R.dense_topk_encode(x.double(), sae.W_enc.double(), sae.b_enc.double(), 3,
                                     threshold=sae.threshold.double())
    want = int(rows.sum())
    assert 0 < want < 40
    sae.encode(x, backend=backend)
    assert int(sae.last_overflow) == want
    sae.encode(x[:1] * 0, backend=backend)
    assert int(sae.last_overflow) == 0
    sae(x, backend=backend)
    assert int(sae.last_overflow) == want
    ss.sae_edit(x, sae, None, backend=backend)
    assert int(sae.last_overflow) == want


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


KERNEL_BACKENDS = [b for b in ss.available_backends() if b == "cpp" or (
    b == "triton" and (_triton.interpreting() or torch.cuda.is_available()))]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("variant", ["tied", "untied+jumprelu", "no b_pre, N=1"])
def test_sae_forward_is_one_op_with_every_gradient(monkeypatch, backend, variant):
    """SAE.forward(return_code=True) is one autograd op on the kernel backends: y, values and
    indices as encode + decode give them, every gradient (x too, and a loss on the code
    itself) against the float64 torch backend's composed ops, and one grouping by latent
    (latent_csr) per backward where the composed ops take two."""
    from sae_sparse import _cpp
    from sae_sparse.triton import functions
    csr_calls = []
    # the kernel library: the C++ operators, or (eager) the triton package
    # (its composed ops) and its fused Functions
    libs = [_cpp.OPS] if backend == "cpp" else [_triton, functions]
    for lib in libs:
        monkeypatch.setattr(lib, "latent_csr", lambda *a, f=lib.latent_csr, **kw:
                            csr_calls.append(1) or f(*a, **kw))
    dt = dtype_for(backend)
    dev = "cuda" if backend == "triton" and not _triton.interpreting() else "cpu"
    g = torch.Generator().manual_seed(3)
    N, D, S, k = (1, 19, 133, 7) if "N=1" in variant else (13, 19, 133, 7)
    W_enc, W_dec = torch.randn(2, S, D, generator=g, dtype=torch.float64) / 4
    b_enc, b_dec, b_pre = (0.1 * torch.randn(n, generator=g, dtype=torch.float64)
                           for n in (S, D, D))
    thr = 0.3 * torch.rand(S, generator=g, dtype=torch.float64) if "jumprelu" in variant else None
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w_y, w_v = torch.randn(N, D, generator=g), torch.randn(N, k, generator=g)

    def run(dtype, be, fused):
        d = dev if be == backend else "cpu"
        ps = [t.to(d, dtype) for t in (W_enc, b_enc, W_dec, b_dec, b_pre)]
        sae = ss.SAE(*ps[:4], k, b_pre=None if "no b_pre" in variant else
                     ps[3] if variant == "tied" else ps[4],
                     threshold=thr.to(d, dtype) if thr is not None else None)
        xx = x.to(d, dtype).requires_grad_()
        if fused:
            y, v, i = sae(xx, backend=be, return_code=True)
        else:
            v, i = sae.encode(xx, backend=be)
            y = ss.sparse_decode(v, i, sae.W_dec, sae.b_dec, backend=be)
        loss = (y * w_y.to(d, dtype)).sum() + (v * w_v.to(d, dtype)).sum()
        params = [p for p in (xx, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.b_pre)
                  if p is not None]
        params = list({id(p): p for p in params}.values())  # tied: b_pre is b_dec
        return (y, v, i, sae.last_overflow), torch.autograd.grad(loss, params)

    (y, v, i, over), grads = run(dt, backend, True)
    assert len(csr_calls) == 1
    (y0, v0, i0, over0), grads0 = run(torch.float64, "torch", False)
    assert torch.equal(i.cpu(), i0) and int(over) == int(over0)
    tol = 1e-9 if dt == torch.float64 else 2e-4
    assert_close(y.cpu(), y0, rtol=tol, atol=tol, name="y")
    assert_close(v.cpu(), v0, rtol=tol, atol=tol, name="values")
    for n, a, b in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec", "b_pre"), grads, grads0):
        assert_close(a.cpu(), b, rtol=tol, atol=tol * b.abs().max().item(), name="d" + n)
    run(dt, backend, False)
    assert len(csr_calls) == 3  # the composed ops group the pairs twice


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sae_forward_decoder_only_gradients(backend):
    """Only the decoder trains (encoder frozen): W_dec and b_dec get the composed ops'
    gradients, the encoder none."""
    dev = "cuda" if backend == "triton" and not _triton.interpreting() else "cpu"
    g = torch.Generator().manual_seed(4)
    sae = ss.SAE.random(20, 150, 6, b_pre=True, generator=g, device=dev)
    for p in (sae.W_enc, sae.b_enc, sae.b_dec):
        p.requires_grad_(False)
    x = torch.randn(9, 20, generator=g).to(dev)
    (dWd,) = torch.autograd.grad(sae(x, backend=backend).square().sum(), [sae.W_dec])
    v, i = sae.encode(x, backend="torch")
    (want,) = torch.autograd.grad(ss.sparse_decode(v, i, sae.W_dec, sae.b_dec,
                                                   backend="torch").square().sum(), [sae.W_dec])
    assert_close(dWd.cpu(), want.cpu(), rtol=2e-5, atol=1e-6, name="dW_dec")


@pytest.mark.parametrize("backend", ss.available_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_functional_sae_forward(backend, dtype):
    """ss.sae_forward on a training loop's own tensors (leading dims, a tied b_pre/b_dec
    passed as the same tensor, bf16 through the cpp backend's fp32 copies): y, the code and
    every gradient as the composed topk_encode + sparse_decode give them in float64, and the
    overflow count."""
    if backend == "triton" and not (_triton.interpreting() or torch.cuda.is_available()):
        pytest.skip("triton needs CUDA or the interpreter")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernels take fp32/bf16/fp16")
    dev = "cuda" if backend == "triton" and not _triton.interpreting() else "cpu"
    g = torch.Generator().manual_seed(7)
    D, S, k = 18, 141, 9
    W_enc, W_dec = torch.randn(2, S, D, generator=g, dtype=torch.float64) / 4
    b_enc, b_dec = 0.1 * torch.randn(S, generator=g), 0.1 * torch.randn(D, generator=g)
    x = torch.randn(2, 5, D, generator=g, dtype=torch.float64)
    # the loss on the code weighs each latent, not each slot: bf16 may order near-ties
    # differently (the triton kernels round x - b_pre to bf16 before the product)
    w_y, w_lat = torch.randn(2, 5, D, generator=g), torch.randn(S, generator=g)

    def run(dt, be, fused):  # the reference gets the same (rounded) inputs, in float64
        d = dev if be == backend else "cpu"
        xx, We, be_, Wd, bd = (t.to(dtype).to(d, dt).requires_grad_()
                               for t in (x, W_enc, b_enc, W_dec, b_dec))
        if fused:
            y, v, i, over = ss.sae_forward(xx, We, be_, Wd, bd, k, b_pre=bd, backend=be,
                                           return_overflow=True)
        else:
            v, i, over = ss.topk_encode(xx, We, be_, k, b_pre=bd, backend=be,
                                        return_overflow=True)
            y = ss.sparse_decode(v, i, Wd, bd, backend=be)
        loss = (y * w_y.to(d, dt)).sum() + (v * w_lat.to(d, dt)[i]).sum()
        return (y, v, i, over), torch.autograd.grad(loss, [xx, We, be_, Wd, bd])

    (y, v, i, over), grads = run(dtype, backend, True)
    (y0, v0, i0, over0), grads0 = run(torch.float64, "torch", False)
    assert y.shape == (2, 5, D) and y.dtype == dtype and v.shape == i.shape == (2, 5, k)
    assert int(over) == int(over0)
    rel = 1e-9 if dtype == torch.float64 else 3e-2
    if dtype == torch.float64:
        assert torch.equal(i.cpu(), i0)
    order, order0 = i.cpu().argsort(-1), i0.argsort(-1)  # the code compared as sets
    assert torch.equal(i.cpu().gather(-1, order), i0.gather(-1, order0))
    v, v0 = v.cpu().gather(-1, order), v0.gather(-1, order0)
    for n, a, b in zip(("y", "values", "x", "W_enc", "b_enc", "W_dec", "b_dec"),
                       (y, v, *grads), (y0, v0, *grads0)):
        assert_close(a.cpu().double(), b, rtol=rel, atol=rel * b.abs().max().item(), name=n)


def test_functional_sae_forward_errors():
    x, W, b, Wd, bd = torch.randn(3, 8), torch.randn(20, 8), torch.zeros(20), \
        torch.randn(20, 8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"W_dec must have shape \[20, 8\], got \[8, 20\]"):
        ss.sae_forward(x, W, b, Wd.T, bd, 4)
    with pytest.raises(ValueError, match=r"b_dec must have shape \[8\], got \[20\]"):
        ss.sae_forward(x, W, b, Wd, b, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, S=20\], got 21"):
        ss.sae_forward(x, W, b, Wd, bd, 21)
    with pytest.raises(TypeError, match="W_dec must have dtype torch.float32 like x"):
        ss.sae_forward(x, W, b, Wd.double(), bd, 4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tied", [False, True])
def test_sae_forward_loss_on_the_code_alone(backend, tied):
    """A loss on the values only (an L1 penalty, say): the encoder gets its gradient, W_dec
    and b_dec get zeros (tied: b_dec gets b_pre's share), as on the float64 torch backend."""
    dt = dtype_for(backend)
    dev = "cuda" if backend == "triton" and not _triton.interpreting() else "cpu"
    g = torch.Generator().manual_seed(8)
    W_enc, W_dec = torch.randn(2, 90, 12, generator=g, dtype=torch.float64) / 4
    b_enc, b_dec = 0.1 * torch.randn(90, generator=g, dtype=torch.float64), torch.zeros(12)
    x = torch.randn(6, 12, generator=g, dtype=torch.float64)
    grads = {}
    for be, d in ((backend, dt), ("torch", torch.float64)):
        ps = [t.to(dev if be == backend else "cpu", d).requires_grad_()
              for t in (W_enc, b_enc, W_dec, b_dec.double())]
        sae = ss.SAE(*ps, 5, b_pre=ps[3] if tied else None)
        _, v, _ = sae(x.to(ps[0].device, d), backend=be, return_code=True)
        v.sum().backward()
        grads[be] = [p.grad.cpu().double() if p.grad is not None else None for p in ps]
    for a, b in zip(grads[backend], grads["torch"]):
        if b is None or not b.any():
            assert a is None or not a.any()
        else:
            assert_close(a, b, rtol=1e-4, atol=1e-6, name="grad")
