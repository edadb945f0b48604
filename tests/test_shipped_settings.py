"""The fused triton Functions (``FusedSAEEdit`` through ``sae_edit``, ``FusedSAEForward`` through
``sae_forward``) at the settings a GPU runs -- the interpreter reads the same tables -- on
shapes one below, at and one above the shipped tiles (128 rows, 128 latents, 64 columns of
D), a dictionary narrower than one tile, k on both sides of the main path's top-m limit,
grids with fewer programs than tiles, and a dictionary wide enough for latent chunks; fp32
and bf16, every gradient, against the float64 reference."""
import os

import pytest
import torch

import sae_sparse as ss
from sae_sparse.triton import encode as _enc

from helpers import assert_close

pytestmark = pytest.mark.skipif(
    "triton" not in ss.available_backends()
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton and a GPU or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BN, BS, BD = _enc.ENCODE["block_n"], _enc.ENCODE["block_s"], _enc.ENCODE["block_d"]
# max |error| / max |reference| per tensor, by dtype (bf16 rounds inputs, outputs and stored
# gradients; fp32 sums in a different order)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
NEAR_TIE = {torch.float32: 2.0 ** -14, torch.bfloat16: 2.0 ** -8}


def _plan_flip(S, D):
    """The k at which the main path (per-tile candidates) gives way to the fallback."""
    k = 1
    while _enc._plan(k + 1, S, D) is not None:
        k += 1
    return k


SHAPES = [
    pytest.param(7, 33, 1000, 7, id="N7-D33-S1000-k7"),
    pytest.param(BN + 1, BD + 1, 2 * BS + 1, 16, id="above-tiles"),
    pytest.param(BN, BD, 2 * BS, 8, id="at-tiles"),
    pytest.param(BN - 1, BD - 1, 2 * BS - 1, 11, id="below-tiles"),
    pytest.param(3, 17, BS - 28, 5, id="S-below-one-tile"),
    pytest.param(1, 40, 8 * BS + 3, _plan_flip(8 * BS + 3, 40) - 1, id="N1-main-path-last-k"),
    pytest.param(5, 40, 8 * BS + 3, _plan_flip(8 * BS + 3, 40), id="fallback-first-k"),
]


def _modules(N, D, S, k, dtype, threshold=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = ss.SAE.random(D, S, k, b_pre=True, threshold=threshold, generator=g)
    ad = ss.LatentAdapter(S, 6, activation="gelu")
    with torch.no_grad():
        sae.W_enc.mul_(1 + 0.5 * torch.rand(S, 1, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(S, generator=g))
        for p in ad.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    sae = sae.to(DEVICE, dtype)
    x = _without_near_ties(torch.randn(N, D, generator=g).to(dtype), sae, g)
    return sae, ad.to(DEVICE), x.to(DEVICE)


def _without_near_ties(x, sae, g):
    """x with each row redrawn until its k-th and (k+1)-th pre-activations (float64, of
    the values in sae's dtype) differ by more than NEAR_TIE of the row's largest: the fused
    path ranks fp32 sums of x - b_pre rounded to x's dtype (bf16: 2^-9 relative per
    element), the reference exact ones, so rows tied closer than that may select another
    latent on either (exact ties have their own tests)."""
    W, b = sae.W_enc.detach().double().cpu(), sae.b_enc.detach().double().cpu()
    bp = sae.b_pre.detach().double().cpu()
    for _ in range(20):
        pre = (x.double() - bp) @ W.T + b
        top = pre.topk(min(sae.k + 1, pre.shape[1]), dim=1).values
        gap = (top[:, -2] - top[:, -1]) if top.shape[1] > sae.k else top[:, -1].abs() + 1
        close = gap <= NEAR_TIE[x.dtype] * top[:, 0].abs()
        if not close.any():
            return x
        x[close] = torch.randn(int(close.sum()), x.shape[1], generator=g).to(x.dtype)
    raise AssertionError("could not draw rows without near-ties")


def _double(sae, ad, x):
    """float64 copies of the same values (the tie of b_pre to b_dec kept)."""
    W_enc, b_enc, W_dec, b_dec = (t.detach().double().cpu()
                                  for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    thr = sae.threshold.double().cpu() if sae.threshold is not None else None
    return (ss.SAE(W_enc, b_enc, W_dec, b_dec, sae.k, b_pre=b_dec, threshold=thr),
            _copy_adapter(ad), x.detach().double().cpu())


def _copy_adapter(ad):
    out = ss.LatentAdapter(ad.d_sae, ad.hidden, activation=ad.activation, dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(out.parameters(), ad.parameters()):
            p.copy_(q)
    return out


def _check_step(run, sae, ad, x, dtype):
    """run(sae, adapter, x, backend) -> outputs; the fused run against the float64 torch
    backend: outputs, and the gradients of x and every parameter."""
    sae64, ad64, x64 = _double(sae, ad, x)
    x, x64 = x.requires_grad_(), x64.requires_grad_()
    out = _by_latent(run(sae, ad, x, "triton"))
    ref = _by_latent(run(sae64, ad64, x64, "torch"))
    g = torch.Generator().manual_seed(9)
    w = [torch.randn(r.shape, generator=g, dtype=torch.float64)
         for r in ref if r.is_floating_point()]
    for o, r in zip(out, ref):
        if not r.is_floating_point():
            assert torch.equal(o.cpu(), r), "indices"
    floats = [(o, r) for o, r in zip(out, ref) if r.is_floating_point()]
    for (o, r), wi in zip(floats, w):
        assert_close(o.cpu(), r, rtol=0, atol=TOL[dtype] * r.abs().max().item(), name="output")
    sum((o.double().cpu() * wi).sum() for (o, _), wi in zip(floats, w)).backward()
    sum((r * wi).sum() for (_, r), wi in zip(floats, w)).backward()
    pairs = [("x", x, x64)]
    for mine, ref_m in ((sae, sae64), (ad, ad64)):
        theirs = dict(ref_m.named_parameters())
        pairs += [(n, p, theirs[n]) for n, p in mine.named_parameters() if p.requires_grad]
    for n, p, p0 in pairs:
        if p0.grad is None:  # e.g. the adapter of an SAE step
            assert p.grad is None, n
            continue
        assert p.grad is not None, f"no gradient for {n}"
        assert_close(p.grad.cpu(), p0.grad, rtol=0,
                     atol=TOL[dtype] * p0.grad.abs().max().item(), name=f"d{n}")


def _by_latent(outs):
    """A code (values, indices) in order of latent index: entries tied within rounding may
    come in either order (the selected set may not differ: _without_near_ties)."""
    if len(outs) < 3:
        return outs
    y, v, i = outs
    i, order = i.sort(1)
    return y, v.gather(1, order), i


def _edit(mode):
    return lambda sae, ad, x, backend: (ss.sae_edit(x, sae, ad, mode=mode, backend=backend),)


def _forward(sae, ad, x, backend):
    y, v, i = ss.sae_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.k,
                             b_pre=sae.b_pre, threshold=sae.threshold, backend=backend)
    return y, v, i


@pytest.mark.parametrize("N,D,S,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["edit-delta", "edit-replace", "forward", "forward-jumprelu"])
@pytest.mark.quick_ids("edit-delta-fp32-N7-D33-S1000-k7", "forward-bf16-N7-D33-S1000-k7",
                       "edit-replace-bf16-above-tiles")
def test_fused_functions_at_the_shipped_settings(N, D, S, k, dtype, op):
    sae, ad, x = _modules(N, D, S, k, dtype, threshold=op == "forward-jumprelu")
    run = _forward if op.startswith("forward") else _edit(op.split("-")[1])
    _check_step(run, sae, ad, x, dtype)


@pytest.mark.exhaustive
@pytest.mark.parametrize("sms", [1, 3])
def test_persistent_grids_with_fewer_programs_than_tiles(monkeypatch, sms):
    """The encode GEMMs and the fold split their tiles over SM-count programs: with 1 or 3
    SMs each program loops over several tiles (as on a GPU at real shapes)."""
    monkeypatch.setenv("SAE_SPARSE_INTERPRET_SMS", str(sms))
    sae, ad, x = _modules(2 * BN + 5, BD + 1, 4 * BS + 9, 8, torch.bfloat16)
    _check_step(_edit("delta"), sae, ad, x, torch.bfloat16)


@pytest.mark.exhaustive
def test_latent_chunks_at_the_shipped_candidate_limit():
    """A dictionary wider than one candidate select (ENCODE["max_candidates"] as shipped):
    encoded in latent chunks whose top-k lists merge, exact against float64."""
    D, k = 16, 3
    S = 4100 * BS
    plan = _enc._plan(k + 1, S, D)
    assert plan is not None and len(plan[1]) >= 2
    g = torch.Generator().manual_seed(5)
    W = torch.randn(S, D, generator=g)
    b = 0.1 * torch.randn(S, generator=g)
    x = torch.randn(3, D, generator=g)
    v, i = ss.topk_encode(x.to(DEVICE), W.to(DEVICE), b.to(DEVICE), k, backend="triton")
    v0, i0 = ss.topk_encode(x.double(), W.double(), b.double(), k, backend="torch")
    assert torch.equal(i.cpu(), i0)
    assert_close(v.cpu(), v0, rtol=1e-5, atol=1e-5, name="values")
