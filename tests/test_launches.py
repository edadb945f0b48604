"""The launch budget of a training step on the triton backend (DESIGN.md, STYLE.md 13).

Counted on the CPU under TRITON_INTERPRET=1 with the torch profiler: Triton kernel launches;
every other compute op (leaf aten ops at every depth, views and allocations excluded; the
interpreter's own copies of a kernel's arguments excluded, but casts a launcher makes count);
host syncs (ops that read a value back or have a data-dependent output size). On a GPU each
op is a launch and a pass over memory, and each sync stalls the CPU behind the GPU. The test's
own loss and backward seed are in the count (about 7 ops).
"""
import collections
import os

import pytest
import torch

import sae_sparse as ss

pytestmark = pytest.mark.skipif(
    "triton" not in ss.available_backends() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="counts launches under the Triton interpreter")

FREE = {  # views, metadata and allocations: no kernel on a GPU
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::slice",
    "aten::select", "aten::t", "aten::transpose", "aten::expand", "aten::unsqueeze",
    "aten::squeeze", "aten::permute", "aten::detach", "aten::alias", "aten::split",
    "aten::unbind", "aten::lift_fresh", "aten::view_as", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
    "aten::contiguous", "aten::to", "aten::_has_compatible_shallow_copy_type", "aten::set_",
    "aten::resize_", "aten::as_strided_", "aten::new_empty", "aten::new_empty_strided"}
SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero",
         "aten::equal", "aten::masked_select", "aten::repeat_interleave", "aten::_unique2",
         "aten::unique_consecutive", "aten::unique_dim", "aten::index_put_", "aten::index"}


def count(step):
    """(Triton launches by kernel, other compute ops by name, syncs) of step()."""
    import triton.runtime.interpreter as interp
    from torch.profiler import ProfilerActivity, profile, record_function
    launches = collections.Counter()
    real = interp.GridExecutor.__call__

    def launch(self, *a, **k):
        launches[self.fn.__name__] += 1
        with record_function("triton_launch"):
            return real(self, *a, **k)

    interp.GridExecutor.__call__ = launch
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        interp.GridExecutor.__call__ = real
    events = prof.events()
    inside = set()  # ops the interpreter ran for a launch (copies of its arguments)

    def mark(e):
        for c in e.cpu_children:
            inside.add(id(c))
            mark(c)
    for e in events:
        if e.name == "triton_launch":
            mark(e)
    ops, syncs = collections.Counter(), []
    for e in events:
        if not e.name.startswith("aten::") or id(e) in inside:
            continue
        if e.name in SYNCS:
            syncs.append(e.name)
        leaf = not any(c.name.startswith("aten::") for c in e.cpu_children)
        if leaf and e.name not in FREE:
            ops[e.name] += 1
    return launches, ops, syncs


def _edit_step(N):
    """A frozen bf16 SAE, an fp32 gain + bias + ffn:16 adapter, x trains (D=48 S=640 k=8;
    N=64 is the issue's shape)."""
    D, S, k = 48, 640, 8
    sae = ss.SAE.random(D, S, k, dtype=torch.bfloat16).requires_grad_(False)
    ad = ss.LatentAdapter(S, 16)
    x = torch.randn(N, D).bfloat16().requires_grad_(True)

    def step():
        loss = ss.sae_edit(x, sae, ad, backend="triton").float().square().mean()
        loss.backward()
    return step, (x, ad)


def _sae_step(N):
    """A TopK SAE training step, fp32 (SAE.forward, MSE)."""
    D, S, k = 48, 640, 8
    sae = ss.SAE.random(D, S, k)
    x = torch.randn(N, D)

    def step():
        loss = (sae(x, backend="triton") - x).square().sum(-1).mean()
        loss.backward()
    return step, (sae,)


@pytest.mark.parametrize("N", [16, 64])
@pytest.mark.parametrize("which,max_triton,max_other", [
    ("edit", 10, 16),
    ("sae", 9, 14),
])
@pytest.mark.quick_ids("edit-10-16-16", "sae-9-14-16")  # the counts do not depend on N
def test_training_step_launch_budget(monkeypatch, which, max_triton, max_other, N):
    import conftest  # count the op's own fills, not the test suite's poisoning of torch.empty
    monkeypatch.setattr(torch, "empty", conftest._empty)
    monkeypatch.setattr(torch, "empty_like", conftest._empty_like)
    step, params = _edit_step(N) if which == "edit" else _sae_step(N)
    step()  # first call: compiles in the interpreter, fills caches
    for p in params:
        for t in (p.parameters() if isinstance(p, torch.nn.Module) else [p]):
            t.grad = None
    launches, ops, syncs = count(step)
    n_tr, n_ops = sum(launches.values()), sum(ops.values())
    report = f"{which}: {n_tr} Triton {dict(launches)}; {n_ops} other {dict(ops)}; syncs {syncs}"
    print(report)
    assert syncs == [], report
    assert n_tr <= max_triton, report
    assert n_ops <= max_other, report
    # and the step trained something: every parameter that requires a gradient has one
    for p in params:
        for t in (p.parameters() if isinstance(p, torch.nn.Module) else [p]):
            if t.requires_grad:
                assert t.grad is not None and torch.isfinite(t.grad).all()
