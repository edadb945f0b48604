"""compat.patch_sparsify / sparsify_forward against the installed EleutherAI sparsify (1.3.3):
its own SparseCoder.forward on a copy of the same coder is the reference, for the outputs,
the three losses and the gradient of every parameter."""
import copy
import os

import pytest
import torch

import sae_sparse as ss
from sae_sparse.compat import patch_sparsify, sparsify_forward

# sparsify decodes with its own Triton kernel when triton imports (here: the interpreter, which
# it would run for every reference call, and which needs num_latents % 8 == 0); its eager
# path is the same sum, F.embedding_bag
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sparsify = pytest.importorskip("sparsify")
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from sparsify.sparse_coder import ForwardOutput  # noqa: E402

BACKENDS = ss.available_backends()


def make_coder(dtype, d_in=24, S=300, k=7, **cfg):
    """A SparseCoder with every parameter nonzero (its own init zeroes the biases and W_skip)."""
    torch.manual_seed(3)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=S, k=k, **cfg), dtype=dtype)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        if sae.W_skip is not None:
            sae.W_skip.normal_(0, 0.05)
    return sae


def loss_of(out, alpha=0.7):
    """sparsify Trainer's loss."""
    return out.fvu + alpha * out.auxk_loss + out.multi_topk_fvu / 8


def run(sae, x, y, dead):
    out = sae(x, y, dead_mask=dead)
    loss_of(out).backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return out, grads


@pytest.fixture
def forward_calls(monkeypatch):
    """The backends compat.sparsify_forward is called with, one entry per call (the patched
    forwards look it up at call time)."""
    import sae_sparse.compat as compat
    calls = []
    real = compat.sparsify_forward

    def spy(*a, **kw):
        calls.append(kw.get("backend"))
        return real(*a, **kw)

    monkeypatch.setattr(compat, "sparsify_forward", spy)
    return calls


def tol(dtype):
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(),                                     # plain TopK SAE
    dict(dead=0.3),                             # + AuxK over ~90 dead latents (k_aux = 12)
    dict(dead=0.02),                            # + AuxK with fewer dead than k_aux (scale < 1)
    dict(dead=0.3, multi_topk=True),            # + Multi-TopK (4k latents)
    dict(skip_connection=True, dead=0.3),
    dict(transcode=True, dead=0.3),             # target y != x; encoder reads x itself
], ids=["topk", "auxk", "auxk-few-dead", "multi-topk", "skip", "transcoder"])
@pytest.mark.quick_ids(*(f"{c}-{b}" for c in ("topk", "auxk", "auxk-few-dead", "multi-topk",
                                              "skip", "transcoder") for b in ("torch", "cpp")),
                       "auxk-triton")
def test_sparsify_forward_matches_sparsify(backend, case):
    case = dict(case)
    frac = case.pop("dead", None)
    dtype = torch.float32 if backend == "triton" else torch.float64
    ref = make_coder(dtype, **case)
    ours = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(5)
    N = 37
    x = torch.randn(N, 24, generator=g, dtype=dtype)
    y = torch.randn(N, 24, generator=g, dtype=dtype) if case.get("transcode") else None
    dead = (torch.rand(300, generator=g) < frac) if frac else None
    if frac:
        assert int(dead.sum()) > 0

    o0, g0 = run(ref, x, y, dead)
    with patch_sparsify(ours, backend=backend):
        o1, g1 = run(ours, x, y, dead)
    assert isinstance(o1, ForwardOutput)
    t = tol(dtype)
    # the same latents (sparsify's top-k is unsorted, ours descending)
    i0, order = o0.latent_indices.sort(1)
    i1, order1 = o1.latent_indices.sort(1)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(o1.latent_acts.gather(1, order1),
                               o0.latent_acts.gather(1, order), **t)
    for name in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(o1, name), getattr(o0, name), **t,
                                   msg=lambda m: f"{name}: {m}")
    if frac:
        assert o0.auxk_loss > 0
    if case.get("multi_topk"):
        assert o0.latent_indices.shape[1] == 4 * ref.cfg.k  # sparsify returns the 4k ones
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **t, msg=lambda m: f"d{n}: {m}")
    # the patch is gone after the with block, and the reference did not change
    assert "forward" not in vars(ours)


def test_auxk_reaches_only_w_dec_as_in_sparsify():
    """sparsify's fused encoder drops its dense pre-activations' gradient, so its AuxK loss
    trains W_dec alone; the same here (the encoder is detached for it)."""
    sae = make_coder(torch.float64)
    x = torch.randn(29, 24, dtype=torch.float64)
    dead = torch.rand(300) < 0.3
    out = sparsify_forward(sae, x, dead_mask=dead, backend="torch")
    grads = torch.autograd.grad(out.auxk_loss, list(sae.parameters()), allow_unused=True)
    named = dict(zip([n for n, _ in sae.named_parameters()], grads))
    assert named["W_dec"] is not None and named["W_dec"][dead].abs().sum() > 0
    assert named["W_dec"][~dead].abs().sum() == 0
    for n in ("encoder.weight", "encoder.bias", "b_dec"):
        assert named[n] is None or named[n].abs().sum() == 0, n
    ref = torch.autograd.grad(sae(x, dead_mask=dead).auxk_loss, sae.W_dec)[0]
    torch.testing.assert_close(named["W_dec"], ref, rtol=1e-9, atol=1e-12)


def test_class_patch_and_removal(forward_calls, monkeypatch):
    """patch_sparsify() patches every coder (those sparsify's Trainer builds too) and puts
    sparsify's forward back on remove(); refusals name what is wrong."""
    original = SparseCoder.forward
    monkeypatch.setattr(SparseCoder, "forward", original)  # restored even if this fails
    sae = make_coder(torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64)
    handle = patch_sparsify(backend="torch")
    out = sae(x)
    assert forward_calls == ["torch"]
    assert SparseCoder.forward.__name__ == "forward"
    handle.remove()
    handle.remove()  # idempotent
    assert SparseCoder.forward is original
    torch.testing.assert_close(sae(x).fvu, out.fvu)
    assert forward_calls == ["torch"]
    with pytest.raises(TypeError, match="coder must be a sparsify SparseCoder"):
        patch_sparsify(torch.nn.Linear(2, 2))
    gm = make_coder(torch.float64, k=4, activation="groupmax")
    with pytest.raises(NotImplementedError, match="activation='groupmax'"):
        sparsify_forward(gm, torch.randn(3, 24, dtype=torch.float64))


def test_sparsify_trainer_trains_on_the_patch(tmp_path, forward_calls):
    """sparsify's own Trainer (fvu loss, AuxK on, Adam) on a tiny GPT-2, with every coder
    patched: after 8 steps each SAE's weights equal those of the unpatched run to fp32
    rounding, and the patched forward did run (for both layers, every step)."""
    datasets = pytest.importorskip("datasets")
    from sparsify import TrainConfig, Trainer
    from transformers import GPT2Config, GPT2LMHeadModel

    backend = "cpp" if "cpp" in BACKENDS else "torch"

    def train(patched):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97,
                                           n_positions=32))
        ids = torch.randint(0, 97, (64, 16), generator=torch.Generator().manual_seed(1))
        ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
        cfg = TrainConfig(SparseCoderConfig(num_latents=200, k=6), batch_size=8,
                          layers=[0, 1], loss_fn="fvu", optimizer="adam", lr=1e-3,
                          lr_warmup_steps=0, auxk_alpha=1 / 32, dead_feature_threshold=16,
                          log_to_wandb=False, save_every=10 ** 9,
                          save_dir=str(tmp_path / ("patched" if patched else "sparsify")))
        trainer = Trainer(cfg, ds, model)
        if patched:
            with patch_sparsify(backend=backend):
                trainer.fit()
        else:
            trainer.fit()
        dead = {n: int((c > 16).sum()) for n, c in trainer.num_tokens_since_fired.items()}
        return {n: {k: v.detach().clone() for k, v in sae.state_dict().items()}
                for n, sae in trainer.saes.items()}, dead

    original = SparseCoder.forward
    ref, dead = train(False)
    assert not forward_calls
    ours, _ = train(True)
    assert forward_calls == [backend] * (8 * 2)  # 8 batches x 2 layers
    assert SparseCoder.forward is original  # restored
    assert all(d > 0 for d in dead.values()), dead  # AuxK had dead latents to work on
    for n in ref:
        for k in ref[n]:
            torch.testing.assert_close(ours[n][k], ref[n][k], rtol=1e-5,
                                       atol=1e-5 * ref[n][k].abs().max().item(),
                                       msg=lambda m: f"{n} {k}: {m}")


def test_gpu_benchmarks_sparsify_style_encoder_is_sparsifys():
    """benchmarks/bench_gpu.py's baseline (written there: the GPU image has no sparsify) does
    what sparsify's fused encoder does: the same outputs, the same gradients, the dense
    pre-activations' gradient dropped."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        from bench_gpu import SparsifyStyleEncoder
    finally:
        sys.path.pop(0)
    from sparsify.fused_encoder import FusedEncoder
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(13, 10, generator=g, dtype=torch.float64)
    W0 = torch.randn(90, 10, generator=g, dtype=torch.float64)
    b0 = 0.1 * torch.randn(90, generator=g, dtype=torch.float64)
    w = torch.randn(13, 5, generator=g, dtype=torch.float64)
    res = []
    for fn in (FusedEncoder.apply, lambda *a: SparsifyStyleEncoder.apply(*a[:4])):
        x, W, b = (t.clone().requires_grad_() for t in (x0, W0, b0))
        v, i, pre = fn(x, W, b, 5, "topk")
        order = i.argsort(1)
        loss = (v.gather(1, order) * w).sum() + pre.square().sum()
        res.append((v.gather(1, order), i.gather(1, order), pre,
                    *torch.autograd.grad(loss, (x, W, b))))
    for a, e in zip(*res):
        torch.testing.assert_close(a, e)


def test_bf16_autocast_branch(monkeypatch):
    """On a CUDA card with bf16, sparsify's forward runs under bf16 autocast (encoder GEMM and
    selection in bf16, decode in fp32) and sparsify_forward does the same casts by hand. That
    branch, forced here on the CPU, against sparsify's forward under CPU bf16 autocast (which
    casts its F.linear the same way). bf16 near-ties may select differently, and a changed
    selection moves gradient between latents, so: one token at a time (total_variance given,
    as sparsify's Trainer does), and the tokens that select the same latents must give every
    gradient to bf16 accuracy (measured: <= 0.6% relative); then a batch with AuxK and
    Multi-TopK must give the three losses to 2%, the code in bf16 and the rest fp32."""
    import sae_sparse.compat as compat
    monkeypatch.setattr(compat, "_autocast_dtype", lambda x: torch.bfloat16)
    ref = make_coder(torch.float32, S=200, k=6, skip_connection=True)
    X = torch.randn(32, 24, generator=torch.Generator().manual_seed(8))
    tv = torch.tensor(30.0)
    same = 0
    for i in range(32):
        a, b = copy.deepcopy(ref), copy.deepcopy(ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o0 = a.forward.__wrapped__(a, X[i:i + 1], total_variance=tv)
        o1 = sparsify_forward(b, X[i:i + 1], total_variance=tv, backend="torch")
        if not torch.equal(o1.latent_indices.sort(1).values, o0.latent_indices.sort(1).values):
            continue
        same += 1
        loss_of(o0).backward()
        loss_of(o1).backward()
        for (n, p), q in zip(b.named_parameters(), a.parameters()):
            assert p.grad.dtype == torch.float32, n
            err = (p.grad - q.grad).norm() / q.grad.norm()
            assert err < 2e-2, (i, n, err)
    assert same >= 24, same

    ref = make_coder(torch.float32, S=200, k=6, multi_topk=True)
    ours = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 24, generator=g)
    dead = torch.rand(200, generator=g) < 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o0 = ref.forward.__wrapped__(ref, x, dead_mask=dead)
    o1 = sparsify_forward(ours, x, dead_mask=dead, backend="torch")
    assert o1.latent_acts.dtype == torch.bfloat16 and o1.sae_out.dtype == torch.float32
    for name in ("fvu", "auxk_loss", "multi_topk_fvu"):
        a, e = getattr(o1, name).float(), getattr(o0, name).float()
        assert e > 0 and (a - e).abs() <= 2e-2 * e, (name, a, e)


def test_cli_runs_sparsifys_command_line_patched(monkeypatch, forward_calls):
    """`sae-sparse sparsify ARGS` hands ARGS to sparsify's own command line (its run() reads
    sys.argv) with SparseCoder.forward patched for the duration, then restores both. (Its real
    run() loads the model onto cuda:0, so it is stood in for here.)"""
    import sys

    import sparsify.__main__ as sp_main

    from sae_sparse.cli import main
    seen = {}
    original = SparseCoder.forward

    def fake_run():
        seen["argv"] = list(sys.argv)
        sae = make_coder(torch.float64)
        seen["patched"] = SparseCoder.forward is not original
        seen["fvu"] = sae(torch.randn(6, 24, dtype=torch.float64)).fvu

    monkeypatch.setattr(sp_main, "run", fake_run)
    before = list(sys.argv)
    assert main(["sparsify", "gpt2", "data.bin", "--k", "16", "--help"]) == 0
    assert seen["argv"] == ["sparsify", "gpt2", "data.bin", "--k", "16", "--help"]
    assert seen["patched"] and forward_calls == [None] and torch.isfinite(seen["fvu"])
    assert sys.argv == before
    assert SparseCoder.forward is original
