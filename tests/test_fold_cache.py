"""ss.cached_folds(): an adapter's dense terms (M = W_out W_dec, c = bias W_dec) computed once
and reused across inference calls, refolded whenever a source tensor changes."""
import pytest
import torch
from torch import nn

import sae_sparse as ss
from sae_sparse import _autograd, backends, reference
from sae_sparse import triton as _triton

from tiny_models import tiny_llama

BACKENDS = [b for b in ("torch", "cpp", "triton") if b in ss.available_backends()
            and (b != "triton" or _triton.interpreting() or torch.cuda.is_available())]


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def count_folds(monkeypatch, backend):
    """Patches the backend's fold of W_dec (cached or not) to count its calls."""
    calls = []

    def counted(f):
        return lambda *a, **kw: calls.append(1) or f(*a, **kw)

    if backend == "torch":  # called by the decode itself and, on a cache miss, by the cache
        f = counted(reference.fold_edit_torch)
        monkeypatch.setattr(reference, "fold_edit_torch", f)
        monkeypatch.setitem(backends._FOLD, "torch", f)
    elif backend == "cpp":  # the C++ library has no fold: _Fold runs torch's
        monkeypatch.setattr(_autograd, "fold_torch", counted(_autograd.fold_torch))
    else:  # the composed ops (inside the context) and the fused sae_edit (outside it)
        from sae_sparse.triton import functions
        monkeypatch.setattr(_triton, "fold", counted(_triton.fold))
        monkeypatch.setattr(functions, "fold", counted(functions.fold))
    return calls


def make(backend, S=300, D=24, k=5, seed=0):
    dev = _device(backend)
    g = torch.Generator().manual_seed(seed)
    sae = ss.SAE.random(D, S, k, b_pre=True, generator=g, device=dev).requires_grad_(False)
    mask = torch.rand(S, generator=g) < 0.7
    ad = ss.LatentAdapter(S, 4, latent_mask=mask, device=dev)
    with torch.no_grad():
        for p in (ad.gain, ad.bias, ad.W_out, ad.b_in):
            p.copy_(torch.randn(p.shape, generator=g))
    return sae, ad, torch.randn(3, 4, D, generator=g).to(dev)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.quick_ids("torch", "cpp")  # triton: ~30 s in the interpreter
def test_cached_folds_reuse_and_refold_on_every_change(monkeypatch, backend):
    sae, ad, x = make(backend)
    calls = count_folds(monkeypatch, backend)

    def edit():
        return ss.sae_edit(x, sae, ad, backend=backend)

    with torch.no_grad():
        ref = edit()
        edit()
        assert len(calls) == 2  # no context: a fold per call
        with ss.cached_folds():
            outs = [edit() for _ in range(3)]
            assert len(calls) == 3  # one fold, reused
            for y in outs:
                assert torch.equal(y, ref)

            changes = {
                "in-place update (an optimizer step)": lambda: ad.bias.add_(0.5),
                "load_state_dict": lambda: ad.load_state_dict(
                    {**ad.state_dict(), "W_out": torch.randn_like(ad.W_out)}),
                "the SAE's decoder": lambda: sae.W_dec.mul_(1.5),
                "the latent mask": lambda: ad.latent_mask.logical_not_(),
                "a new Parameter object": lambda: setattr(
                    ad, "W_out", nn.Parameter(ad.W_out.detach() * 2)),
            }
            for what, change in changes.items():
                change()
                n = len(calls)
                y = edit()
                assert len(calls) == n + 1, f"no refold after {what}"
                with _no_cache():
                    assert torch.equal(y, edit()), f"stale fold after {what}"
                n = len(calls)
                edit()
                assert len(calls) == n, f"no reuse after {what}"

            other = ss.LatentAdapter(sae.d_sae, 4, device=x.device)
            other.bias.data.normal_()
            n = len(calls)
            ss.sae_edit(x, sae, other, backend=backend)
            edit()
            assert len(calls) == n + 1  # the other adapter has its own entry
        n = len(calls)
        with ss.cached_folds():
            edit()
        assert len(calls) == n + 1  # the cache ends with the context


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_folds_never_hold_back_a_gradient(monkeypatch, backend):
    """With the adapter trainable and grad enabled every call folds (M and c carry the
    gradient to W_out and bias); with everything frozen the fold is reused and x's gradient
    is the uncached one."""
    sae, ad, x = make(backend)
    calls = count_folds(monkeypatch, backend)
    ref = ss.sae_edit(x, sae, ad, backend=backend)
    ref.square().sum().backward()
    want = {n: p.grad.clone() for n, p in ad.named_parameters()}
    ad.zero_grad()
    n = len(calls)
    with ss.cached_folds():
        for _ in range(2):
            y = ss.sae_edit(x, sae, ad, backend=backend)
        assert len(calls) == n + 2
        y.square().sum().backward()
        # triton: outside the context sae_edit is the fused op, inside it the composed ops
        # (which take the cached fold): the same fp32 sums in another order
        for name, p in ad.named_parameters():
            tol = (dict(rtol=1e-4, atol=1e-5 * want[name].abs().max().item())
                   if backend == "triton" else dict(rtol=1e-5, atol=1e-6))
            torch.testing.assert_close(p.grad, want[name], **tol)

        ad.requires_grad_(False)
        xg = x.clone().requires_grad_()
        ss.sae_edit(xg, sae, ad, backend=backend)
        n = len(calls)
        y = ss.sae_edit(xg, sae, ad, backend=backend)
        assert len(calls) == n
        (dx,) = torch.autograd.grad(y.square().sum(), xg)
    xg = x.clone().requires_grad_()
    (want_dx,) = torch.autograd.grad(ss.sae_edit(xg, sae, ad, backend=backend).square().sum(),
                                     xg)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)


def test_cached_folds_under_inference_mode_and_low_precision():
    """bf16 SAE with an fp32 adapter (cast per call; the cache keys on the fp32 parameters)
    under torch.inference_mode; the entry is kept apart from no_grad's."""
    sae, ad, x = make("torch")
    sae = sae.to(torch.bfloat16)
    with torch.inference_mode():
        ref = ss.sae_edit(x, sae, ad, backend="torch")
        with ss.cached_folds():
            for _ in range(2):
                assert torch.equal(ss.sae_edit(x, sae, ad, backend="torch"), ref)
            with torch.no_grad(), torch.inference_mode(False):
                ss.sae_edit(x, sae, ad, backend="torch")  # no inference tensors leak here


def test_generation_with_cached_folds_matches(monkeypatch):
    """Greedy generation through a hooked Llama: the same tokens with and without the cache,
    and one fold for the whole generation (a call per token without it)."""
    calls = count_folds(monkeypatch, "torch")
    model = tiny_llama()
    sae, ad, _ = make("torch", D=model.config.hidden_size)
    edits = ss.attach(model, {"model.layers.0": (sae, ad)}, backend="torch")
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        n = len(calls)
        with ss.cached_folds():
            got = model.generate(ids, **kw)
        assert n >= kw["max_new_tokens"] and len(calls) == n + 1
        with edits.disabled():
            plain = model.generate(ids, **kw)
    edits.remove()
    assert torch.equal(got, want)
    assert not torch.equal(want, plain)  # the edit changes the generation


class _no_cache:
    """Runs a block outside any cached_folds() context (the uncached reference)."""

    def __enter__(self):
        from sae_sparse import ops
        self.saved = getattr(ops._FOLDS, "entries", None)
        ops._FOLDS.entries = None

    def __exit__(self, *exc):
        from sae_sparse import ops
        ops._FOLDS.entries = self.saved
