"""Functions run in each process of the gloo tests (tests/test_distributed.py): importable by
name, as torch.multiprocessing's spawn needs."""
import os

import torch
import torch.distributed as dist


def _init(rank, world, init_file):
    import datetime
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))


def _close(a, b, tol, name):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol,
                               msg=lambda m: f"{name}: {m}")


def make_sae(variant, D=13, S=101, k=7, seed=0):
    import sae_sparse as ss
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(S, D, generator=g, dtype=torch.float64) / 3
    W_dec = torch.randn(S, D, generator=g, dtype=torch.float64) / 3
    b_enc = 0.2 * torch.randn(S, generator=g, dtype=torch.float64)
    b_dec = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    W_enc[57] = W_enc[3]  # equal latents on different shards: ties go to the smaller index
    b_enc[57] = b_enc[3]
    thr = (0.3 * torch.rand(S, generator=g, dtype=torch.float64) if variant == "jumprelu"
           else None)
    b_pre = b_dec if variant in ("tied", "jumprelu") else (
        0.1 * torch.randn(D, generator=g, dtype=torch.float64) if variant == "bpre" else None)
    return ss.SAE(W_enc, b_enc, W_dec, b_dec, k, b_pre=b_pre, threshold=thr)


def sae_forward_matches(rank, world, init_file, variant, N):
    """ShardedSAE.forward (y, values, indices, overflow) and every gradient against the
    one-process sae_forward (torch backend, float64) on the whole SAE."""
    import sae_sparse as ss
    from sae_sparse.distributed import ShardedSAE, shard_range
    _init(rank, world, init_file)
    try:
        sae = make_sae(variant)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N, sae.d_in, generator=g, dtype=torch.float64)
        x[0] = 0.0 if N > 2 else x[0]  # a row of ties at b_enc-only pre-activations
        w_y = torch.randn(N, sae.d_in, generator=g, dtype=torch.float64)
        w_v = torch.randn(sae.d_sae, generator=g, dtype=torch.float64)

        def loss(y, v, i):
            return (y * w_y).sum() + (v * w_v[i]).sum()

        xr = x.clone().requires_grad_()
        y0, v0, i0, n0 = ss.sae_forward(xr, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.k,
                                        b_pre=sae.b_pre, threshold=sae.threshold,
                                        backend="torch", return_overflow=True)
        loss(y0, v0, i0).backward()
        shard = ShardedSAE.from_sae(sae)
        xs = x.clone().requires_grad_()
        y, v, i = shard(xs, return_code=True)
        assert torch.equal(i, i0), (i, i0)
        assert int(shard.last_overflow_rows.sum()) == int(n0)
        _close(y, y0, 1e-10, "y")
        _close(v, v0, 1e-10, "values")
        loss(y, v, i).backward()
        _close(xs.grad, xr.grad, 1e-10, "dx")
        s0, s1 = shard_range(sae.d_sae, rank, world)
        assert shard.owned == (s0, s1)
        for n in ("W_enc", "b_enc", "W_dec"):
            _close(getattr(shard, n).grad, getattr(sae, n).grad[s0:s1], 1e-10, "d" + n)
        _close(shard.b_dec.grad, sae.b_dec.grad, 1e-10, "db_dec")
        if sae.b_pre is not None and not sae.tied_b_pre:
            _close(shard.b_pre.grad, sae.b_pre.grad, 1e-10, "db_pre")
        whole = shard.gather()
        assert torch.equal(whole.W_enc, sae.W_enc.detach())
    finally:
        dist.destroy_process_group()


def sae_edit_matches(rank, world, init_file, mode, masked):
    """sharded_sae_edit with a sharded gain + bias + FFN adapter (and a latent mask) against
    sae_edit on the whole SAE and adapter: y and the gradients of x, every adapter parameter
    (each rank's slice; b_in replicated) and the SAE's weights."""
    import sae_sparse as ss
    from sae_sparse.distributed import ShardedSAE, shard_adapter, shard_range, sharded_sae_edit
    _init(rank, world, init_file)
    try:
        sae = make_sae("tied")
        g = torch.Generator().manual_seed(2)
        mask = (torch.rand(sae.d_sae, generator=g) < 0.6) if masked else None
        ad = ss.LatentAdapter(sae.d_sae, 3, activation="gelu", latent_mask=mask,
                              dtype=torch.float64)
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        x = torch.randn(2, 5, sae.d_in, generator=g, dtype=torch.float64)
        w = torch.randn(2, 5, sae.d_in, generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        y0 = ss.sae_edit(xr, sae, ad, mode=mode, backend="torch")
        (y0 * w).sum().backward()
        shard = ShardedSAE.from_sae(sae)
        sad = shard_adapter(ad, shard)
        xs = x.clone().requires_grad_()
        y = sharded_sae_edit(xs, shard, sad, mode=mode)
        _close(y, y0, 1e-10, "y")
        (y * w).sum().backward()
        _close(xs.grad, xr.grad, 1e-10, "dx")
        s0, s1 = shard_range(sae.d_sae, rank, world)
        for n in ("gain", "bias", "W_in", "W_out", "b_in"):
            full = getattr(ad, n).grad
            want = full[:, s0:s1] if n == "W_out" else full if n == "b_in" else full[s0:s1]
            _close(getattr(sad, n).grad, want, 1e-10, "d" + n)
        for n in ("W_enc", "b_enc", "W_dec"):
            _close(getattr(shard, n).grad, getattr(sae, n).grad[s0:s1], 1e-10, "d" + n)
        _close(shard.b_dec.grad, sae.b_dec.grad, 1e-10, "db_dec")
    finally:
        dist.destroy_process_group()


def auxk_matches(rank, world, init_file):
    """sharded_auxk_encode + sharded_decode against auxk_encode + sparse_decode."""
    import sae_sparse as ss
    from sae_sparse.distributed import (ShardedSAE, shard_range, sharded_auxk_encode,
                                        sharded_decode)
    _init(rank, world, init_file)
    try:
        sae = make_sae("tied")
        g = torch.Generator().manual_seed(3)
        dead = torch.rand(sae.d_sae, generator=g) < 0.3
        x = torch.randn(6, sae.d_in, generator=g, dtype=torch.float64)
        w = torch.randn(6, sae.d_in, generator=g, dtype=torch.float64)
        for k_aux in (4, 500):  # fewer than the dead latents; more (clamped to n_dead)
            for p in sae.parameters():
                p.grad = None
            v0, i0 = ss.auxk_encode(x, sae.W_enc, sae.b_enc, dead, k_aux, b_pre=sae.b_pre,
                                    backend="torch")
            (ss.sparse_decode(v0, i0, sae.W_dec, backend="torch") * w).sum().backward()
            shard = ShardedSAE.from_sae(sae)
            v, i = sharded_auxk_encode(x, shard, dead, k_aux)
            assert v.shape == v0.shape
            pos = v0 > 0  # zero-valued entries may name other dead latents (no gradient)
            assert torch.equal(i[pos], i0[pos])
            _close(v, v0, 1e-10, "values")
            (sharded_decode(v, i, shard, b_dec=False) * w).sum().backward()
            s0, s1 = shard_range(sae.d_sae, rank, world)
            for n in ("W_enc", "b_enc", "W_dec"):
                _close(getattr(shard, n).grad, getattr(sae, n).grad[s0:s1], 1e-10, "d" + n)
    finally:
        dist.destroy_process_group()


def load_reads_only_its_rows(rank, world, init_file, path):
    from sae_sparse.distributed import ShardedSAE, shard_range
    from sae_sparse.io import load_sae
    _init(rank, world, init_file)
    try:
        whole = load_sae(path)
        shard = ShardedSAE.load(path)
        s0, s1 = shard_range(whole.d_sae, rank, world)
        assert torch.equal(shard.W_enc.detach(), whole.W_enc.detach()[s0:s1])
        assert torch.equal(shard.W_dec.detach(), whole.W_dec.detach()[s0:s1])
        assert shard.tied_b_pre if hasattr(shard, "tied_b_pre") else shard.b_pre is shard.b_dec
        assert shard.k == whole.k and shard.d_sae == whole.d_sae
    finally:
        dist.destroy_process_group()


def sparsify_distribute_modules(rank, world, init_file, save_dir):
    """sparsify's Trainer with distribute_modules (each rank trains its own layers; the
    activations are all-gathered) under patch_sparsify: the same SAE weights as without the
    patch, and the patched forward ran."""
    import datasets
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae_sparse.compat import patch_sparsify
    _init(rank, world, init_file)
    try:
        def train(patched):
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97,
                                               n_positions=32))
            ids = torch.randint(0, 97, (64, 16), generator=torch.Generator().manual_seed(1))
            ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
            cfg = TrainConfig(SparseCoderConfig(num_latents=200, k=6), batch_size=8,
                              layers=[0, 1], log_to_wandb=False, save_every=10 ** 9,
                              distribute_modules=True, optimizer="adam", lr=1e-3,
                              lr_warmup_steps=0,
                              save_dir=os.path.join(save_dir, f"{patched}"))
            trainer = Trainer(cfg, ds, model)
            if patched:
                with patch_sparsify(backend="torch"):
                    trainer.fit()
            else:
                trainer.fit()
            return {n: {k: v.detach().clone() for k, v in sae.state_dict().items()}
                    for n, sae in trainer.saes.items()}

        import sae_sparse.compat as compat
        original, real = SparseCoder.forward, compat.sparsify_forward
        calls = []

        def spy(*a, **k):  # the patched forward looks compat.sparsify_forward up per call
            calls.append(1)
            return real(*a, **k)
        compat.sparsify_forward = spy
        try:
            ref = train(False)
            assert not calls
            ours = train(True)
        finally:
            compat.sparsify_forward = real
        assert calls and SparseCoder.forward is original
        assert ref and set(ours) == set(ref)
        for n in ref:
            for k in ref[n]:
                torch.testing.assert_close(ours[n][k], ref[n][k], rtol=1e-5,
                                           atol=1e-5 * ref[n][k].abs().max().item(),
                                           msg=lambda m: f"rank {rank} {n} {k}: {m}")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- train_sae on a mesh


def sae_training_setup():
    """The tiny model, tokenizer and records the distributed train_sae tests train on."""
    from sae_sparse.demo import WORDS, word_tokenizer

    from tiny_models import tiny_gpt2
    tok = word_tokenizer()
    model = tiny_gpt2(vocab=len(tok))
    g = torch.Generator().manual_seed(0)
    recs = [{"text": " ".join(WORDS[j] for j in torch.randint(0, 40, (20,), generator=g))}
            for _ in range(120)]
    return model, tok, recs


def sae_training_config(**kw):
    """301 latents (no mesh here divides them evenly), many dead from the third step on (so
    AuxK trains them), two buffers."""
    from sae_sparse.train_sae import SAETrainConfig
    base = dict(d_sae=301, k=3, tokens=2000, batch_tokens=200, buffer_tokens=1000,
                dead_tokens=200, max_len=16, model_batch=8, eval_frac=0.1, lr=3e-3,
                log_every=1, skip_first=0)
    return SAETrainConfig(**{**base, **kw})


def train_sae_on_mesh(rank, world, init_file, shards, out, tokens, die_after_refill=None):
    """train_sae on this rank of a (world / shards) x shards mesh; with ``die_after_refill``
    rank 1 exits hard right after that checkpoint, and each surviving rank writes the error
    it raised to ``out/error-<rank>.txt``."""
    from sae_sparse.train_sae import SAETrainer, train_sae
    _init(rank, world, init_file)
    if die_after_refill is not None and rank == 1:
        save = SAETrainer._save_ckpt

        def save_then_die(self):
            save(self)
            if self.refill == die_after_refill:
                os._exit(3)
        SAETrainer._save_ckpt = save_then_die
    model, tok, recs = sae_training_setup()
    try:
        train_sae(model, tok, "transformer.h.1", recs, out, sae_training_config(tokens=tokens),
                  progress=False, log=None, shard_latents=shards)
    except RuntimeError as e:
        if die_after_refill is None:
            raise
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(str(e))
        os._exit(0)  # the group is broken: no clean teardown to wait for
    dist.destroy_process_group()


def save_from_shards(rank, world, init_file, variant, dtype, path):
    """save_saelens_sharded: each rank writes its rows of one SAELens file."""
    from sae_sparse.distributed import ShardedSAE, save_saelens_sharded
    _init(rank, world, init_file)
    try:
        sae = make_sae(variant).to(getattr(torch, dtype))
        shard = ShardedSAE.from_sae(sae)
        save_saelens_sharded(shard, path, hook_name="blocks.0.hook_resid_post", note="x")
    finally:
        dist.destroy_process_group()
