"""Shared builders for the op tests."""
from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sae_sparse import reference as R

GRAD_NAMES = ("x", "W_enc", "b_enc", "b_pre", "W_dec", "b_dec", "gain", "bias", "W_in", "b_in",
              "W_out")


def make_case(N, D, S, k, *, dtype=torch.float64, b_pre=False, threshold=False, tied=False,
              gain=True, bias=True, ffn=True, h=5, seed=0):
    """Random SAE + adapter tensors (all requiring grad) with non-zero adapter weights."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    t = dict(
        x=rnd(N, D),
        W_enc=rnd(S, D, scale=D ** -0.5),
        b_enc=rnd(S, scale=0.1),
        W_dec=rnd(S, D, scale=D ** -0.5),
        b_dec=rnd(D, scale=0.1),
    )
    if b_pre and not tied:
        t["b_pre"] = rnd(D, scale=0.1)
    if threshold:
        # Thresholds around the typical selected pre-activation so that some selected
        # entries fall below them.
        t["threshold"] = (rnd(S, scale=0.3).abs() + 0.5).to(dtype)
    if gain:
        t["gain"] = rnd(S, scale=0.5)
    if bias:
        t["bias"] = rnd(S, scale=0.5)
    if ffn:
        t["W_in"] = rnd(S, h)
        t["b_in"] = rnd(h, scale=0.1)
        t["W_out"] = rnd(h, S, scale=0.5)
    for name, v in t.items():
        if name != "threshold":
            v.requires_grad_(True)
    if tied:
        t["b_pre"] = t["b_dec"]
    return t


def adapter_kw(t):
    return {n: t[n] for n in ("gain", "bias", "W_in", "b_in", "W_out") if n in t}


def grads_of(out, inputs: dict, seed=1):
    """Gradients of a random linear functional of `out` w.r.t. every input requiring grad."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    names = [n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    uniq, seen = [], set()
    for n in names:  # tied tensors appear once
        if id(inputs[n]) not in seen:
            seen.add(id(inputs[n]))
            uniq.append(n)
    gs = torch.autograd.grad((out * w).sum(), [inputs[n] for n in uniq], allow_unused=True)
    return {n: (gr if gr is not None else torch.zeros_like(inputs[n])) for n, gr in zip(uniq, gs)}


def dense_forward(t, k, mode, activation="relu"):
    """Brute-force definition of encode + edit + decode (float64, N x S)."""
    v, i, _ = R.dense_topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t.get("b_pre"),
                                  t.get("threshold"))
    return R.dense_sae_edit(t["x"], v, i, t["W_dec"], t["b_dec"], activation=activation,
                            mode=mode, **adapter_kw(t))


def assert_close(actual, expected, *, rtol, atol, name=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


def full_op(t, k, mode, activation, backend, *, overflow=False):
    """topk_encode + edit_decode on a case from :func:`make_case`; -> (values, indices, y),
    and the number of rows with more than k active latents with ``overflow``."""
    from sae_sparse import edit_decode, topk_encode

    v, i, n = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, b_pre=t.get("b_pre"),
                          threshold=t.get("threshold"), backend=backend, return_overflow=True)
    y = edit_decode(t["x"], v, i, t["W_dec"], t["b_dec"], activation=activation, mode=mode,
                    backend=backend, **adapter_kw(t))
    return (v, i, y, int(n)) if overflow else (v, i, y)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while the mode is active, each counted
    until the last tensor seen on it dies; storages of ``existing`` tensors are not counted.
    The allocation plan of host code, not an allocator's (which rounds sizes up)."""

    def __init__(self, *existing):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.refs = {}  # storage pointer -> [bytes, tensors alive on it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out

    def _see(self, t):
        st = t.untyped_storage()
        p, n = st.data_ptr(), st.nbytes()
        if p in self.skip or n == 0:
            return
        entry = self.refs.get(p)
        if entry is None:
            entry = self.refs[p] = [n, 0]
            self.now += n
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._gone, p)

    def _gone(self, p):
        entry = self.refs[p]
        entry[1] -= 1
        if entry[1] == 0:
            del self.refs[p]
            self.now -= entry[0]
