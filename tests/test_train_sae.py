"""sae-sparse train-sae: a TopK SAE trained on a model's activations through this package's op
(AuxK, unit-norm decoder, streamed activations), resumed exactly, saved in SAELens format."""
import json

import pytest
import torch

pytest.importorskip("transformers")

import sae_sparse as ss  # noqa: E402
from sae_sparse.cli import main  # noqa: E402
from sae_sparse.corpora import python_docs  # noqa: E402
from sae_sparse.train_sae import ActivationStream, SAETrainConfig, train_sae  # noqa: E402

from dist_workers import sae_training_setup  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    return sae_training_setup()  # the model, tokenizer and records the mesh tests use too


def cfg(**kw):
    base = dict(d_sae=96, k=4, tokens=3000, batch_tokens=200, buffer_tokens=1000,
                dead_tokens=400, max_len=16, model_batch=8, eval_frac=0.1, lr=3e-3,
                log_every=2)
    return SAETrainConfig(**{**base, **kw})


def test_train_sae_learns_and_saves_saelens(setup, tmp_path):
    model, tok, recs = setup
    sae, m = train_sae(model, tok, "blocks.1.hook_resid_post", recs, str(tmp_path / "s"),
                       cfg(), progress=False, log=None)
    ev = m["held_out"]
    assert m["train_tokens"] == 3000 and m["module"] == "transformer.h.1"
    assert ev["fvu"] < 0.7 and ev["l0"] <= 4 and ev["tokens"] > 0
    assert m["history"]["fvu"][-1] < m["history"]["fvu"][0]
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
    loaded = ss.load_sae(str(tmp_path / "s"))
    assert loaded.format_info["hook_name"] == "blocks.1.hook_resid_post"
    assert loaded.k == 4 and loaded.tied_b_pre
    assert torch.equal(loaded.W_dec, sae.W_dec.detach())
    cfgj = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfgj["training_tokens"] == 3000 and abs(cfgj["held_out_fvu"] - ev["fvu"]) < 1e-12


def test_train_sae_resumes_exactly(setup, tmp_path):
    model, tok, recs = setup
    a, _ = train_sae(model, tok, "transformer.h.1", recs, str(tmp_path / "a"), cfg(),
                     progress=False, log=None)
    train_sae(model, tok, "transformer.h.1", recs, str(tmp_path / "b"), cfg(tokens=2000),
              progress=False, log=None)
    lines = []
    b, _ = train_sae(model, tok, "transformer.h.1", recs, str(tmp_path / "b"), cfg(),
                     progress=False, log=lines.append)
    assert any("resuming SAE training at 2000 of 3000 tokens" in x for x in lines)
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n


def test_activation_stream_stops_at_the_hook_and_matches_a_full_forward(setup):
    model, tok, recs = setup
    s = ActivationStream(model, tok, "transformer.h.0", recs[:3], max_len=16, model_batch=2)
    got = torch.cat([a for _, a in s.chunks()])
    want = []
    h = model.transformer.h[0].register_forward_hook(
        lambda m, a, o: want.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for r in recs[:3]:
            ids = tok(r["text"], add_special_tokens=False)["input_ids"]
            for s0 in range(0, len(ids), 16):
                model(torch.tensor([ids[s0:s0 + 16]]))
    h.remove()
    torch.testing.assert_close(got, torch.cat([w[0] for w in want]), rtol=1e-5, atol=1e-5)


def test_python_docs_corpus_and_cli(setup, tmp_path):
    recs = python_docs()
    assert len(recs) > 300 and all(200 <= len(r["text"]) <= 1200 for r in recs)
    model, tok, _ = setup
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for r in setup[2]:
            f.write(json.dumps(r) + "\n")
    assert main(["train-sae", "--model", str(tmp_path / "model"), "--hook",
                 "transformer.h.1", "--data", str(data), "--out", str(tmp_path / "sae"),
                 "--d-sae", "64", "--k", "4", "--tokens", "1000", "--batch-tokens", "100",
                 "--buffer-tokens", "500", "--max-len", "16", "--no-progress"]) == 0
    assert ss.load_sae(str(tmp_path / "sae")).d_sae == 64
    assert main(["train-sae", "--model", str(tmp_path / "model"), "--hook", "transformer.h.9",
                 "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_activation_stream_skips_the_attention_sink(setup):
    model, tok, recs = setup
    full = ActivationStream(model, tok, "transformer.h.0", recs[:2], max_len=16, model_batch=1)
    skip = ActivationStream(model, tok, "transformer.h.0", recs[:2], max_len=16, model_batch=1,
                            skip_first=1)
    for (_, a), (_, b) in zip(full.chunks(), skip.chunks()):
        # each chunk is one record's windows of 16 tokens: every 16th row dropped
        keep = torch.ones(a.shape[0], dtype=torch.bool)
        keep[::16] = False
        torch.testing.assert_close(b, a[keep])


def test_more_tokens_than_the_data_warns_with_the_number_of_passes(setup, tmp_path):
    model, tok, recs = setup
    with pytest.warns(UserWarning, match=r"tokens=3000 is 1\.4 passes over the 2160 training "
                                         r"tokens"):
        train_sae(model, tok, "transformer.h.1", recs, str(tmp_path / "a"), cfg(),
                  progress=False, log=None)


def test_a_short_run_fills_only_the_buffer_it_needs(setup, tmp_path, monkeypatch):
    """--tokens below --buffer-tokens: the model runs on about --tokens activations, not on
    the whole buffer (nor around the data again)."""
    model, tok, recs = setup
    made = []
    run = ActivationStream._run
    monkeypatch.setattr(ActivationStream, "_run",
                        lambda self, b: made.append(run(self, b)) or made[-1])
    train_sae(model, tok, "transformer.h.1", recs, str(tmp_path / "a"),
              cfg(tokens=400, buffer_tokens=2000, eval_frac=0.0), progress=False, log=None)
    produced = sum(a.shape[0] for a in made)
    assert 400 <= produced < 400 + 8 * 16  # at most one model batch (8 windows) more


def test_ctrl_c_names_the_checkpoint_and_the_rerun_resumes(setup, tmp_path, monkeypatch,
                                                            capsys):
    from sae_sparse.train_sae import SAETrainer

    model, tok, recs = setup
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["train-sae", "--model", str(tmp_path / "model"), "--hook", "transformer.h.1",
            "--data", str(data), "--out", str(tmp_path / "sae"), "--d-sae", "64", "--k", "4",
            "--tokens", "1000", "--batch-tokens", "100", "--buffer-tokens", "500",
            "--max-len", "16", "--no-progress"]
    calls = []
    train_on = SAETrainer._train_on

    def interrupted(self, acts):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_on(self, acts)

    monkeypatch.setattr(SAETrainer, "_train_on", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    ckpt = tmp_path / "sae" / "checkpoint"
    state = json.loads((ckpt / "manifest.json").read_text())  # the first buffer's steps
    assert 0 < state["steps"] and state["seen"] == 100 * state["steps"]
    assert f"interrupted after step {state['steps']}; checkpoint saved in {ckpt}. Run the " \
           "same command again to resume." in err
    monkeypatch.undo()
    assert main(argv) == 0
    assert f"resuming SAE training at {state['seen']} of 1000 tokens" in capsys.readouterr().out
