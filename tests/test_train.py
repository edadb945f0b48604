"""Training wrapper, CLI, save/load, merge, baselines, report and the offline demo."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import sae_sparse as ss  # noqa: E402
from sae_sparse.cli import main  # noqa: E402
from sae_sparse.demo import word_tokenizer  # noqa: E402
from sae_sparse.io import save_sparsify  # noqa: E402
from sae_sparse.training import (TrainConfig, attach_run, load_adapter, merge_bias_edit,  # noqa: E402
                              parse_edit, tokenize, train_adapter)

from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402

WORDS = "the a cat dog bird fish tree house red blue runs sees".split()


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def write_data(path, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    from sae_sparse.demo import WORDS as V

    with open(path, "w") as f:
        for i in range(n):
            w = [V[j] for j in torch.randint(0, len(V), (9,), generator=g).tolist()]
            rec = ({"prompt": " ".join(w[:3]), "completion": " " + " ".join(w[3:])} if i % 2
                   else {"text": " ".join(w)})
            f.write(json.dumps(rec) + "\n")
    return str(path)


def make_model_dir(tmp_path, tok, make=tiny_gpt2):
    model = make(vocab=len(tok))
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d), model


def test_parse_edit():
    assert parse_edit("gain,bias,ffn:16") == dict(gain=True, bias=True, ffn=True, hidden=16,
                                                  activation="relu")
    assert parse_edit("lowrank:8")["activation"] == "identity"
    assert parse_edit("ffn:4:gelu")["hidden"] == 4
    for bad in ("", "gain,foo", "ffn:x", "ffn:4:tanh"):
        with pytest.raises(ValueError):
            parse_edit(bad)


def test_tokenize_masks_loss_to_completion(tok):
    recs = [{"prompt": "the cat", "completion": " runs fast"}, {"text": "a dog sees"}]
    (ids, loss, prompt, t), (ids2, loss2, prompt2, t2) = tokenize(recs, tok, 64)
    assert t is None and t2 is None
    assert prompt.tolist() == [True, True, False, False] and loss.tolist() == [False, False,
                                                                               True, True]
    assert loss2.tolist() == [False, True, True]
    with pytest.warns(UserWarning, match="1 record\\(s\\) truncated to max_len=2 tokens, 1 record"):
        out = tokenize([{"text": "a dog sees"}, {"text": "cat"}], tok, 2)
    assert len(out) == 1 and len(out[0][0]) == 2


def test_cli_train_on_saved_model_and_sae(tmp_path, tok):
    model_dir, model = make_model_dir(tmp_path, tok)
    sae_dir = tmp_path / "sae"
    save_sparsify(ss.SAE.random(32, 150, 6, b_pre=True), str(sae_dir))
    data = write_data(tmp_path / "data.jsonl")
    run = tmp_path / "run"
    rc = main(["train", "--model", model_dir, "--sae", str(sae_dir), "--hook", "transformer.h.1",
               "--data", data, "--out", str(run), "--steps", "4", "--batch-size", "4",
               "--edit", "gain,bias,ffn:4", "--edit-positions", "completion", "--no-progress"])
    assert rc == 0
    for f in ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "report.md",
              "eval.jsonl"):
        assert (run / f).exists(), f
    conf = json.loads((run / "adapter_config.json").read_text())
    e = conf["hooks"]["transformer.h.1"]
    assert e["sae"]["format"] == "sparsify" and len(e["sae"]["sha256"]) == 64
    assert conf["edit_positions"] == "completion"
    adapters, _ = load_adapter(str(run))
    assert adapters["transformer.h.1"].W_out.abs().sum() > 0  # it trained
    ids = torch.randint(3, len(tok), (2, 7))
    base = model(ids).logits
    edits = attach_run(model, str(run))
    assert (model(ids).logits - base).abs().max() > 0
    edits.remove()
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    # a changed SAE is detected
    save_sparsify(ss.SAE.random(32, 150, 6, b_pre=True), str(sae_dir))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        attach_run(model, str(run))


def test_resume_is_exact(tmp_path, tok):
    model = tiny_gpt2(vocab=len(tok))
    sae = ss.SAE.random(32, 120, 5)
    data = write_data(tmp_path / "d.jsonl")
    kw = dict(edit="gain,bias,ffn:3", batch_size=4, grad_accum=2, checkpoint_every=3,
              eval_every=2, lr=0.05)
    train_adapter(model, tok, {"transformer.h.0": sae}, data, str(tmp_path / "a"),
                  TrainConfig(steps=6, **kw), progress=False)
    train_adapter(model, tok, {"transformer.h.0": sae}, data, str(tmp_path / "b"),
                  TrainConfig(steps=3, **kw), progress=False)
    m = train_adapter(model, tok, {"transformer.h.0": sae}, data, str(tmp_path / "b"),
                      TrainConfig(steps=6, **kw), progress=False)
    assert m["history"]["step"] == [1, 2, 3, 4, 5, 6]
    a, _ = load_adapter(str(tmp_path / "a"))
    b, _ = load_adapter(str(tmp_path / "b"))
    for (n, p), (_, q) in zip(a["transformer.h.0"].named_parameters(),
                              b["transformer.h.0"].named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match=r"holds a run trained with other settings: lr \(0.05 "
                                         r"-> 0.1\)"):
        train_adapter(model, tok, {"transformer.h.0": sae}, data, str(tmp_path / "b"),
                      TrainConfig(steps=8, **{**kw, "lr": 0.1}), progress=False)


def test_warmup_schedule_and_resume(tmp_path, tok):
    from sae_sparse.training import warmup_lr

    assert [warmup_lr(0.1, 4, s) for s in range(6)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert warmup_lr(0.1, 0, 0) == 0.1
    model = tiny_gpt2(vocab=len(tok))
    sae = ss.SAE.random(32, 120, 5)
    data = write_data(tmp_path / "d.jsonl")
    kw = dict(edit="gain,bias,ffn:3", batch_size=4, checkpoint_every=2, lr=0.05,
              warmup_steps=4, l1=0.0)
    for run, steps in (("a", [5]), ("b", [2, 5])):  # b stops inside the warmup and resumes
        for n in steps:
            train_adapter(model, tok, {"transformer.h.0": sae}, data, str(tmp_path / run),
                          TrainConfig(steps=n, **kw), progress=False, log=None)
    a, _ = load_adapter(str(tmp_path / "a"))
    b, _ = load_adapter(str(tmp_path / "b"))
    for (n, p), (_, q) in zip(a["transformer.h.0"].named_parameters(),
                              b["transformer.h.0"].named_parameters()):
        assert torch.equal(p, q), n
    # the first step moves the bias by about lr / warmup_steps (Adam's first step ~ lr)
    train_adapter(model, tok, {"transformer.h.0": sae}, data, str(tmp_path / "c"),
                  TrainConfig(steps=1, **kw), progress=False, log=None)
    c, _ = load_adapter(str(tmp_path / "c"))
    assert float(c["transformer.h.0"].bias.abs().max()) == pytest.approx(0.05 / 4, rel=1e-3)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0 or 'auto'"):
        TrainConfig(warmup_steps=-1).validate()


def test_dense_baseline_matches_sparse_op(tmp_path, tok):
    """The dense-latent baseline computes the same function: same training trajectory."""
    model = tiny_gpt2(vocab=len(tok))
    sae = ss.SAE.random(32, 90, 4, dtype=torch.float32)
    data = write_data(tmp_path / "d.jsonl")
    out = {}
    for name, base in (("sparse", None), ("dense", "dense")):
        train_adapter(model, tok, {"transformer.h.1": sae}, data, str(tmp_path / name),
                      TrainConfig(steps=3, batch_size=4, edit="gain,bias,ffn:3", baseline=base,
                                  lr=0.01), progress=False)
        out[name] = load_adapter(str(tmp_path / name))[0]["transformer.h.1"]
    for (n, p), (_, q) in zip(out["sparse"].named_parameters(), out["dense"].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_lora_baseline_and_report(tmp_path, tok):
    model_dir, model = make_model_dir(tmp_path, tok)
    sae_dir = tmp_path / "sae"
    ss.save_saelens(ss.SAE.random(32, 100, 5), str(sae_dir), hook_name="transformer.h.1")
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg["metadata"]["neuronpedia_id"] = "tiny-gpt2/1-res"
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    data = write_data(tmp_path / "d.jsonl")
    run = tmp_path / "lora"
    rc = main(["train", "--model", model_dir, "--sae", str(sae_dir), "--hook", "transformer.h.1",
               "--data", data, "--out", str(run), "--steps", "3", "--baseline", "lora:4",
               "--no-progress", "--no-report"])
    assert rc == 0
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "LoRA writes" in text and "LoRA reads" in text
    assert "https://www.neuronpedia.org/tiny-gpt2/1-res/" in text
    assert any(f.endswith(".png") for f in os.listdir(run))


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_merge_bias_edit(tmp_path, tok, make):
    from transformers import AutoModelForCausalLM

    model_dir, model = make_model_dir(tmp_path, tok, make)
    hook = "transformer.h.0" if make is tiny_gpt2 else "model.layers.0"
    sae_dir = tmp_path / "sae"
    ss.save_saelens(ss.SAE.random(32, 80, 4), str(sae_dir))
    run = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--sae", str(sae_dir), "--hook", hook, "--data",
                 write_data(tmp_path / "d.jsonl"), "--out", str(run), "--steps", "3", "--edit",
                 "bias", "--lr", "0.1", "--no-progress", "--no-report"]) == 0
    ids = torch.randint(3, len(tok), (2, 6))
    edits = attach_run(model, str(run))
    want = model(ids).logits
    edits.remove()
    assert (want - model(ids).logits).abs().max() > 1e-4
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)
    # edits that are not a constant shift are refused
    run2 = tmp_path / "run2"
    assert main(["train", "--model", model_dir, "--sae", str(sae_dir), "--hook", hook, "--data",
                 str(tmp_path / "d.jsonl"), "--out", str(run2), "--steps", "2", "--edit",
                 "gain,bias", "--lr", "0.1", "--no-progress", "--no-report"]) == 0
    with pytest.raises(ValueError, match="only a bias-only edit"):
        merge_bias_edit(make(vocab=len(tok)), str(run2))


def test_demo_recovers_planted_latents(tmp_path, monkeypatch):
    """`sae-sparse train` with no arguments: the offline demo, ending in recovery."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress"]) == 0
    rep = json.loads((tmp_path / "sae_sparse_demo_run" / "report.json").read_text())
    (h,) = rep["hooks"].values()
    assert h["planted"]["recovered"]


def test_latent_mask_restricts_training(tmp_path, tok):
    model_dir, model = make_model_dir(tmp_path, tok)
    sae_dir = tmp_path / "sae"
    ss.save_saelens(ss.SAE.random(32, 60, 4), str(sae_dir))
    (tmp_path / "ids.txt").write_text("3, 7\n11")
    run = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--sae", str(sae_dir), "--hook",
                 "transformer.h.0", "--data", write_data(tmp_path / "d.jsonl"), "--out", str(run),
                 "--steps", "3", "--edit", "gain,bias,ffn:2", "--latents", "@" + str(tmp_path /
                                                                               "ids.txt"),
                 "--lr", "0.1", "--no-progress"]) == 0
    (ad,) = load_adapter(str(run))[0].values()
    p = ad.edit_params()
    outside = torch.ones(60, dtype=torch.bool)
    outside[[3, 7, 11]] = False
    assert p["bias"][outside].abs().sum() == 0 and p["bias"][~outside].abs().sum() > 0
    assert p["W_out"][:, outside].abs().sum() == 0
    with pytest.raises(ValueError, match="out of range"):
        main(["train", "--model", model_dir, "--sae", str(sae_dir), "--hook", "transformer.h.0",
              "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "r2"), "--latents",
              "99", "--no-progress", "--debug"])


def test_loss_is_read_back_every_log_every_steps_and_nan_stops_the_run(tmp_path, tok,
                                                                        monkeypatch):
    """The training loop keeps each step's loss on the device and reads them back (one host
    sync) every log_every steps, at evals and at the end -- the history still has every
    step's loss, equal to a run that reads every step; a NaN in the SAE's W_dec (a NaN loss)
    stops the run with an error naming the step instead of saving an adapter of NaNs."""
    from sae_sparse.training import trainer as T
    model = tiny_gpt2(vocab=len(tok))
    sae = ss.SAE.random(32, 120, 5)
    data = write_data(tmp_path / "d.jsonl")
    reads = []
    real_stack = torch.stack

    def stack(ts, *a, **k):  # the loop's read-back goes through one torch.stack of losses
        out = real_stack(ts, *a, **k)
        if all(t.dim() == 0 for t in ts):
            reads.append(len(ts))
        return out
    monkeypatch.setattr(T.torch, "stack", stack)
    kw = dict(edit="gain,bias", batch_size=4, eval_every=100, lr=0.05, steps=7)
    m = train_adapter(model, tok, {"transformer.h.0": sae}, data, str(tmp_path / "a"),
                      TrainConfig(log_every=3, **kw), progress=False)
    # the losses and the hook's two overflow counters, in one read-back
    assert reads == [3 + 2, 3 + 2, 1 + 2] and m["history"]["step"] == list(range(1, 8))
    monkeypatch.setattr(T.torch, "stack", real_stack)
    m1 = train_adapter(model, tok, {"transformer.h.0": sae}, data, str(tmp_path / "b"),
                       TrainConfig(log_every=1, **kw), progress=False)
    assert m1["history"]["train_loss"] == m["history"]["train_loss"]
    bad = ss.SAE.random(32, 120, 5)
    with torch.no_grad():
        bad.W_dec[7, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step \d"):
        train_adapter(model, tok, {"transformer.h.0": bad}, data, str(tmp_path / "c"),
                      TrainConfig(log_every=3, **kw), progress=False)
    assert not os.path.exists(tmp_path / "c" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        TrainConfig(log_every=0).validate()


def test_skip_first_is_trained_saved_and_applied(tmp_path, tok):
    """train --skip-first 1: the run records it, attach_run applies it (the first position's
    logits are the unedited model's, the others edited), merge refuses the run (a merged
    bias would edit the first position too), and a negative value is refused."""
    model_dir, model = make_model_dir(tmp_path, tok, tiny_llama)
    sae_dir = tmp_path / "sae"
    ss.save_saelens(ss.SAE.random(32, 80, 4), str(sae_dir))
    run = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--sae", str(sae_dir), "--hook",
                 "model.layers.0", "--data", write_data(tmp_path / "d.jsonl"), "--out",
                 str(run), "--steps", "3", "--edit", "bias", "--lr", "0.1", "--skip-first", "1",
                 "--no-progress"]) == 0
    conf = json.loads((run / "adapter_config.json").read_text())
    assert conf["skip_first"] == 1 and conf["train_config"]["skip_first"] == 1
    assert "less each sequence's first 1" in (run / "report.md").read_text()
    ids = torch.randint(3, len(tok), (2, 6))
    base = model(ids).logits
    edits = attach_run(model, str(run))
    assert edits.skip_first == 1
    out = model(ids).logits
    edits.remove()
    torch.testing.assert_close(out[:, 0], base[:, 0], rtol=0, atol=0)
    assert (out[:, 1:] - base[:, 1:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="skip_first 1"):
        merge_bias_edit(model, str(run))
    with pytest.raises(ValueError, match="skip_first"):
        TrainConfig(skip_first=-1).validate()


def test_l1_group_zeroes_whole_latents(tmp_path, tok):
    """latent_group_norms against a float64 recomputation; shrink_latents scales each
    latent's parameters together and zeroes those under the threshold exactly; training with
    --l1-group through the CLI leaves some latents nonzero and zeroes the others whole."""
    from sae_sparse.training import latent_group_norms, shrink_latents
    g = torch.Generator().manual_seed(0)
    sae = ss.SAE.random(16, 23, 4, generator=g)
    ad = ss.LatentAdapter(23, 3)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    dn = sae.W_dec.detach().double().norm(dim=1)
    want = (ad.gain.double() ** 2 + (ad.bias.double() * dn) ** 2
            + (ad.W_in.double() ** 2).sum(1) + (ad.W_out.double() ** 2).sum(0) * dn ** 2
            + 1e-12).sqrt()
    norms = latent_group_norms(ad, sae).detach().double()
    torch.testing.assert_close(norms, want, rtol=1e-6, atol=0)
    tau = float(norms.median())
    before = {n: getattr(ad, n).detach().double().clone() for n in ("gain", "bias", "W_in",
                                                                    "W_out")}
    left = shrink_latents(ad, sae, tau)
    scale = (1 - tau / want).clamp_min(0)
    assert left == int((scale > 0).sum()) and 0 < left < 23
    for n, s in (("gain", scale), ("bias", scale), ("W_out", scale), ("W_in", scale[:, None])):
        torch.testing.assert_close(getattr(ad, n).double(), before[n] * s, rtol=1e-5,
                                   atol=1e-6)

    model_dir, _ = make_model_dir(tmp_path, tok)
    ss.save_saelens(ss.SAE.random(32, 60, 4, generator=g), str(tmp_path / "sae"))
    data = write_data(tmp_path / "d.jsonl")
    run = tmp_path / "run"  # (without --l1-group every latent is nonzero: W_in starts random)
    assert main(["train", "--model", model_dir, "--sae", str(tmp_path / "sae"), "--hook",
                 "transformer.h.0", "--data", data, "--out", str(run), "--steps", "30",
                 "--edit", "gain,bias,ffn:2", "--lr", "0.05", "--l1", "0", "--l1-group", "1",
                 "--no-progress", "--no-report"]) == 0
    (ad,) = load_adapter(str(run))[0].values()
    p = ad.edit_params()
    on = (p["gain"] != 0) | (p["bias"] != 0) | (p["W_in"] != 0).any(1) | \
        (p["W_out"] != 0).any(0)
    assert 0 < int(on.sum()) < 60
