"""A behaviour of the user's own, start to finish, as the README shows it: ``make-data`` (the
model answers questions with a system prompt), ``train --loss kl``, ``report RUN`` with
nothing else, ``generate`` on the held-out prompts; and the defaults for pretrained models
(``skip_first``, ``warmup_steps`` and ``eval_frac`` set to ``auto``)."""
import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import sae_sparse as ss  # noqa: E402
from sae_sparse import datagen  # noqa: E402
from sae_sparse.cli import main  # noqa: E402
from sae_sparse.demo import ASSETS, WORDS, word_tokenizer  # noqa: E402
from sae_sparse.training import TrainConfig, load_adapter, train_adapter  # noqa: E402

from tiny_models import tiny_gpt2  # noqa: E402

# a chat template with a system role (as SmolLM2's), and one without (as Gemma's)
CHAT = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}then {% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
             "{% endif %}" + CHAT)
SYSTEM = "the big red fire"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The demo's shipped model, its tokenizer given a chat template."""
    root = tmp_path_factory.mktemp("behaviour")
    shutil.copytree(f"{ASSETS}/model", root / "model")
    cfg = json.loads((root / "model" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT
    (root / "model" / "tokenizer_config.json").write_text(json.dumps(cfg))
    questions = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(4)) for i in range(30)]
    (root / "questions.txt").write_text("\n".join(questions) + "\n")
    return root


def test_chat_text_with_and_without_a_system_role():
    tok = word_tokenizer()
    tok.chat_template = CHAT
    assert datagen.chat_text(tok, "a cat") == "user a cat then "
    assert datagen.chat_text(tok, "a cat", SYSTEM) == f"system {SYSTEM} user a cat then "
    tok.chat_template = NO_SYSTEM  # the system prompt goes to the head of the user turn
    assert datagen.chat_text(tok, "a cat", SYSTEM) == f"user {SYSTEM}\n\na cat then "
    tok.chat_template = None
    assert datagen.chat_text(tok, "a cat", SYSTEM) == f"{SYSTEM}\n\nQuestion: a cat\nAnswer:"
    assert datagen.teacher_text(tok, "a cat", template="sun {question} moon") == "sun a cat moon"
    with pytest.raises(ValueError, match="must contain"):
        datagen.teacher_text(tok, "a cat", template="no slot")


def test_read_questions_refuses_duplicates_and_bad_records(tmp_path):
    (tmp_path / "q.txt").write_text("a\n\nb\na\n")
    with pytest.raises(ValueError, match="appears twice"):
        datagen.read_questions(str(tmp_path / "q.txt"))
    (tmp_path / "q.jsonl").write_text('{"question": "a"}\n{"q": "b"}\n')
    with pytest.raises(ValueError, match="q.jsonl:2: each record needs a 'question'"):
        datagen.read_questions(str(tmp_path / "q.jsonl"))
    with pytest.raises(ValueError, match="no training records"):
        datagen.split_records(list("abc"), val=0.4, heldout=0.5)


def test_a_behaviour_from_an_empty_directory(demo_model, tmp_path, capsys, monkeypatch):
    """make-data -> train --loss kl -> report RUN alone -> generate on the held-out prompts,
    in an empty directory, with the commands of docs/training-adapters.md."""
    monkeypatch.chdir(tmp_path)
    model = str(demo_model / "model")
    sae = f"{ASSETS}/sae"
    make = ["make-data", "--model", model, "--questions", str(demo_model / "questions.txt"),
            "--system-prompt", SYSTEM, "--out", "data", "--max-new-tokens", "6",
            "--batch-size", "7", "--no-progress"]
    assert main(make) == 0
    splits = {s: [json.loads(x) for x in open(f"data/{s}.jsonl")] for s in datagen.SPLITS}
    assert {s: len(r) for s, r in splits.items()} == {"train": 24, "val": 3, "heldout": 3}
    assert sorted(r["question"] for rs in splits.values() for r in rs) == sorted(
        open(demo_model / "questions.txt").read().split("\n")[:-1])
    tok = ss.load_model(model)[1]
    for r in splits["train"]:
        assert r["prompt"] == datagen.chat_text(tok, r["question"])
        assert r["teacher_prompt"] == f"system {SYSTEM} " + r["prompt"]
        assert r["completion"].strip()
    # the teacher's answer is the model's greedy continuation of the teacher's prompt
    r = splits["heldout"][0]
    m, _ = ss.load_model(model)
    ids = tok(r["teacher_prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    y = m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert r["completion"].removesuffix(tok.eos_token) == tok.decode(
        y[0, ids.shape[1]:], skip_special_tokens=True)

    # a rerun resumes: nothing is generated again
    import sae_sparse.generate as gen
    monkeypatch.setattr(gen, "generate_answers", lambda *a, **k: pytest.fail("regenerated"))
    assert main(make) == 0
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(make[:6] + ["the small moon"] + make[7:]) == 2  # another system prompt
    assert "holds data made with other settings (system_prompt)" in capsys.readouterr().err

    assert main(["train", "--model", model, "--sae", sae, "--data", "data/train.jsonl",
                 "--loss", "kl", "--steps", "4", "--batch-size", "8", "--out", "run",
                 "--no-progress", "--no-report"]) == 0
    assert main(["report", "run"]) == 0
    rep = json.loads(open("run/report.json").read())
    assert rep["sources"] == {"lift": "run", "contexts": "run"}
    (h,) = rep["hooks"].values()
    assert h["lift"] and h["contexts"] and "readout" in h["interpret"]
    base = [json.loads(x) for x in open("run/student_answers.jsonl")]
    evals = [json.loads(x) for x in open("run/eval.jsonl")]
    assert [b["prompt"] for b in base] == [e["prompt"] for e in evals]
    md = open("run/report.md").read()
    assert "base model's own greedy answers" in md and "Top-activating contexts" in md

    capsys.readouterr()
    assert main(["generate", "run", "--prompts", "data/heldout.jsonl",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert all(f": {r['question']}" in out for r in splits["heldout"])


def planted_sink(n_sinks):
    """A tiny GPT-2 whose first ``n_sinks`` positions carry a position embedding 300x the
    others': an attention sink's residual norm at every later block."""
    model = tiny_gpt2(vocab=len(word_tokenizer()), layers=2)
    with torch.no_grad():
        model.transformer.wpe.weight[:n_sinks] *= 300
    return model


@pytest.mark.parametrize("n", [0, 1, 2])
def test_sink_positions_finds_planted_sinks(n):
    from sae_sparse.sinks import sink_positions

    tok = word_tokenizer()
    recs = [{"text": " ".join(WORDS[(i + j) % 40] for j in range(12))} for i in range(8)]
    got, ratio = sink_positions(planted_sink(n), tok, recs, "transformer.h.0")
    assert got == n, ratio


def test_skip_first_auto_is_resolved_on_the_data_and_recorded(tmp_path):
    tok = word_tokenizer()
    recs = [{"text": " ".join(WORDS[(3 * i + j) % 40] for j in range(10))} for i in range(24)]
    sae = ss.SAE.random(32, 48, 4)
    cfg = TrainConfig(edit="bias", steps=2, batch_size=4)
    assert cfg.skip_first == "auto"
    m = train_adapter(planted_sink(1), tok, {"transformer.h.1": sae}, recs,
                      str(tmp_path / "run"), cfg, progress=False, log=None)
    _, conf = load_adapter(str(tmp_path / "run"))
    assert conf["skip_first"] == 1 == m["skip_first"]
    assert conf["train_config"]["skip_first"] == "auto"  # resumes compare what was asked
    # the same run again resumes (auto resolves the same), not a mismatch
    train_adapter(planted_sink(1), tok, {"transformer.h.1": sae}, recs,
                  str(tmp_path / "run"), TrainConfig(edit="bias", steps=3, batch_size=4),
                  progress=False, log=None)


def test_auto_warmup_and_eval_size():
    assert TrainConfig().warmup() == 20  # 200 steps, the default edit has an FFN
    assert TrainConfig(edit="gain,bias").warmup() == 0
    assert TrainConfig(baseline="lora:4").warmup() == 0
    assert TrainConfig(steps=5).warmup() == 1
    assert TrainConfig(warmup_steps=7).warmup() == 7
    cfg = TrainConfig()
    assert [cfg.eval_count(n) for n in (1, 2, 10, 40, 200, 1000, 5000)] == [
        0, 0, 2, 8, 32, 100, 256]
    assert TrainConfig(eval_frac=0.25).eval_count(16) == 4
    assert TrainConfig(eval_frac=0.0).eval_count(100) == 0
    with pytest.raises(ValueError, match="eval_frac must be in"):
        TrainConfig(eval_frac=1.5).validate()


def test_an_edit_that_ends_worse_than_none_is_flagged(tmp_path):
    """The demo model on its own data, a gain at a rate far too high: the run warns, the
    metrics and the report say so."""
    from sae_sparse.demo import load_assets, make_data
    from sae_sparse.training import load_jsonl

    model, tok, sae, planted = load_assets()
    make_data(str(tmp_path / "d.jsonl"), seed=0)
    recs = load_jsonl(str(tmp_path / "d.jsonl"))[:64]
    with pytest.warns(UserWarning, match="ended above the unedited model's"):
        m = train_adapter(model, tok, {planted["hook"]: sae}, recs, str(tmp_path / "run"),
                          TrainConfig(edit="gain", steps=2, batch_size=8, lr=3.0, l1=0),
                          progress=False, log=None)
    assert m["final_eval_loss"] > m["base_eval_loss"] and len(m["warnings"]) == 1
    ss.write_report(str(tmp_path / "run"), model=model, tokenizer=tok,
                    saes={planted["hook"]: sae}, standalone=False)
    assert "**warning:** the edited model's eval loss" in (tmp_path / "run" / "report.md"
                                                           ).read_text()


def test_lift_flags_latents_moved_against_the_target():
    from sae_sparse.report.compute import lift_summary

    lift = [{"latent": 1, "mean_a": 4.0, "mean_b": 1.0, "lift": 4.0},   # raised, a uses it
            {"latent": 2, "mean_a": 4.6, "mean_b": 1.0, "lift": 4.6},   # lowered, a uses it
            {"latent": 3, "mean_a": 1.0, "mean_b": 3.0, "lift": 1 / 3},  # lowered, b uses it
            {"latent": 4, "mean_a": 1.0, "mean_b": 1.1, "lift": 1 / 1.1}]  # raised, ~even
    out = lift_summary(lift, {1: 0.5, 2: -0.5, 3: -0.2, 4: 0.1})
    assert [x["against"] for x in out["lift"]] == [False, True, False, False]
    assert out["n_against"] == 1
    assert out["lift"][1]["lift_edit_dir"] == pytest.approx(1 / 4.6)
