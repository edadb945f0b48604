"""Safe resume, Ctrl-C, overflow accounting, the report's contents, a deterministic demo and
`sae-sparse generate` (issue "Fail loudly", items 2, 3, 5, 7, 8)."""
import json
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")

import sae_sparse as ss  # noqa: E402
from sae_sparse import training as T  # noqa: E402
from sae_sparse.training import losses as L  # noqa: E402
from sae_sparse.training import run_dir as RD  # noqa: E402
from sae_sparse.cli import main  # noqa: E402
from sae_sparse.demo import word_tokenizer  # noqa: E402
from sae_sparse.io import save_saelens  # noqa: E402

from tiny_models import saved_tiny_gpt2, tiny_gpt2  # noqa: E402

WORDS = "the a cat dog bird fish tree house red blue runs sees".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    saved_tiny_gpt2(root / "model")
    g = torch.Generator().manual_seed(1)
    save_saelens(ss.SAE.random(32, 48, 4, generator=g), str(root / "sae"),
                 hook_name="blocks.1.hook_resid_post")
    save_saelens(ss.SAE.random(32, 48, 4, generator=g), str(root / "sae_b"),
                 hook_name="blocks.1.hook_resid_post")
    for name, seed in (("data.jsonl", 0), ("other.jsonl", 1)):
        gg = torch.Generator().manual_seed(seed)
        with open(root / name, "w") as f:
            for i in range(30):
                w = [WORDS[j] for j in torch.randint(0, 12, (8,), generator=gg).tolist()]
                f.write(json.dumps({"prompt": " ".join(w[:2]),
                                    "completion": " " + " ".join(w[2:])}) + "\n")
    return root


def args(f, out, *extra, data="data.jsonl", sae="sae", steps=4):
    return ["train", "--model", str(f / "model"), "--sae", str(f / sae), "--data",
            str(f / data), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--edit", "gain,bias,ffn:2", "--lr", "0.05", "--checkpoint-every", "2",
            "--eval-every", "2", "--no-progress", "--no-report", *extra]


def adapter_tensors(run):
    from safetensors.torch import load_file
    return load_file(os.path.join(run, "adapter_model.safetensors"))


def test_resume_refuses_changed_inputs_and_says_where_it_resumes(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(files, out, steps=2)) == 0
    out1 = capsys.readouterr().out
    assert "step 0/2: eval loss" in out1 and "step 2/2: train loss" in out1  # --no-progress
    assert "resuming" not in out1
    assert main(args(files, out, steps=4)) == 0
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    full = tmp_path / "full"
    assert main(args(files, full, steps=4)) == 0
    a, b = adapter_tensors(out), adapter_tensors(full)
    assert all(torch.equal(a[n], b[n]) for n in a)  # resumed == uninterrupted
    capsys.readouterr()
    for extra, kw, what in (([], dict(data="other.jsonl"), "the data (sha256"),
                            ([], dict(sae="sae_b"), "the SAE at transformer.h.1 (sha256"),
                            (["--l1", "0.5"], {}, "l1 (0.001 -> 0.5)")):
        before = {p: os.path.getmtime(out / p) for p in os.listdir(out) if p != "checkpoint"}
        assert main(args(files, out, *extra, steps=6, **kw)) == 2
        err = capsys.readouterr().err
        assert f"holds a run trained with other settings: {what}" in err, err
        assert "--overwrite" in err
        after = {p: os.path.getmtime(out / p) for p in os.listdir(out) if p != "checkpoint"}
        assert before == after  # refused before anything was written
    # --overwrite replaces the run; --no-resume starts over a run of the same inputs
    assert main(args(files, out, "--overwrite", steps=3, data="other.jsonl")) == 0
    o = capsys.readouterr().out
    assert "resuming" not in o
    m = json.loads((out / "metrics.json").read_text())
    assert m["history"]["step"] == [1, 2, 3]
    assert main(args(files, out, "--no-resume", steps=3, data="other.jsonl")) == 0
    assert "resuming" not in capsys.readouterr().out


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_resumes_exactly(files, tmp_path, capsys,
                                                                 monkeypatch):
    calls = []
    real = L.lm_loss
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN in a background job without job control)

    def loss_with_ctrl_c(*a, **k):  # Ctrl-C arrives during the 3rd step's forward
        calls.append(torch.is_grad_enabled())  # (not an evaluation's)
        if sum(calls) == 3 and calls[-1]:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(L, "lm_loss", loss_with_ctrl_c)
    out = tmp_path / "run"
    assert main(args(files, out, "--checkpoint-every", "50", steps=5)) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 3; checkpoint saved in" in err
    assert "Run the same command again to resume" in err
    assert not (out / "adapter_model.safetensors").exists()
    monkeypatch.setattr(L, "lm_loss", real)
    assert main(args(files, out, "--checkpoint-every", "50", steps=5)) == 0
    assert "resuming from step 3 of 5" in capsys.readouterr().out
    full = tmp_path / "full"
    assert main(args(files, full, "--checkpoint-every", "50", steps=5)) == 0
    a, b = adapter_tensors(out), adapter_tensors(full)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_overflow_is_counted_on_every_edited_token_and_warned(tmp_path):
    """A JumpReLU SAE with a threshold below every pre-activation (all 48 latents active) under
    k = 4 overflows on every token: the count equals the number of non-pad tokens the steps
    saw, a warning names the rate, and the report shows it. Above every pre-activation:
    none. A TopK SAE: no warning."""
    tok = word_tokenizer()
    model = tiny_gpt2(vocab=len(tok))
    recs = [{"text": " ".join(WORDS[(i + j) % 12] for j in range(3 + i % 5))} for i in range(20)]
    cfg = T.TrainConfig(edit="bias", steps=3, batch_size=4, eval_frac=0.2, lr=0.01)
    # the tokens the 3 steps see: the schedule's batches of the train split
    import random
    order = list(range(len(recs)))
    random.Random(cfg.seed).shuffle(order)
    train = T.tokenize([recs[i] for i in order[4:]], tok, cfg.max_len)
    sched = T.Schedule(len(train), cfg.batch_size, 1, cfg.seed)
    n_tokens = sum(len(train[i][0]) for s in range(3) for i in sched.batch(s, 0))

    g = torch.Generator().manual_seed(0)
    base = ss.SAE.random(32, 48, 4, generator=g)
    for thr, expect in ((-1e4, n_tokens), (1e4, 0)):
        sae = ss.SAE(base.W_enc, base.b_enc + 1e3 * (thr < 0), base.W_dec, base.b_dec, 4,
                     threshold=torch.full((48,), thr))
        sae.format_info = {"architecture": "jumprelu"}
        run = tmp_path / f"r{thr}"
        if expect:
            with pytest.warns(UserWarning, match=r"100\.0% of the edited tokens at "
                                                 r"transformer.h.1 had more than k=4"):
                m = T.train_adapter(model, tok, {"transformer.h.1": sae}, recs, str(run), cfg,
                                    progress=False, log=None)
        else:
            m = T.train_adapter(model, tok, {"transformer.h.1": sae}, recs, str(run), cfg,
                                progress=False, log=None)
        o = m["overflow"]["transformer.h.1"]
        assert (o["tokens"], o["overflow_tokens"]) == (n_tokens, expect)
        assert o["architecture"] == "jumprelu" and o["k"] == 4
    rep = ss.report.write_report(str(tmp_path / "r-10000.0"), model=model, tokenizer=tok,
                                 saes={"transformer.h.1": ss.SAE(
                                     base.W_enc, base.b_enc, base.W_dec, base.b_dec, 4)})
    assert rep["hooks"]
    md = (tmp_path / "r-10000.0" / "report.md").read_text()
    assert f"{n_tokens} of {n_tokens} edited tokens (100.00%) had more than k = 4" in md
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a TopK SAE: overflow is its normal state
        T.train_adapter(model, tok, {"transformer.h.1": base}, recs, str(tmp_path / "topk"),
                        cfg, progress=False, log=None)


def test_report_is_valid_markdown_with_signed_values_curve_and_ascii_names(files, tmp_path):
    out = tmp_path / "run"
    argv = args(files, out, "--edit", "gain,bias,ffn:3", "--l1", "0", steps=4)
    argv.remove("--no-report")
    assert main(argv) == 0
    md = (out / "report.md").read_text()
    assert "![loss curve](loss_curve.png)" in md and (out / "loss_curve.png").exists()
    pngs = [p for p in os.listdir(out) if p.endswith(".png")]
    assert pngs and all(p.isascii() for p in pngs), pngs
    for p in pngs:
        assert f"({p})" in md
    # every table row has as many cells as its header (no unescaped pipes)
    import re
    tables, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    assert len(tables) >= 3
    for t in tables:
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in t}
        assert len(widths) == 1, t
    # the measured ranking (mean |Δz|) shows each latent's signed gain and bias; the raw
    # |gain| / |bias| rankings, whose scale says little, are in report.json only
    assert "| rank | latent | score | gain | bias |" in md and "by \\|gain\\|" not in md
    ad, _ = T.load_adapter(str(out))
    bias = ad["transformer.h.1"].bias.detach()
    rep = json.loads((out / "report.json").read_text())["hooks"]["transformer.h.1"]
    assert rep["|gain|"] and rep["|bias|·‖W_dec‖"]
    top = rep["mean |Δz| (eval)"][0][0]
    assert f"| 1 | {top} | " in md and f" {float(bias[top]):+.4g} |" in md


def test_a_run_without_an_eval_split_says_so(files, tmp_path, capsys):
    """--eval-frac 0: no eval loss is made up (metrics hold None, not NaN; the CLI and the
    report say there is no eval split)."""
    out = tmp_path / "run"
    argv = args(files, out, "--eval-frac", "0", steps=2)
    argv.remove("--no-report")
    assert main(argv) == 0
    assert "no eval split; adapter saved in" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text(),  # strict JSON: no NaN
                   parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))
    assert m["base_eval_loss"] is None and m["final_eval_loss"] is None and m["n_eval"] == 0
    md = (out / "report.md").read_text()
    assert "- no eval split (loss: cross-entropy per loss token); final train loss" in md
    assert "nan" not in md.lower().split("## ")[0]


def test_demo_chain_does_not_depend_on_the_global_rng():
    from sae_sparse.demo import bigram_chain
    torch.manual_seed(123)
    P1 = bigram_chain(40)
    torch.rand(7)
    P2 = bigram_chain(40)
    assert torch.equal(P1, P2)


@pytest.mark.exhaustive
def test_demo_is_deterministic(tmp_path):
    from sae_sparse.demo import run_demo
    reps = []
    for d in ("a", "b"):
        torch.manual_seed(len(d) * 99 + ord(d))  # whatever the global RNG holds
        reps.append(run_demo(str(tmp_path / d), steps=30, progress=False, log=lambda *a: None))
    assert (tmp_path / "a" / "data.jsonl").read_text() == (tmp_path / "b" /
                                                           "data.jsonl").read_text()
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert ma["history"] == mb["history"] and ma["base_eval_loss"] == mb["base_eval_loss"]
    md = (tmp_path / "a" / "report.md").read_text()
    assert "(planted)" in md


def test_generate_side_by_side(files, tmp_path, capsys):
    """`sae-sparse generate`: base and edited texts per prompt and strength; strength 0 is
    the base model; the base text does not depend on the edit."""
    out = tmp_path / "run"
    assert main(args(files, out, "--edit", "bias", "--lr", "0.5", steps=6)) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the cat", "--prompt", "a dog",
                 "--strength", "0", "--strength", "1", "--strength", "8",
                 "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    assert text.count("=== prompt") == 2 and "--- edited (strength 8)" in text
    from sae_sparse.generate import side_by_side
    from sae_sparse.models import load_model
    model, tok = load_model(str(files / "model"))
    edits = T.attach_run(model, str(out))
    rows = side_by_side(model, tok, edits, ["the cat", "a dog"], strengths=(0.0, 1.0, 8.0),
                        max_new_tokens=6)
    for r in rows:
        assert r["edited"][0.0] == r["base"]
    assert any(r["edited"][8.0] != r["base"] for r in rows)
    with edits.scaled(0.5):
        ids = torch.tensor([[3, 4, 5]])
        h_half = model(ids).logits
    with edits.disabled():
        h0 = model(ids).logits
    h1 = model(ids).logits
    assert (h_half - h0).abs().max() > 0 and (h_half - h1).abs().max() > 0
    edits.remove()


def test_generate_uses_the_chat_template_of_instruct_models():
    from sae_sparse.generate import encode_prompt
    tok = word_tokenizer()
    assert encode_prompt(tok, "the cat") == tok("the cat")["input_ids"]
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(tok, "the cat", chat=True)
    tok.chat_template = ("{% for m in messages %}<eos> {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} sees{% endif %}")
    want = tok("<eos> the cat sees", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "the cat") == want  # auto: the template is there
    assert encode_prompt(tok, "the cat", chat=False) == tok("the cat")["input_ids"]


def test_report_lift_and_top_contexts(tmp_path):
    """The report's interpretation of the top latents: each latent's activation lift (mean
    activation per completion token on one set over another, as the SAE reads the unedited
    model) equals the means computed by hand; top contexts are sorted, mark their token and
    name real activations."""
    from sae_sparse.demo import load_assets, make_data
    from sae_sparse.report import activation_lift, latent_activations, top_contexts
    model, tok, sae, planted = load_assets()
    make_data(str(tmp_path / "teacher.jsonl"), n=40, seed=1)
    teacher = T.load_jsonl(str(tmp_path / "teacher.jsonl"))
    base = [{"prompt": r["prompt"], "completion": " " + " ".join(
        reversed(r["completion"].split()))} for r in teacher]
    lats = [int(i) for i in planted["latents"]] + [0, 1]
    lift = activation_lift(model, tok, sae, planted["hook"], lats, teacher, base)
    acts_a = torch.cat([a for _, a in latent_activations(model, tok, sae, planted["hook"],
                                                         teacher, lats)])
    acts_b = torch.cat([a for _, a in latent_activations(model, tok, sae, planted["hook"],
                                                         base, lats)])
    n_completion = sum(len(tok(r["completion"], add_special_tokens=False)["input_ids"])
                       for r in teacher)
    assert acts_a.shape == (n_completion, len(lats))
    for j, row in enumerate(lift):
        assert row["latent"] == lats[j]
        assert abs(row["mean_a"] - float(acts_a[:, j].mean())) < 1e-6
        assert abs(row["mean_b"] - float(acts_b[:, j].mean())) < 1e-6
        if row["mean_b"] > 0:
            assert abs(row["lift"] - row["mean_a"] / row["mean_b"]) < 1e-6
    ctx = top_contexts(model, tok, sae, planted["hook"], lats, teacher, n=4)
    for lat, rows in ctx.items():
        vals = [r["activation"] for r in rows]
        assert vals == sorted(vals, reverse=True) and all(v > 0 for v in vals)
        assert all(r["context"].count("⟦") == 1 for r in rows)
    # a record's first position (an attention sink in real models) is never a top context,
    # and with skip_first=0 the top contexts are the activations' own top values
    full = latent_activations(model, tok, sae, planted["hook"], teacher, lats,
                              completion_only=False)
    for skip in (0, 1):
        ctx = top_contexts(model, tok, sae, planted["hook"], lats, teacher, n=3,
                           skip_first=skip)
        for j, lat in enumerate(lats):
            want = sorted((float(v) for _, a in full for v in a[skip:, j] if v > 0),
                          reverse=True)[:3]
            got = [r["activation"] for r in ctx[int(lat)]]
            assert got == pytest.approx(want[:len(got)]) and len(got) == min(3, len(want))


def test_resume_fingerprint_names_each_changed_input():
    """A checkpoint resumes only with the data, model, teacher, hook set and SAEs it was
    trained with: each change is named (the API's teacher= included, which no CLI flag sets)."""
    model = dict(source="/m", model_type="gpt2", n_params=10)
    base = dict(data_sha256="a" * 64, model=model, teacher=None,
                sae_sha256={"transformer.h.1": "b" * 64})
    assert RD.fingerprint_changes(base, dict(base)) == []
    for change, what in (
            (dict(data_sha256="c" * 64), "the data (sha256 aaaaaaaa… now cccccccc…)"),
            (dict(model=dict(model, source="/m2")), "the model (/m, gpt2, 10 parameters -> "
                                                    "/m2, gpt2, 10 parameters)"),
            (dict(model=dict(model, n_params=11)), "the model ("),
            (dict(teacher=dict(model)), "the teacher model (None -> "),
            (dict(sae_sha256={"transformer.h.1": "b" * 64, "transformer.h.0": "d" * 64}),
             "the hooks (['transformer.h.1'] -> ['transformer.h.0', 'transformer.h.1'])"),
            (dict(sae_sha256={"transformer.h.1": "e" * 64}), "the SAE at transformer.h.1")):
        changes = RD.fingerprint_changes(base, {**base, **change})
        assert len(changes) == 1 and changes[0].startswith(what), changes
