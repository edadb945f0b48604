"""loss="kl": distilling a teacher (the model with a system prompt and its edits off, or a
separate model) into an adapter; the KL against a float64 reference, alignment of the
teacher's and the student's completion tokens, and the errors."""
import json

import pytest
import torch

pytest.importorskip("transformers")

import sae_sparse as ss  # noqa: E402
from sae_sparse.cli import main  # noqa: E402
from sae_sparse.demo import WORDS, word_tokenizer  # noqa: E402
from sae_sparse.training import (TrainConfig, collate, collate_teacher, kl_loss,  # noqa: E402
                              teacher_logprobs, tokenize, train_adapter)

from tiny_models import saved_tiny_gpt2, tiny_gpt2  # noqa: E402

HOOK = "transformer.h.0"


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def records(n, seed=0, system="red red blue"):
    """Prompt + completion records whose teacher reads a 'system prompt' first."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = [WORDS[j] for j in torch.randint(0, len(WORDS), (2 + int(torch.randint(0, 3, (1,),
                                             generator=g)) + 4,), generator=g).tolist()]
        p, c = " ".join(w[:-4]), " " + " ".join(w[-4:])
        out.append({"prompt": p, "completion": c, "teacher_prompt": system + " " + p})
    return out


def test_teacher_examples_end_with_the_same_completion(tok):
    recs = records(6) + [{"text": "the cat sees a dog"}]
    ex = tokenize(recs, tok, 64, teacher=True)
    for e, r in zip(ex, recs):
        n = int(e.loss_mask.sum())
        assert n >= 1 and torch.equal(e.ids[-n:], e.teacher_ids[-n:])
        if "teacher_prompt" in r:
            p = tok(r["teacher_prompt"], add_special_tokens=False)["input_ids"]
            assert e.teacher_ids[:len(p)].tolist() == p
    # truncation cuts the completion so that both inputs fit, never the prompts
    r = {"prompt": "the cat", "completion": " runs fast and sees a dog",
         "teacher_prompt": "red blue red blue the cat"}
    with pytest.warns(UserWarning, match="1 record\\(s\\) truncated"):
        (e,) = tokenize([r], tok, 8, teacher=True)
    assert len(e.teacher_ids) == 8 and int(e.loss_mask.sum()) == 2
    assert torch.equal(e.ids[-2:], e.teacher_ids[-2:])
    ids, attn, mask = collate_teacher([e, ex[0]], 0)
    assert mask.sum() == e.loss_mask.sum() + ex[0].loss_mask.sum()


def test_kl_loss_matches_float64_reference(tok):
    torch.manual_seed(1)
    student, teacher = tiny_gpt2(vocab=len(tok), seed=1), tiny_gpt2(vocab=len(tok), seed=2)
    ex = tokenize(records(5, seed=3), tok, 64, teacher=True)
    ids, attn, lm, _ = collate(ex, 0)
    t = teacher_logprobs(teacher, ex, 0)
    got = kl_loss(student, ids, attn, lm, t)
    ref, n = 0.0, 0
    student64, teacher64 = student.double(), teacher.double()
    for e in ex:  # one example at a time, no padding
        c = int(e.loss_mask.sum())
        ls = student64(e.ids[None]).logits[0, -c - 1:-1].log_softmax(-1)
        lt = teacher64(e.teacher_ids[None]).logits[0, -c - 1:-1].log_softmax(-1)
        ref += float((lt.exp() * (lt - ls)).sum().detach())
        n += c
    student.float(), teacher.float()
    torch.testing.assert_close(got.double(), torch.tensor(ref / n, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="same tokenizer and vocabulary"):
        kl_loss(student, ids, attn, lm, t[:, :-1])


def test_lm_loss_matches_float64_reference(tok):
    from sae_sparse.training import lm_loss
    model = tiny_gpt2(vocab=len(tok), seed=4)
    ex = tokenize(records(5, seed=5), tok, 64)
    ids, attn, lm, _ = collate(ex, 0)
    got = lm_loss(model, ids, attn, lm)
    m64, ref, n = model.double(), 0.0, 0
    for e in ex:
        c = int(e.loss_mask.sum())
        lp = m64(e.ids[None]).logits[0, -c - 1:-1].log_softmax(-1)
        ref -= float(lp.gather(1, e.ids[-c:, None]).sum().detach())
        n += c
    model.float()
    torch.testing.assert_close(got.double(), torch.tensor(ref / n, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lm_loss(model, ids, attn, lm, denom=7.0).double(),
                               torch.tensor(ref / 7.0, dtype=torch.float64), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "peft", "no_logits_to_keep"])
def test_model_logits_at_positions(kind):
    """model_logits(..., positions) equals the full logits at those positions; the LM head
    projects only the columns some row needs (a model without logits_to_keep: all)."""
    from sae_sparse.models import model_logits

    from tiny_models import tiny_llama
    model = tiny_llama(seed=6) if kind == "llama" else tiny_gpt2(seed=6)
    if kind == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    attn = torch.ones(3, 9, dtype=torch.bool)
    attn[2, 6:] = False
    pos = torch.zeros(3, 9, dtype=torch.bool)
    pos[0, 4:8], pos[1, 5:7], pos[2, 3:5] = True, True, True
    if kind == "no_logits_to_keep":
        inner = model

        class Plain(torch.nn.Module):  # forward(input_ids, attention_mask) only
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask=None):
                return inner(input_ids=input_ids, attention_mask=attention_mask)
        model = Plain()
    rows = []
    head = (inner if kind == "no_logits_to_keep" else model).get_output_embeddings()
    h = head.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[:-1].numel()))
    with torch.no_grad():
        full = model_logits(model, ids, attn)
        got = model_logits(model, ids, attn, pos)
    h.remove()
    torch.testing.assert_close(got, full[pos], rtol=1e-5, atol=1e-6)
    assert rows[0] == 27
    assert rows[1] == (27 if kind == "no_logits_to_keep" else 3 * 5)  # columns 3..7


def sharp_gpt2(tok, seed=0):
    """A tiny GPT-2 whose next-token distribution depends on its context enough for a system
    prompt to matter (larger embeddings and attention weights than the default init)."""
    model = tiny_gpt2(vocab=len(tok), seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "wte" in n or "wpe" in n or "attn" in n:
                p.mul_(3)
    return model


def test_self_distillation_learns_the_system_prompt(tmp_path, tok):
    model = sharp_gpt2(tok)
    sae = ss.SAE.random(32, 90, 6)
    recs = records(48)
    cfg = TrainConfig(edit="gain,bias,ffn:4", loss="kl", steps=30, batch_size=8, lr=0.01,
                      eval_every=30, eval_frac=0.25, l1=0.0)
    ref = {n: p.clone() for n, p in model.state_dict().items()}
    m = train_adapter(model, tok, {HOOK: sae}, recs, str(tmp_path / "run"), cfg,
                      progress=False, log=None)
    assert m["loss"] == "kl" and m["base_eval_loss"] > 0
    # held-out KL to the teacher falls well below the unedited student's
    assert m["final_eval_loss"] < 0.8 * m["base_eval_loss"], m
    for n, p in model.state_dict().items():  # the model itself stayed frozen
        assert torch.equal(p, ref[n]), n
    # when the teacher reads what the student reads, the unedited student has zero KL
    same = [{**r, "teacher_prompt": r["prompt"]} for r in recs]
    m0 = train_adapter(model, tok, {HOOK: sae}, same, str(tmp_path / "same"),
                       TrainConfig(edit="bias", loss="kl", steps=1, eval_frac=0.25),
                       progress=False, log=None)
    assert abs(m0["base_eval_loss"]) < 1e-6


def test_separate_teacher_model(tmp_path, tok):
    student, teacher = sharp_gpt2(tok, seed=0), sharp_gpt2(tok, seed=5)
    recs = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records(40)]
    cfg = TrainConfig(edit="gain,bias,ffn:4", loss="kl", steps=25, batch_size=8, lr=0.01,
                      eval_every=25, eval_frac=0.25, l1=0.0)
    m = train_adapter(student, tok, {HOOK: ss.SAE.random(32, 90, 6)}, recs,
                      str(tmp_path / "run"), cfg, progress=False, log=None, teacher=teacher)
    assert m["final_eval_loss"] < m["base_eval_loss"]
    # another teacher is another run
    with pytest.raises(ValueError, match="teacher model"):
        train_adapter(student, tok, {HOOK: ss.SAE.random(32, 90, 6)}, recs,
                      str(tmp_path / "run"), TrainConfig(**{**cfg.__dict__, "steps": 30}),
                      progress=False, log=None, teacher=tiny_gpt2(vocab=len(tok), layers=1))


def test_kl_errors(tmp_path, tok):
    sae = ss.SAE.random(32, 90, 6)
    recs = records(8)
    recs[3] = {k: v for k, v in recs[3].items() if k != "teacher_prompt"}
    with pytest.raises(ValueError, match="1 of 8 records in the data have no 'teacher_prompt' "
                                         "string \\(the first: record 4\\)"):
        train_adapter(tiny_gpt2(vocab=len(tok)), tok, {HOOK: sae}, recs, str(tmp_path / "a"),
                      TrainConfig(loss="kl"), progress=False, log=None)
    with pytest.raises(ValueError, match="only used with loss='kl'"):
        train_adapter(tiny_gpt2(vocab=len(tok)), tok, {HOOK: sae}, recs, str(tmp_path / "b"),
                      TrainConfig(), progress=False, log=None, teacher=tiny_gpt2(vocab=len(tok)))
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="mse").validate()


def test_cli_kl(tmp_path, tok, capsys):
    saved_tiny_gpt2(tmp_path / "model")
    ss.io.save_sparsify(ss.SAE.random(32, 90, 6), str(tmp_path / "sae"))
    data = tmp_path / "d.jsonl"
    recs = records(16)
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["train", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"),
            "--hook", HOOK, "--data", str(data), "--loss", "kl", "--steps", "2",
            "--batch-size", "4", "--edit", "bias", "--no-progress", "--eval-frac", "0.25"]
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["loss"] == "kl" and m["base_eval_loss"] > 0
    assert "KL to the teacher" in (tmp_path / "run" / "report.md").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "teacher_prompt"})
                           + "\n" for r in recs))
    capsys.readouterr()
    assert main(args[:8] + [str(bad)] + args[9:] + ["--out", str(tmp_path / "bad")]) == 2
    assert "16 of 16 records" in capsys.readouterr().err


def test_edit_readout_finds_a_planted_bias(tok):
    """A bias on one latent of an SAE with orthonormal decoder rows (W_enc = W_decᵀ) moves
    that latent's pre-activation by exactly the bias and no other's: the readout (edited
    output re-encoded minus the unedited code) ranks it first, with the bias's sign, and
    leaves latents outside the top-k untouched."""
    from sae_sparse.report import edit_readout

    model = tiny_gpt2(vocab=len(tok))
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    W_dec = q[:27].contiguous()  # 27 orthonormal rows in R^32
    sae = ss.SAE(W_dec.clone(), torch.zeros(27), W_dec, torch.zeros(32), 27)  # W_enc = W_dec
    ad = ss.LatentAdapter(27, gain=False, bias=True, ffn=False)
    with torch.no_grad():
        ad.bias.zero_()
        ad.bias[11] = 5.0
    recs = [{"prompt": "the cat", "completion": " sees a red dog"}, {"text": "a bird runs"}]
    r = edit_readout(model, tok, sae, ad, HOOK, recs)
    assert int(r.abs().argmax()) == 11 and r[11] > 0
    # with k = S a ReLU code moves only where the bias is: exactly the bias, once active
    assert torch.all(r[torch.arange(27) != 11].abs() < 1e-4), r
    assert 0 < float(r[11]) <= 5.0 + 1e-4
    ad.bias.data[11] = -5.0
    assert edit_readout(model, tok, sae, ad, HOOK, recs)[11] < 0


def codes_off_and_on(model, tok, edits, hook, sae, recs):
    """Per record, ``hook``'s output with ``edits`` off and on, encoded by ``sae`` as dense
    [T, S] float64 codes over the completion tokens (all tokens of a text record)."""
    grabbed = []  # registered after the edits' hooks: it sees the edited output
    handle = model.get_submodule(hook).register_forward_hook(
        lambda m, i, o: grabbed.append(o[0] if isinstance(o, tuple) else o))
    try:
        for r in recs:
            p = tok(r.get("prompt", ""), add_special_tokens=False)["input_ids"]
            c = tok(r.get("completion", r.get("text")), add_special_tokens=False)["input_ids"]
            ids, start = (p + c, len(p)) if "prompt" in r else (c, 0)
            grabbed.clear()
            with torch.no_grad():
                with edits.disabled():
                    model(torch.tensor([ids]))
                model(torch.tensor([ids]))
            yield tuple(torch.zeros(len(ids) - start, sae.d_sae, dtype=torch.float64).scatter(
                1, i, v.double()) for v, i in (sae.encode(g[0, start:]) for g in grabbed))
    finally:
        handle.remove()


def test_switched_readout_counts_only_latents_switched_on_or_off(tok):
    """The switched part of the readout against a dense float64 count: on each token, a latent
    active in the edited code and not the unedited one adds its edited value, one active only
    in the unedited code subtracts its unedited value, and latents active in both (which only
    grow or shrink) add nothing; the full readout is the plain mean difference."""
    from sae_sparse.report import edit_readout

    model = tiny_gpt2(vocab=len(tok))
    sae = ss.SAE.random(32, 90, 6)
    ad = ss.LatentAdapter(90, 4)
    with torch.no_grad():
        ad.bias.normal_(0, 2.0)
        ad.gain.normal_(0, 0.5)
    recs = [{"prompt": "the cat", "completion": " sees a red dog"}, {"text": "a bird runs"},
            {"prompt": "a", "completion": " fish tree house"}]
    full, flips = edit_readout(model, tok, sae, ad, HOOK, recs, switched=True)
    from sae_sparse.hooks import attach
    edits = attach(model, {HOOK: (sae, ad)})
    want_full = torch.zeros(90, dtype=torch.float64)
    want_flips = torch.zeros(90, dtype=torch.float64)
    n = 0
    try:
        for z0, z1 in codes_off_and_on(model, tok, edits, HOOK, sae, recs):
            want_full += (z1 - z0).sum(0)
            want_flips += (torch.where((z1 > 0) & (z0 <= 0), z1, 0.0)
                           - torch.where((z0 > 0) & (z1 <= 0), z0, 0.0)).sum(0)
            n += z0.shape[0]
    finally:
        edits.remove()
    torch.testing.assert_close(full.double(), want_full / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flips.double(), want_flips / n, rtol=1e-5, atol=1e-6)
    assert (flips != 0).any() and not torch.equal(flips, full)  # the case tests something


def test_readout_downstream_of_a_multi_layer_edit(tok):
    """``upstream=``: at the second layer of a two-layer edit the readout is the code of that
    layer's output with both edits on minus with both off (a dense float64 recomputation),
    which differs from the second adapter's own readout on the unedited residual; the edit
    at the layer itself may not be passed twice."""
    from sae_sparse.hooks import attach
    from sae_sparse.report import edit_readout

    model = tiny_gpt2(vocab=len(tok))
    h0, h1 = "transformer.h.0", "transformer.h.1"
    saes = {h: ss.SAE.random(32, 70, 5, generator=torch.Generator().manual_seed(s))
            for h, s in ((h0, 1), (h1, 2))}
    ads = {h: ss.LatentAdapter(70, 3) for h in (h0, h1)}
    with torch.no_grad():
        for a in ads.values():
            a.bias.normal_(0, 1.5)
            a.gain.normal_(0, 0.5)
    recs = [{"prompt": "the cat", "completion": " sees a red dog"}, {"text": "a bird runs"}]
    up = {h0: (saes[h0], ads[h0])}
    got = edit_readout(model, tok, saes[h1], ads[h1], h1, recs, upstream=up, skip_first=1)
    alone = edit_readout(model, tok, saes[h1], ads[h1], h1, recs, skip_first=1)
    edits = attach(model, {h0: (saes[h0], ads[h0]), h1: (saes[h1], ads[h1])}, skip_first=1)
    want, n = torch.zeros(70, dtype=torch.float64), 0
    try:
        for z0, z1 in codes_off_and_on(model, tok, edits, h1, saes[h1], recs):
            want += (z1 - z0).sum(0)
            n += z0.shape[0]
    finally:
        edits.remove()
    torch.testing.assert_close(got.double(), want / n, rtol=1e-5, atol=1e-6)
    assert (got - alone).abs().max() > 1e-2  # the upstream edit changes what h1 reads
    with pytest.raises(ValueError, match="upstream: holds the edit at 'transformer.h.1'"):
        edit_readout(model, tok, saes[h1], ads[h1], h1, recs, upstream={h1: (saes[h1], ads[h1])})


def test_report_reads_a_distilled_edit(tmp_path, tok):
    """`sae-sparse report --lift A B --contexts C` on a KL-trained run: the attribution and
    readout rankings, each top latent's lift recomputed here in float64 from the hooked
    activations, the lift in the edit's direction, and top contexts."""
    from sae_sparse.report import ATTRIBUTION, READOUT, SWITCHED, TARGET

    model, _ = saved_tiny_gpt2(tmp_path / "model")
    sae = ss.SAE.random(32, 90, 6)
    ss.io.save_sparsify(sae, str(tmp_path / "sae"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(24)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"),
                 "--hook", HOOK, "--data", str(data), "--loss", "kl", "--steps", "3",
                 "--edit", "gain,bias", "--lr", "0.05", "--no-progress", "--no-report",
                 "--out", str(run)]) == 0
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    ra, rb = records(6, seed=7), records(6, seed=8, system="")
    for path, recs in ((a, ra), (b, rb), (c, [{"text": "the cat sees a red dog"}])):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(run), "--lift", str(a), str(b), "--contexts", str(c),
                 "--top", "5"]) == 0
    rep = json.loads((run / "report.json").read_text())["hooks"][HOOK]
    assert len(rep[READOUT]) == 5 and len(rep["lift"]) == 5
    # the measured ranking comes first: its lift is the report's headline one
    assert [x["latent"] for x in rep["lift"]] == [i for i, _ in rep[ATTRIBUTION]]
    assert rep["interpret"]["attribution"]["mean_lift"] == rep["mean_lift"]
    # the readout, switched and target rankings are interpreted too, each with its own lift
    # and contexts
    assert set(rep["interpret"]) == {"attribution", "readout", "switched", "target"}
    ro = rep["interpret"]["readout"]
    assert [x["latent"] for x in ro["lift"]] == [i for i, _ in rep[READOUT]]
    sw = rep["interpret"]["switched"]
    assert sw["latents"] == [i for i, _ in rep[SWITCHED]] and len(sw["lift"]) == 5
    assert set(sw["contexts"]) == {str(i) for i in sw["latents"]}
    sae = ss.io.load_sae(str(tmp_path / "sae"))
    grabbed = []
    h = model.get_submodule(HOOK).register_forward_hook(lambda m, i, o: grabbed.append(
        o[0] if isinstance(o, tuple) else o))

    def mean_act(recs, key="prompt"):  # the unedited model's SAE code on the completion
        tot, n = torch.zeros(sae.d_sae, dtype=torch.float64), 0  # tokens, float64
        for r in recs:
            p = tok(r[key], add_special_tokens=False)["input_ids"]
            comp = tok(r["completion"], add_special_tokens=False)["input_ids"]
            grabbed.clear()
            with torch.no_grad():
                model(torch.tensor([p + comp]))
                v, i = sae.encode(grabbed[0][0, len(p):])
            tot.index_add_(0, i.reshape(-1), v.reshape(-1).double())
            n += len(comp)
        return tot / n
    try:
        ma, mb = mean_act(ra), mean_act(rb)
        # the target: on the run's eval split (as the readout), the same completions after
        # the teacher's prompt and after the student's
        ev = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines() if x.strip()]
        target = mean_act(ev, "teacher_prompt") - mean_act(ev)
    finally:
        h.remove()
    # its ranking, values and cosine with the edit's readout
    tops = torch.topk(target.abs(), 5).indices.tolist()
    assert [i for i, _ in rep[TARGET]] == tops and target.abs()[tops[-1]] > 0
    got = dict(rep["target"])
    for i in tops:
        assert got[i] == pytest.approx(float(target[i]), rel=1e-4, abs=1e-6)
    assert rep["interpret"]["target"]["latents"] == tops
    from sae_sparse.report import edit_readout
    from sae_sparse.training import load_adapter
    readout = edit_readout(model, tok, sae, load_adapter(str(run))[0][HOOK], HOOK, ev).double()
    want = float(torch.nn.functional.cosine_similarity(readout, target, dim=0))
    assert rep["target_cosine"] == pytest.approx(want, rel=1e-3, abs=1e-5)
    assert "the distillation's target" in (run / "report.md").read_text()
    for x in rep["lift"] + ro["lift"] + sw["lift"]:
        i = x["latent"]
        assert x["mean_a"] == pytest.approx(float(ma[i]), rel=1e-4, abs=1e-6)
        assert x["mean_b"] == pytest.approx(float(mb[i]), rel=1e-4, abs=1e-6)
        if x["mean_b"] > 0 and x["mean_a"] > 0:
            want = x["lift"] if x["edit"] >= 0 else x["mean_b"] / x["mean_a"]
            assert x["lift_edit_dir"] == pytest.approx(want)
    assert set(rep["contexts"]) == {str(i) for i, _ in rep[ATTRIBUTION]}  # JSON keys
    md = (run / "report.md").read_text()
    assert "as the SAE reads it" in md and "in the edit's direction" in md


def test_report_of_a_two_layer_edit_reads_the_run_so_far(tmp_path, tok):
    """`sae-sparse report` on a run with edits at two layers: at the second layer the readout
    is the whole run's effect there (both edits on against both off, ``upstream=``), at the
    first the first edit's alone, each against ``edit_readout`` on the run's eval split."""
    from sae_sparse.report import READOUT, edit_readout
    from sae_sparse.training import load_adapter

    h0, h1 = "transformer.h.0", "transformer.h.1"
    model, _ = saved_tiny_gpt2(tmp_path / "model")
    saes = {}
    for h, seed in ((h0, 3), (h1, 4)):
        saes[h] = ss.SAE.random(32, 70, 5, generator=torch.Generator().manual_seed(seed))
        ss.io.save_sparsify(saes[h], str(tmp_path / f"sae{seed}"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(24)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae3"),
                 "--sae", str(tmp_path / "sae4"), "--hook", h0, "--hook", h1, "--data",
                 str(data), "--loss", "kl", "--steps", "3", "--edit", "gain,bias", "--lr",
                 "0.05", "--no-progress", "--no-report", "--out", str(run)]) == 0
    assert main(["report", str(run), "--top", "5"]) == 0
    rep = json.loads((run / "report.json").read_text())["hooks"]
    ads = load_adapter(str(run))[0]
    ev = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines() if x.strip()]
    want = {h0: edit_readout(model, tok, saes[h0], ads[h0], h0, ev),
            h1: edit_readout(model, tok, saes[h1], ads[h1], h1, ev,
                             upstream={h0: (saes[h0], ads[h0])})}
    alone = edit_readout(model, tok, saes[h1], ads[h1], h1, ev)
    for h in (h0, h1):
        assert [i for i, _ in rep[h][READOUT]] == torch.topk(want[h].abs(), 5).indices.tolist()
        for i, v in rep[h][READOUT]:
            assert v == pytest.approx(abs(float(want[h][i])), rel=1e-4, abs=1e-6)
    assert (want[h1] - alone).abs().max() > 1e-3  # the first edit changes what h1 reads
    assert "the whole run's effect so far" in (run / "report.md").read_text()


def _peft_lora(model, seed=0):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                      target_modules=["c_attn"],
                                                      fan_in_fan_out=True))


def test_peft_lora_trains_in_the_same_loop_as_a_hand_written_one(tmp_path, tok):
    """train_adapter(peft_model, tok, {}, ...): PEFT's LoRA on the trainer's data order,
    teacher (the adapter disabled), KL and warmup -- the same weights as a loop written by
    hand with them, and a stop + resume gives them too."""
    from sae_sparse.training import (Schedule, collate, kl_loss, teacher_logprobs, tokenize,
                                     warmup_lr)

    recs = records(12)
    cfg = TrainConfig(loss="kl", steps=3, batch_size=4, lr=0.05, warmup_steps=2, l1=0.0,
                      eval_frac=0.0, seed=1)
    pm = _peft_lora(tiny_gpt2(vocab=len(tok)))
    m = train_adapter(pm, tok, {}, recs, str(tmp_path / "a"), cfg, progress=False, log=None)
    assert m["final_train_loss"] is not None and (tmp_path / "a" / "adapter_config.json").exists()
    from sae_sparse.training import load_adapter
    with pytest.raises(ValueError, match="holds a PEFT adapter"):
        load_adapter(str(tmp_path / "a"))
    got = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}

    ref = _peft_lora(tiny_gpt2(vocab=len(tok)))  # the hand-written loop
    import random
    order = list(range(len(recs)))  # the trainer's split: a seeded shuffle, none held out
    random.Random(cfg.seed).shuffle(order)
    data = tokenize([recs[i] for i in order], tok, cfg.max_len, teacher=True)
    sched = Schedule(len(data), cfg.batch_size, 1, cfg.seed)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    pad = tok.pad_token_id
    for step in range(cfg.steps):
        batch = [data[i] for i in sched.batch(step, 0)]
        ids, attn, lm, _ = collate(batch, pad)
        with ref.disable_adapter(), torch.no_grad():
            t = teacher_logprobs(ref, batch, pad)
        loss = kl_loss(ref, ids, attn, lm, t)
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = warmup_lr(cfg.lr, 2, step)
        opt.step()
    want = {n: p.detach() for n, p in ref.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(float(w.abs().max()) > 0 for n, w in want.items() if "lora_B" in n)

    pm2 = _peft_lora(tiny_gpt2(vocab=len(tok)))  # stop after 2 steps, resume to 3
    train_adapter(pm2, tok, {}, recs, str(tmp_path / "b"), TrainConfig(
        **{**cfg.__dict__, "steps": 2}), progress=False, log=None)
    pm3 = _peft_lora(tiny_gpt2(vocab=len(tok)))
    train_adapter(pm3, tok, {}, recs, str(tmp_path / "b"), cfg, progress=False, log=None)
    for n, p in pm3.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.detach(), got[n], rtol=0, atol=0, msg=n)


def test_an_empty_saes_dict_needs_a_peft_model(tmp_path, tok):
    with pytest.raises(ValueError, match="saes is empty"):
        train_adapter(tiny_gpt2(vocab=len(tok)), tok, {}, records(4), str(tmp_path / "a"),
                      TrainConfig(loss="kl"), progress=False, log=None)
