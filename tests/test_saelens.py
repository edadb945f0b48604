"""SAELens and TransformerLens: the TopK training step patched onto this package's ops against
the installed sae-lens (outputs, losses, every gradient, and its SAETrainer's weights), SAE
objects in memory both ways, edits at HookedTransformer hook points, hub SAEs from a cache the
test lays out, and e2e_sae checkpoints."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sae_sparse as ss
from sae_sparse import triton as _triton

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402

from sae_sparse.compat import (from_saelens, patch_saelens,  # noqa: E402
                               saelens_training_forward_pass, to_saelens)

BACKENDS = [b for b in ss.available_backends() if b != "triton" or _triton.interpreting()]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training_sae(rescale=True, apply_b_dec=True, dtype="float64", seed=0, d_in=16, d_sae=120,
                 k=5):
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype=dtype,
                                rescale_acts_by_decoder_norm=rescale,
                                apply_b_dec_to_input=apply_b_dec)
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():  # away from the zero-bias, 0.1-norm initialisation
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale,apply_b_dec,dead", [
    (True, True, "many"), (False, True, "few"), (True, False, "none"), (False, False, "many")])
@pytest.mark.quick_ids("True-True-many-torch", "False-True-few-cpp", "True-True-many-triton",
                       "True-False-none-cpp")
def test_training_step_matches_saelens(backend, rescale, apply_b_dec, dead):
    """saelens_training_forward_pass against TopKTrainingSAE.training_forward_pass on a copy:
    sae_out, the activations (sparse here, dense there), both losses and every parameter's
    gradient; AuxK with many dead latents (k_aux = D/2 of them), a few (scaled down), none."""
    dt = torch.float32 if backend == "triton" else torch.float64
    ref = training_sae(rescale, apply_b_dec, dtype=str(dt).split(".")[-1])
    ours = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 16, generator=g, dtype=torch.float64).to(dt)
    mask = {"many": torch.rand(120, generator=g) < 0.4,
            "few": torch.zeros(120, dtype=torch.bool).index_fill_(0, torch.tensor([3, 50]), True),
            "none": None}[dead]
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask, n_training_steps=0,
                          is_logging_step=False)
    o0 = ref.training_forward_pass(step)
    o0.loss.backward()
    o1 = saelens_training_forward_pass(ours, step, backend=backend)
    o1.loss.backward()
    tol = dict(rtol=1e-9, atol=1e-10) if dt == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(o1.sae_out, o0.sae_out, **tol)
    assert o1.feature_acts.is_sparse
    torch.testing.assert_close(o1.feature_acts.to_dense(), o0.feature_acts, **tol)
    assert set(o1.losses) == set(o0.losses)
    for n in o0.losses:
        torch.testing.assert_close(o1.losses[n], o0.losses[n], **tol, msg=n)
    if dead != "none":
        assert o0.losses["auxiliary_reconstruction_loss"] > 0
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=tol["rtol"] * 10,
                                   atol=tol["atol"] * 10 * p.grad.abs().max().item(), msg=n)


def test_training_step_with_extra_leading_dims():
    """Activations [batch, seq, d] (SAELens takes any leading dims): the same sae_out, dense
    feature_acts of shape [batch, seq, d_sae], losses (AuxK too) and gradients."""
    ref = training_sae(True, True, dtype="float64")
    ours = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 13, 16, generator=g, dtype=torch.float64)
    mask = torch.zeros(120, dtype=torch.bool).index_fill_(0, torch.tensor([3, 50, 77]), True)
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask, n_training_steps=0,
                          is_logging_step=False)
    o0 = ref.training_forward_pass(step)
    o0.loss.backward()
    o1 = saelens_training_forward_pass(ours, step, backend="torch")
    o1.loss.backward()
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(o1.sae_out, o0.sae_out, **tol)
    assert o1.feature_acts.shape == (3, 13, 120)
    torch.testing.assert_close(o1.feature_acts, o0.feature_acts, **tol)
    for n in o0.losses:
        torch.testing.assert_close(o1.losses[n], o0.losses[n], **tol, msg=n)
    assert o0.losses["auxiliary_reconstruction_loss"] > 0
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-9, msg=n)


def test_patch_the_class_and_one_sae_and_remove(monkeypatch):
    import sae_sparse._saelens as L
    calls = []
    real = L.saelens_training_forward_pass
    monkeypatch.setattr(L, "saelens_training_forward_pass",
                        lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k))
    original = TopKTrainingSAE.training_forward_pass
    sae = training_sae()
    step = TrainStepInput(sae_in=torch.randn(4, 16, dtype=torch.float64), coefficients={},
                          dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    with patch_saelens(backend="torch"):
        assert TopKTrainingSAE.training_forward_pass is not original
        sae.training_forward_pass(step)
    assert TopKTrainingSAE.training_forward_pass is original and calls == ["torch"]
    h = patch_saelens(sae, backend="cpp" if "cpp" in BACKENDS else "torch")
    sae.training_forward_pass(step)
    training_sae().training_forward_pass(step)  # another SAE: not patched
    h.remove()
    sae.training_forward_pass(step)
    assert len(calls) == 2 and "training_forward_pass" not in sae.__dict__
    with pytest.raises(TypeError, match="must be a SAELens TopKTrainingSAE"):
        patch_saelens(torch.nn.Linear(2, 2))


def test_saelens_trainer_trains_to_the_same_weights_with_the_patch(monkeypatch):
    """SAELens's own SAETrainer (Adam, grad clipping, dead-latent tracking feeding AuxK) for
    30 steps on a stream of activations: the same SAE weights with and without the patch."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    import sae_sparse._saelens as L
    calls = []
    real = L.saelens_training_forward_pass
    monkeypatch.setattr(L, "saelens_training_forward_pass",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    start = training_sae(d_sae=96, k=4)
    backend = "cpp" if "cpp" in BACKENDS else "torch"

    def fit(patched):
        sae = copy.deepcopy(start)
        g = torch.Generator().manual_seed(2)
        data = iter([torch.randn(32, 16, generator=g, dtype=torch.float64) for _ in range(40)])
        cfg = SAETrainerConfig(total_training_samples=32 * 30, train_batch_size_samples=32,
                               lr=3e-3, lr_end=3e-3, dead_feature_window=5,
                               feature_sampling_window=10 ** 6)
        trainer = SAETrainer(cfg, sae, data)
        if patched:
            with patch_saelens(backend=backend):
                trainer.fit()
        else:
            trainer.fit()
        return sae, trainer

    a, ta = fit(False)
    assert not calls
    b, tb = fit(True)
    assert len(calls) == 30
    assert int(ta.dead_neurons.sum()) > 0  # AuxK was on
    assert torch.equal(ta.dead_neurons, tb.dead_neurons)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-7, atol=1e-9, msg=n)


@pytest.mark.parametrize("arch", ["topk", "topk-rescaled", "jumprelu", "standard"])
def test_from_and_to_saelens_in_memory(arch):
    """SAELens inference SAEs to SAE and back: the same encode (dense there) and forward."""
    from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                          TopKSAE, TopKSAEConfig)
    torch.manual_seed(0)
    common = dict(d_in=12, d_sae=70, dtype="float64", apply_b_dec_to_input=arch != "standard")
    if arch.startswith("topk"):
        theirs = TopKSAE(TopKSAEConfig(k=6, rescale_acts_by_decoder_norm=arch != "topk",
                                       **common))
    elif arch == "jumprelu":
        theirs = JumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        theirs = StandardSAE(StandardSAEConfig(**common))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        if arch == "jumprelu":
            theirs.threshold.copy_(0.2 * torch.rand(70))
    theirs.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    x = torch.randn(9, 12, dtype=torch.float64)
    ours = from_saelens(theirs, k=None if arch.startswith("topk") else 70)
    assert ours.format_info["hook_name"] == "blocks.1.hook_resid_post"
    v, i = ours.encode(x, backend="torch")
    dense = torch.zeros(9, 70, dtype=torch.float64).scatter(1, i, v)
    want = theirs.encode(x)  # rescaled TopK: pre·‖W_dec_i‖ there, folded into W_enc here
    with torch.no_grad():
        torch.testing.assert_close(dense, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours(x, backend="torch"), theirs(x), rtol=1e-10,
                                   atol=1e-12)
    back = to_saelens(ours, hook_name="blocks.1.hook_resid_post",
                      architecture="standard" if arch == "standard" else None)
    assert back.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), rtol=1e-10, atol=1e-12)
    if arch == "jumprelu" or arch == "standard":
        with pytest.raises(ValueError, match="has no top-k of its own: pass k"):
            from_saelens(theirs)
    untied = ss.SAE(ours.W_enc, ours.b_enc, ours.W_dec, ours.b_dec, 6, b_pre=ours.b_dec * 2)
    with pytest.raises(ValueError, match="no separate input bias"):
        to_saelens(untied)


def hooked_transformer(vocab):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    torch.manual_seed(0)
    return HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=vocab, act_fn="gelu",
        normalization_type="LN")).eval()


def test_edits_at_transformer_lens_hook_points(tmp_path):
    """A HookedTransformer built from a config: a zero edit at blocks.1.hook_resid_post leaves
    the logits exactly unchanged, a bias edit moves the residual by bias·W_dec, and
    train_adapter trains an adapter there."""
    pytest.importorskip("transformer_lens")
    from sae_sparse.demo import WORDS, word_tokenizer
    tok = word_tokenizer()
    model = hooked_transformer(len(tok))
    ids = torch.randint(3, len(tok), (2, 9))
    base = model(ids)
    sae = ss.SAE.random(32, 90, 5)
    ad = ss.LatentAdapter(90, 3)
    edits = ss.attach(model, {"blocks.1.hook_resid_post": (sae, ad)})
    torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    with torch.no_grad():
        ad.bias[7] = 1.5
    _, cache = model.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
    edits.remove()
    _, cache0 = model.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
    delta = cache["blocks.1.hook_resid_post"] - cache0["blocks.1.hook_resid_post"]
    torch.testing.assert_close(delta, (1.5 * sae.W_dec[7]).expand_as(delta).detach(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids), base, rtol=0, atol=0)

    recs = [{"text": " ".join(WORDS[(i * 7 + j) % 40] for j in range(8))} for i in range(24)]
    m = ss.train_adapter(model, tok, {"blocks.1.hook_resid_post": ss.SAE.random(32, 90, 5)},
                         recs, str(tmp_path / "run"),
                         ss.TrainConfig(edit="gain,bias", steps=3, batch_size=4, lr=0.05),
                         progress=False, log=None)
    assert len(m["history"]["train_loss"]) == 3 and m["final_eval_loss"] is not None
    (trained,) = ss.load_adapter(str(tmp_path / "run"))[0].values()
    assert trained.bias.abs().sum() > 0


def lay_out_hub_cache(root):
    """A Hugging Face hub cache as huggingface_hub writes it: a SAELens-format SAE in a
    subfolder of a made-up repo, and one where SAELens's directory says gpt2-small-res-jb's
    blocks.0.hook_resid_pre lives."""
    h = "0123456789abcdef0123456789abcdef01234567"
    out = {}
    for repo, folder, hook in (
            ("someorg/tiny-saes", "layer_1/width_48", "blocks.1.hook_resid_post"),
            ("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.0.hook_resid_pre",
             "blocks.0.hook_resid_pre")):
        d = root / f"models--{repo.replace('/', '--')}"
        (d / "refs").mkdir(parents=True)
        (d / "refs" / "main").write_text(h)
        sae = ss.SAE.random(32, 48, 4, generator=torch.Generator().manual_seed(len(repo)))
        ss.save_saelens(sae, str(d / "snapshots" / h / folder), hook_name=hook)
        out[repo] = sae
    return out


@pytest.mark.exhaustive
def test_hub_saes_offline_from_the_cache(tmp_path):
    """load_sae and the CLI take a hub repo folder (org/repo/folder, hf://...) and a SAELens
    release (saelens://release/sae_id), served offline from huggingface_hub's cache; a folder
    that is not there is reported as missing."""
    from safetensors.torch import load_file
    cache = tmp_path / "hub"
    saes = lay_out_hub_cache(cache)
    from tiny_models import saved_tiny_gpt2
    saved_tiny_gpt2(tmp_path / "model")
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": "the cat sees a dog and the bird"}) + "\n")
    script = f"""
import json, sys, torch, sae_sparse as ss
from sae_sparse.cli import main
a = ss.load_sae("someorg/tiny-saes/layer_1/width_48")
b = ss.load_sae("hf://someorg/tiny-saes/layer_1/width_48")
c = ss.load_sae("saelens://gpt2-small-res-jb/blocks.0.hook_resid_pre")
print(json.dumps({{"a": a.format_info["hook_name"], "c": c.format_info["hook_name"],
                  "same": torch.equal(a.W_enc, b.W_enc)}}))
for bad in ("someorg/tiny-saes/layer_9", "nobody/nothing/x",
            "saelens://gpt2-small-res-jb/blocks.99.hook_resid_pre"):
    try:
        ss.load_sae(bad)
    except (FileNotFoundError, ValueError) as e:
        print("ERR", e)
sys.exit(main(["train", "--model", r"{tmp_path / 'model'}", "--sae",
               "someorg/tiny-saes/layer_1/width_48", "--data", r"{tmp_path / 'd.jsonl'}",
               "--out", r"{tmp_path / 'run'}", "--steps", "2", "--batch-size", "4",
               "--edit", "bias", "--no-progress", "--no-report"]))
"""
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    info = json.loads(lines[0])
    assert info == {"a": "blocks.1.hook_resid_post", "c": "blocks.0.hook_resid_pre",
                    "same": True}
    errs = [line for line in lines if line.startswith("ERR")]
    assert "has no folder 'layer_9'" in errs[0]
    assert "could not be read" in errs[1]
    assert "has no SAE 'blocks.99.hook_resid_pre'" in errs[2]
    conf = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert list(conf["hooks"]) == ["transformer.h.1"]  # the hook from the SAE's config
    got = load_file(os.path.join(conf["hooks"]["transformer.h.1"]["sae"]["path"],
                                 "sae_weights.safetensors"))
    assert torch.equal(got["W_enc"], saes["someorg/tiny-saes"].W_enc.detach().T)


class E2ESAE(torch.nn.Module):
    """e2e_sae's SAE module (e2e_sae/models/sparsifiers.py), as its checkpoints store it."""

    def __init__(self, d_in, S):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(d_in, S), torch.nn.ReLU())
        self.decoder = torch.nn.Linear(S, d_in)

    def forward(self, x):
        c = self.encoder(x)
        return F.linear(c, F.normalize(self.decoder.weight, dim=0), self.decoder.bias), c


def test_e2e_sae_checkpoints_load(tmp_path):
    """An e2e_sae run directory (final_config.yaml + samples_N.pt, the state dict of its saes
    ModuleDict with hook positions as keys): the latest checkpoint, the SAE at the asked hook,
    the same reconstruction and code as its module (k = d_sae: no cap)."""
    import yaml
    torch.manual_seed(0)
    saes = torch.nn.ModuleDict({"blocks-2-hook_resid_pre": E2ESAE(16, 64),
                                "blocks-4-hook_resid_pre": E2ESAE(16, 64)})
    d = tmp_path / "e2e_run"
    d.mkdir()
    (d / "final_config.yaml").write_text(yaml.dump({"saes": {"sae_positions": [
        "blocks.2.hook_resid_pre", "blocks.4.hook_resid_pre"], "dict_size_to_input_ratio": 4}}))
    torch.save({k: torch.zeros_like(v) for k, v in saes.state_dict().items()},
               d / "samples_100.pt")
    torch.save(saes.state_dict(), d / "samples_2000.pt")
    with pytest.raises(ValueError, match="holds SAEs at blocks.2.hook_resid_pre, blocks.4"):
        ss.load_sae(str(d), k=64)
    sae = ss.load_sae(str(d), k=64, hook="blocks.4.hook_resid_pre")
    assert sae.format_info["format"] == "e2e"
    assert sae.format_info["hook_name"] == "blocks.4.hook_resid_pre"
    x = torch.randn(7, 16)
    y0, c0 = saes["blocks-4-hook_resid_pre"](x)
    v, i = sae.encode(x, backend="torch")
    dense = torch.zeros(7, 64).scatter(1, i, v)
    with torch.no_grad():
        torch.testing.assert_close(dense, c0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae(x, backend="torch"), y0, rtol=1e-5, atol=1e-5)
    one = ss.load_sae(str(d / "samples_2000.pt"), k=64, hook="blocks.2.hook_resid_pre")
    assert one.format_info["format"] == "e2e"
    with pytest.raises(ValueError, match="has no top-k of its own"):
        ss.load_sae(str(d), hook="blocks.2.hook_resid_pre")


@pytest.mark.exhaustive
def test_bench_saelens_smoke():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_saelens.py"),
                        "--N", "16", "--D", "8", "--S", "64", "--k", "2", "--n-dead", "10",
                        "--reps", "1"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| patch_saelens (cpp) + AuxK" in r.stdout
