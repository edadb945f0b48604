"""torch.distributed on CPU with gloo: latent-sharded SAEs and adapters against the
one-process ops (2 and 3 processes, S not divisible by P, N = 1), and data-parallel adapter
training under torchrun against a one-process run with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_workers as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def spawn(fn, world, tmp_path, *args):
    init = tmp_path / f"init_{fn.__name__}_{world}_{abs(hash(args))}"
    mp.start_processes(fn, args=(world, str(init), *args), nprocs=world, join=True,
                       start_method="spawn")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("variant,N", [("plain", 9), ("bpre", 1), ("tied", 4),
                                       ("jumprelu", 9)])
@pytest.mark.quick_ids("jumprelu-9-3")
def test_sharded_sae_forward(tmp_path, world, variant, N):
    spawn(W.sae_forward_matches, world, tmp_path, variant, N)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode,masked", [("delta", False), ("replace", True)])
@pytest.mark.quick_ids("replace-True-2")
def test_sharded_sae_edit(tmp_path, world, mode, masked):
    spawn(W.sae_edit_matches, world, tmp_path, mode, masked)


def test_sharded_auxk(tmp_path):
    spawn(W.auxk_matches, 3, tmp_path)


@pytest.mark.exhaustive
def test_sharded_load_reads_slices(tmp_path):
    import sae_sparse as ss
    path = tmp_path / "sae"
    ss.save_saelens(W.make_sae("tied"), str(path))
    spawn(W.load_reads_only_its_rows, 3, tmp_path, str(path))


# ---------------------------------------------------------------- data parallel, torchrun


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    pytest.importorskip("transformers")
    from sae_sparse.demo import WORDS

    from tiny_models import saved_tiny_gpt2
    root = tmp_path_factory.mktemp("ddp")
    saved_tiny_gpt2(root / "model")
    import sae_sparse as ss
    ss.save_saelens(ss.SAE.random(32, 48, 4, generator=torch.Generator().manual_seed(0)),
                    str(root / "sae"), hook_name="blocks.1.hook_resid_post")
    g = torch.Generator().manual_seed(0)
    with open(root / "data.jsonl", "w") as f:
        for i in range(40):
            w = [WORDS[j] for j in torch.randint(0, 40, (3 + i % 6,), generator=g).tolist()]
            f.write(json.dumps({"prompt": " ".join(w[:2]),
                                "completion": " " + " ".join(w[2:])}) + "\n")
    return root


def cli(root, out, steps, nproc=None):
    args = ["--model", str(root / "model"), "--sae", str(root / "sae"), "--data",
            str(root / "data.jsonl"), "--steps", str(steps), "--batch-size", "6",
            "--grad-accum", "2", "--edit", "gain,bias,ffn:2", "--lr", "0.05",
            "--eval-every", "3", "--checkpoint-every", "4", "--no-progress", "--no-report",
            "--out", str(out)]
    return run_cli("train", args, nproc, timeout=600)


def run_cli(command, args, nproc=None, *, timeout):
    """``sae-sparse <command> <args>`` in one process, or under torchrun with ``nproc``;
    -> its stdout (it must succeed)."""
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={nproc}"] if nproc else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([*head, "-m", "sae_sparse.cli", command, *args], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.exhaustive
def test_torchrun_data_parallel_matches_one_process_and_resumes(run_files, tmp_path):
    """2 processes (gloo), --batch-size 6 as the global batch: the adapter, the losses and the
    overflow counts equal a 1-process run's to fp32 rounding; rank 0 alone prints and writes;
    metrics.json records world_size; a 2-process run stopped at step 4 and rerun to 6 resumes
    and ends where the uninterrupted one does."""
    from safetensors.torch import load_file
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    cli(run_files, one, 6)
    out = cli(run_files, two, 6, nproc=2)
    assert out.count("adapter saved in") == 1 and out.count("step 3/6") == 1
    cli(run_files, resumed, 4, nproc=2)
    out = cli(run_files, resumed, 6, nproc=2)
    assert out.count("resuming from step 4 of 6") == 1
    a = load_file(one / "adapter_model.safetensors")
    for run in (two, resumed):
        b = load_file(run / "adapter_model.safetensors")
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6)
        m1 = json.loads((one / "metrics.json").read_text())
        m2 = json.loads((run / "metrics.json").read_text())
        assert m2["world_size"] == 2 and m1["world_size"] == 1
        torch.testing.assert_close(torch.tensor(m2["history"]["train_loss"]),
                                   torch.tensor(m1["history"]["train_loss"]), rtol=1e-5,
                                   atol=1e-6)
        evals = dict(zip(m2["history"]["eval_step"], m2["history"]["eval_loss"]))
        for s_, v in zip(m1["history"]["eval_step"], m1["history"]["eval_loss"]):
            assert abs(evals[s_] - v) <= 1e-5 * abs(v), (s_, evals[s_], v)
        assert m2["overflow"] == m1["overflow"]


@pytest.mark.exhaustive
def test_sparsify_distribute_modules_under_the_patch(tmp_path):
    """sparsify's multi-process training with gloo: distribute_modules (each rank trains its
    layers) under patch_sparsify trains to sparsify's own weights. (Its DDP mode passes
    device_ids=[rank] to DistributedDataParallel, which torch refuses for CPU modules: on
    CPUs sparsify itself supports distribute_modules only.)"""
    pytest.importorskip("sparsify")
    pytest.importorskip("datasets")
    spawn(W.sparsify_distribute_modules, 2, tmp_path, str(tmp_path / "out"))


def test_memory_model_matches_the_shards():
    """The memory model's weights per rank are the bytes a rank's ShardedSAE parameters hold
    (the largest shard), within the replicated D-sized biases."""
    from sae_sparse.distributed import memory_model, shard_range
    S, D, P = 1001, 48, 3
    m = memory_model(S, D, P, weight_bytes=2)
    sizes = [b - a for a, b in (shard_range(S, r, P) for r in range(P))]
    assert sum(sizes) == S and max(sizes) - min(sizes) <= 1
    assert m["latents_per_rank"] == max(sizes)
    held = max(sizes) * (2 * D + 1) * 2  # W_enc, W_dec, b_enc in bf16
    assert held <= m["weights"] <= held + 2 * D * 4
    assert memory_model(S, D, 1)["comm_per_step"] == 0
    t = memory_model(S, D, P, train_sae=True)
    assert t["sae_optimizer"] == (max(sizes) * (2 * D + 1)) * 4 * 3 and t["adapter"] == 0


# ---------------------------------------------------------------- train_sae on a mesh


@pytest.fixture(scope="module")
def one_process_sae(tmp_path_factory):
    """The one-process train_sae run the distributed ones must reproduce."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from sae_sparse.train_sae import train_sae
    out = tmp_path_factory.mktemp("sae_one") / "sae"
    model, tok, recs = W.sae_training_setup()
    train_sae(model, tok, "transformer.h.1", recs, str(out), W.sae_training_config(),
              progress=False, log=None)
    return out, load_file(out / "sae_weights.safetensors")


def _same_sae(run, one_process_sae):
    from safetensors.torch import load_file
    ref_dir, ref = one_process_sae
    got = load_file(run / "sae_weights.safetensors")
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5, msg=n)
    m, m1 = (json.loads((d / "training_metrics.json").read_text()) for d in (run, ref_dir))
    torch.testing.assert_close(torch.tensor(m["history"]["fvu"]),
                               torch.tensor(m1["history"]["fvu"]), rtol=1e-5, atol=1e-6)
    assert m["history"]["dead_frac"] == m1["history"]["dead_frac"]
    assert max(m1["history"]["dead_frac"]) > 0.1  # AuxK trained: dead latents were there
    assert abs(m["held_out"]["fvu"] - m1["held_out"]["fvu"]) < 1e-5
    cfg, cfg1 = (json.loads((d / "cfg.json").read_text()) for d in (run, ref_dir))
    same = {"held_out_fvu": 0, "model_name": 0}  # (the CLI records the model's path)
    assert {**cfg, **same} == {**cfg1, **same}
    return m


@pytest.mark.parametrize("world,shards", [(2, 2), (2, 1), (4, 2), (3, 3)])
@pytest.mark.quick_ids("2-2")
def test_train_sae_on_a_mesh_matches_one_process(tmp_path, one_process_sae, world, shards):
    """train_sae on P = replicas x shards gloo processes (the dictionary's 301 latents split
    unevenly, the 200-token batches split over the replicas, AuxK on): the saved SAE, the FVU
    and dead fraction of every step and the held-out FVU are the one-process run's, to fp32
    rounding; the SAELens file written from the shards is complete."""
    from sae_sparse.distributed import shard_range
    out = tmp_path / "sae"
    spawn(W.train_sae_on_mesh, world, tmp_path, shards, str(out), 2000)
    m = _same_sae(out, one_process_sae)
    assert m["mesh"] == {"replicas": world // shards, "shards": shards}
    files = json.loads((out / "checkpoint" / "manifest.json").read_text())["files"]
    assert [f["rows"] for f in files] == [list(shard_range(301, s, shards))
                                          for s in range(shards)]


@pytest.mark.exhaustive
def test_train_sae_rank_death_names_the_checkpoint_and_the_rerun_resumes(tmp_path,
                                                                        one_process_sae):
    """Rank 1 of a 2-shard run dies right after the first checkpoint: rank 0 stops with an
    error naming the failure and the checkpoint; rerunning the same command resumes from it
    and ends with the one-process SAE."""
    out = tmp_path / "sae"
    ctx = mp.start_processes(W.train_sae_on_mesh, args=(2, str(tmp_path / "init"), 2,
                                                        str(out), 2000, 1),
                             nprocs=2, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(600)
    assert [p.exitcode for p in ctx.processes] == [0, 3]
    err = (out / "error-0.txt").read_text()
    assert err.startswith("train-sae rank 0 of 2 stopped: ")
    assert f"the checkpoint in {out / 'checkpoint'} (step 5) resumes: rerun the same " \
           "command" in err
    assert not (out / "sae_weights.safetensors").exists()
    spawn(W.train_sae_on_mesh, 2, tmp_path, 2, str(out), 2000)
    _same_sae(out, one_process_sae)


def _train_sae_cli(root, out, tokens, nproc, shards):
    args = ["--model", str(root / "model"), "--hook", "transformer.h.1", "--data",
            str(root / "data.jsonl"), "--out", str(out), "--no-progress",
            "--shard-latents", str(shards), "--tokens", str(tokens)]
    cfg = W.sae_training_config()
    for f in ("d_sae", "k", "batch_tokens", "buffer_tokens", "dead_tokens", "max_len",
              "model_batch", "eval_frac", "lr", "log_every", "skip_first"):
        args += ["--" + f.replace("_", "-"), str(getattr(cfg, f))]
    return run_cli("train-sae", args, nproc, timeout=900)


@pytest.mark.exhaustive
def test_train_sae_under_torchrun_resumes_on_another_mesh(tmp_path, one_process_sae):
    """``torchrun --nproc_per_node 2 -m sae_sparse.cli train-sae --shard-latents 2`` stopped
    after the first buffer, then resumed as 2 data-parallel replicas (--shard-latents 1):
    the checkpoint's rows are read for the new mesh and the SAE is the one-process run's.
    Rank 0 alone prints."""
    pytest.importorskip("transformers")
    from sae_sparse.demo import word_tokenizer

    from tiny_models import tiny_gpt2
    model, tok, recs = W.sae_training_setup()
    tiny_gpt2(vocab=len(word_tokenizer())).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "sae"
    first = _train_sae_cli(tmp_path, out, 1000, 2, 2)
    assert first.count("train-sae on 2 processes: 1 data-parallel replica(s) x 2 latent "
                       "shard(s) of 301 latents") == 1
    then = _train_sae_cli(tmp_path, out, 2000, 2, 1)
    assert then.count("resuming SAE training at 1000 of 2000 tokens") == 1
    assert then.count("held-out FVU") == 1
    _same_sae(out, one_process_sae)


@pytest.mark.parametrize("variant,dtype", [("tied", "float32"), ("jumprelu", "bfloat16"),
                                           ("plain", "float64")])
@pytest.mark.quick_ids("jumprelu-bfloat16")
def test_saelens_file_written_from_shards(tmp_path, variant, dtype):
    """save_saelens_sharded on 3 ranks (101 latents: uneven shards) writes the file and the
    cfg.json that save_saelens writes for the whole SAE: the same tensors, bit for bit, and a
    header safetensors and load_sae accept."""
    import sae_sparse as ss
    from safetensors.torch import load_file
    whole, shards = tmp_path / "whole", tmp_path / "shards"
    sae = W.make_sae(variant).to(getattr(torch, dtype))
    ss.save_saelens(sae, str(whole), hook_name="blocks.0.hook_resid_post", note="x")
    spawn(W.save_from_shards, 3, tmp_path, variant, dtype, str(shards))
    a, b = (load_file(d / "sae_weights.safetensors") for d in (whole, shards))
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    assert json.loads((whole / "cfg.json").read_text()) == \
        json.loads((shards / "cfg.json").read_text())
    loaded = ss.load_sae(str(shards))
    assert torch.equal(loaded.W_enc, sae.W_enc.detach()) and loaded.k == sae.k
