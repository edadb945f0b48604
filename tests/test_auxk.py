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

    Wd, b_dec, none = torch.randn(20, 8), torch.randn(8), torch.zeros(20, dtype=torch.bool)
    assert torch.equal(ss.auxk_decode(x, W, b, Wd, none, 4), torch.zeros(2, 3, 8))
    assert torch.equal(ss.auxk_decode(x, W, b, Wd, none, 4, b_dec=b_dec), b_dec.expand(2, 3, 8))
    dead = torch.ones(20, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"W_dec must have shape \[20, 8\], got \[8, 20\]"):
        ss.auxk_decode(x, W, b, Wd.T, dead, 4)
    with pytest.raises(ValueError, match=r"b_dec must have shape \[8\]"):
        ss.auxk_decode(x, W, b, Wd, dead, 4, b_dec=torch.zeros(20))
    with pytest.raises(TypeError, match="W_dec must have dtype torch.float32 like x"):
        ss.auxk_decode(x, W, b, Wd.double(), dead, 4)
    with pytest.raises(TypeError, match="dead_mask must have dtype torch.bool"):
        ss.auxk_decode(x, W, b, Wd, dead.float(), 4)
    with pytest.raises(ValueError, match="k_aux must be an int >= 1"):
        ss.auxk_decode(x, W, b, Wd, dead, True)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        ss.auxk_decode(torch.full((2, 8), float("nan")), W, b, Wd, dead, 4)


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


def test_auxk_decode_gives_sparsifys_auxk_loss():
    """The README's drop-in: sparsify's AuxK loss (its encoder reads x - b_dec, its decode adds
    b_dec) through ss.auxk_decode on a training loop's own tensors, b_dec passed as b_pre
    too: the loss and the gradients of W_enc, b_enc, W_dec, b_dec as sparsify computes them
    from its dense pre-activations."""
    g = torch.Generator().manual_seed(11)
    N, D, S = 29, 18, 250
    p = dict(W_enc=torch.randn(S, D, generator=g, dtype=torch.float64) / D ** 0.5,
             b_enc=0.2 * torch.randn(S, generator=g, dtype=torch.float64),
             W_dec=torch.randn(S, D, generator=g, dtype=torch.float64) / D ** 0.5,
             b_dec=0.1 * torch.randn(D, generator=g, dtype=torch.float64))
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    e = torch.randn(N, D, generator=g, dtype=torch.float64)  # the main residual, detached
    dead = torch.rand(S, generator=g) < 0.2
    k_aux = D // 2
    scale = min(int(dead.sum()) / k_aux, 1.0)
    total_variance = (x - x.mean(0)).pow(2).sum()

    def loss(e_hat):
        return scale * (e_hat - e).pow(2).sum() / total_variance

    ts = {n: t.clone().requires_grad_() for n, t in p.items()}
    ours = loss(ss.auxk_decode(x, ts["W_enc"], ts["b_enc"], ts["W_dec"], dead, k_aux,
                               b_pre=ts["b_dec"], b_dec=ts["b_dec"]))
    g1 = torch.autograd.grad(ours, list(ts.values()))
    ts = {n: t.clone().requires_grad_() for n, t in p.items()}
    pre_acts = F.relu(F.linear(x - ts["b_dec"], ts["W_enc"], ts["b_enc"]))
    acts, idx = torch.where(dead, pre_acts, float("-inf")).topk(min(k_aux, int(dead.sum())))
    e_hat = F.embedding_bag(idx, ts["W_dec"], per_sample_weights=acts, mode="sum") + ts["b_dec"]
    ref = loss(e_hat)
    g0 = torch.autograd.grad(ref, list(ts.values()))
    torch.testing.assert_close(ours, ref)
    for n, a, b in zip(p, g1, g0):
        torch.testing.assert_close(a, b, msg=lambda m: f"{n}: {m}")


def dense_auxk_decode(x, W, b, Wd, dead, k_aux, b_pre=None, b_dec=None):
    """e_hat by definition: sparsify's AuxK selection decoded densely (N x S code)."""
    pre, idx = dense_auxk(x, W, b, dead, k_aux, b_pre)
    code = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype).scatter(1, idx, pre.relu())
    return code @ Wd + (b_dec if b_dec is not None else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,n_dead,k_aux,chunk_bytes", [
    # rows per chunk = chunk_bytes // (2 * n_dead * element size)
    (23, 41, 9, None),      # one row chunk
    (23, 41, 9, 41 * 8),    # 1 row per chunk (fp64, fp32), 2 (bf16: fp32 weight-grad sums)
    (23, 41, 9, 7 * 41 * 8 * 2),  # 7 / 14 / 28 rows (fp64 / fp32 / bf16): short last chunks
    (1, 5, 9, None),        # N = 1; k_aux clamped to n_dead
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_auxk_decode_matches_the_dense_definition(monkeypatch, backend, N, n_dead, k_aux,
                                                  chunk_bytes, dtype):
    """e_hat and the gradients of x, W_enc, b_enc, W_dec, b_pre, b_dec against float64,
    with the dense code chunked by rows; rows of live latents get exactly zero gradient."""
    import sae_sparse._auxk as auxk
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton kernels take fp32/bf16/fp16")
    if chunk_bytes is not None:
        monkeypatch.setattr(auxk, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(N * 100 + n_dead)
    D, S = 19, 301
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(S, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = 0.5 * torch.randn(S, generator=g, dtype=torch.float64)
    Wd = torch.randn(S, D, generator=g, dtype=torch.float64) / D ** 0.5
    b_pre = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    b_dec = torch.randn(D, generator=g, dtype=torch.float64)
    dead = torch.zeros(S, dtype=torch.bool)
    dead[torch.randperm(S, generator=g)[:n_dead]] = True
    gy = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    device = DEVICE if backend == "triton" else "cpu"
    ins = (x, W, b, Wd, b_pre, b_dec)

    ts = [t.to(device, dtype).requires_grad_() for t in ins]
    out = ss.auxk_decode(ts[0], ts[1], ts[2], ts[3], dead.to(device), k_aux, b_pre=ts[4],
                         b_dec=ts[5], backend=backend)
    assert out.dtype == dtype and out.shape == (N, D)
    (out * gy.to(device)).sum().backward()

    # The reference selects on the low-precision inputs' exact values, as the kernels do.
    ref = [t.to(dtype).double().requires_grad_() for t in ins]
    e0 = dense_auxk_decode(ref[0], ref[1], ref[2], ref[3], dead, k_aux, ref[4], ref[5])
    (e0 * gy.double()).sum().backward()
    # Relative to each tensor's largest entry: bf16 rounds the GEMM outputs and the dense
    # code's gradient (2^-8 each); fp32 sums of 19..41 terms; fp64 exact up to summation.
    rel = {torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]

    def close(a, e, name):
        torch.testing.assert_close(a.cpu().double(), e, rtol=rel,
                                   atol=rel * float(e.abs().max()), msg=lambda m: f"{name}: {m}")

    close(out, e0.detach(), "e_hat")
    for name, a, e in zip(("x", "W_enc", "b_enc", "W_dec", "b_pre", "b_dec"), ts, ref):
        assert a.grad is not None, name
        close(a.grad, e.grad, name)
    for name, t in (("W_enc", ts[1]), ("b_enc", ts[2]), ("W_dec", ts[3])):
        assert not t.grad.cpu()[~dead].any(), f"{name}: a live latent's row got a gradient"


def test_auxk_decode_equals_the_sparse_composition():
    """Same latents as auxk_encode; e_hat and every gradient as sparse_decode of them, leading
    dims kept, on an SAE module with a tied b_pre."""
    torch.manual_seed(3)
    sae = ss.SAE.random(d_in=24, d_sae=333, k=5, b_pre=True, dtype=torch.float64)
    sae.requires_grad_(True)
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    dead = torch.rand(333) < 0.4
    gy = torch.randn(2, 9, 24, dtype=torch.float64)
    params = [x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    e1 = sae.auxk_decode(x, dead, 12)
    g1 = torch.autograd.grad((e1 * gy).sum(), params)
    e0 = sae.decode(*sae.auxk_encode(x, dead, 12))
    g0 = torch.autograd.grad((e0 * gy).sum(), params)
    assert e1.shape == x.shape
    torch.testing.assert_close(e1, e0, rtol=1e-12, atol=1e-12)
    for name, a, e in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), g1, g0):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


def test_auxk_decode_keeps_only_row_chunks_of_the_dense_code(monkeypatch):
    """Forward + backward at n_dead = 12000 allocate no N x n_dead tensor: the peak is the
    compact dead rows, the chunks within CHUNK_BYTES and the outputs / gradients."""
    import sae_sparse._auxk as auxk
    from helpers import LiveBytes
    monkeypatch.setattr(auxk, "CHUNK_BYTES", 1 << 20)
    N, D, S, n_dead, k_aux = 2048, 8, 16000, 12000, 4
    x = torch.randn(N, D, requires_grad=True)
    W = (torch.randn(S, D) / D ** 0.5).requires_grad_()
    b, Wd = torch.zeros(S, requires_grad=True), torch.randn(S, D, requires_grad=True)
    dead = torch.zeros(S, dtype=torch.bool)
    dead[:n_dead] = True
    backend = "cpp" if "cpp" in ss.available_backends() else "torch"
    with LiveBytes(x, W, b, Wd, dead) as mem:
        ss.auxk_decode(x, W, b, Wd, dead, k_aux, backend=backend).pow(2).sum().backward()
    dense = N * n_dead * 4  # 98 MB: one dense code for all rows
    params = 2 * (S * D * 4) + S * 4 + N * D * 4  # grads of W, Wd, b, x
    compact = 2 * n_dead * D * 4 + n_dead * 4  # gathered dead rows
    # 2.9 MB when written (the selection's [N, k_aux] values and indices are small here)
    assert mem.peak < (1 << 20) + params + compact + (1 << 20), mem.peak
    assert mem.peak < dense / 30


def test_auxk_decode_sums_bf16_weight_gradients_over_row_chunks_in_fp32(monkeypatch):
    """1024 row chunks of one row, each adding ~1 to every entry of dW_enc / db_enc / dW_dec:
    a bf16 running sum would stall at 256 (its spacing there is 2); the fp32 sums do not."""
    import sae_sparse._auxk as auxk
    monkeypatch.setattr(auxk, "CHUNK_BYTES", 1)
    N, D, S = 1024, 4, 6
    x = (1 + 0.1 * torch.rand(N, D)).to(torch.bfloat16)
    W = torch.full((S, D), 0.25, dtype=torch.bfloat16, requires_grad=True)
    b = torch.ones(S, dtype=torch.bfloat16, requires_grad=True)
    Wd = torch.full((S, D), 0.25, dtype=torch.bfloat16, requires_grad=True)
    dead = torch.tensor([True, False, True, True, False, True])
    ss.auxk_decode(x, W, b, Wd, dead, 4, backend="torch").sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (W, b, Wd)]
    dense_auxk_decode(x.double(), ref[0], ref[1], ref[2], dead, 4).sum().backward()
    for name, a, e in zip(("W_enc", "b_enc", "W_dec"), (W, b, Wd), ref):
        assert e.grad[dead].min() > 500, name  # the test's premise
        torch.testing.assert_close(a.grad.double(), e.grad, rtol=1e-2, atol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_auxk_without_relu_takes_raw_pre_activations(backend):
    """relu=False (SAELens's TopK AuxK): the selected dead latents' pre-activations as they
    are, negative ones included, with gradients through all of them; auxk_encode and
    auxk_decode both against the dense definition."""
    g = torch.Generator().manual_seed(5)
    N, D, S, k_aux = 9, 14, 120, 12
    dt = torch.float64 if backend != "triton" else torch.float32
    dev = DEVICE if backend == "triton" else "cpu"
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(S, D, generator=g, dtype=torch.float64) / D ** 0.5
    Wd = torch.randn(S, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = 0.5 * torch.randn(S, generator=g, dtype=torch.float64) - 1.0  # many negatives
    b_pre = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    dead = torch.rand(S, generator=g) < 0.4
    w_v = torch.randn(N, k_aux, generator=g, dtype=torch.float64)
    w_y = torch.randn(N, D, generator=g, dtype=torch.float64)
    tol = dict(rtol=1e-4, atol=1e-5) if dt == torch.float32 else dict(rtol=1e-9, atol=1e-10)

    ref = [t.clone().requires_grad_() for t in (x, W, b, b_pre, Wd)]
    pre, i0 = dense_auxk(*ref[:3], dead, k_aux, ref[3])
    assert (pre < 0).any()  # the case has negative picks
    z = torch.zeros(N, S, dtype=torch.float64).scatter(1, i0, pre)
    ((pre * w_v).sum() + ((z @ ref[4]) * w_y).sum()).backward()

    ts = [t.detach().to(dev, dt).requires_grad_() for t in (x, W, b, b_pre, Wd)]
    v, i = ss.auxk_encode(*ts[:3], dead.to(dev), k_aux, b_pre=ts[3], backend=backend,
                          relu=False)
    e_hat = ss.auxk_decode(*ts[:3], ts[4], dead.to(dev), k_aux, b_pre=ts[3], backend=backend,
                           relu=False)
    assert torch.equal(i.cpu(), i0)
    torch.testing.assert_close(v.cpu().double(), pre.detach(), **tol)
    torch.testing.assert_close(e_hat.cpu().double(), (z @ Wd).detach(), **tol)
    ((v * w_v.to(dev, dt)).sum() + (e_hat * w_y.to(dev, dt)).sum()).backward()
    for n, a, e in zip(("x", "W_enc", "b_enc", "b_pre", "W_dec"), ts, ref):
        torch.testing.assert_close(a.grad.cpu().double(), e.grad, **tol, msg=n)
