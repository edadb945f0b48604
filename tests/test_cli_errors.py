"""The CLI on a user's mistakes: one line on stderr (``sae-sparse: error: ...``), exit status
2, no traceback, found before the model loads, and nothing written to the run directory.
``--debug`` shows the traceback instead."""
import json
import os
import re
import time

import pytest
import torch

pytest.importorskip("transformers")

import sae_sparse as ss  # noqa: E402
from sae_sparse.cli import main  # noqa: E402
from sae_sparse.io import save_saelens, save_sparsify  # noqa: E402

from tiny_models import saved_tiny_gpt2  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved GPT-2 (d = 32, 2 blocks), SAEs saved by this package in SAELens and sparsify
    format, and a small data file."""
    root = tmp_path_factory.mktemp("cli_errors")
    saved_tiny_gpt2(root / "model")
    g = torch.Generator().manual_seed(0)
    save_saelens(ss.SAE.random(32, 40, 4, generator=g), str(root / "sae"),
                 hook_name="blocks.1.hook_resid_post")
    save_sparsify(ss.SAE.random(32, 40, 4, b_pre=True, generator=g), str(root / "noname"))
    save_saelens(ss.SAE.random(32, 40, 4, generator=g), str(root / "sae_h1"),
                 hook_name="transformer.h.1")  # the module "sae"'s hook name resolves to
    save_saelens(ss.SAE.random(64, 40, 4, generator=g), str(root / "wide"),
                 hook_name="blocks.1.hook_resid_post")
    nan = ss.SAE.random(32, 40, 4, generator=g)
    with torch.no_grad():
        nan.W_enc[3, 5] = float("nan")
    save_saelens(nan, str(root / "nan_sae"), hook_name="blocks.1.hook_resid_post")
    relu = ss.SAE.random(32, 40, 4, threshold=True, generator=g)
    save_saelens(relu, str(root / "jumprelu"), hook_name="blocks.1.hook_resid_post")
    cfg = json.loads((root / "jumprelu" / "cfg.json").read_text())
    del cfg["k"]  # as SAELens writes a JumpReLU SAE: no k of its own
    (root / "jumprelu" / "cfg.json").write_text(json.dumps(cfg))
    words = "the a cat dog bird fish tree house red blue runs sees".split()
    with open(root / "data.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": " ".join(words[(i + j) % 12] for j in range(8))}) + "\n")
    (root / "bad.jsonl").write_text('{"text": "a cat"}\n{"text": "a dog"}\n{"text": "a\n')
    (root / "nokey.jsonl").write_text('{"text": "a cat"}\n\n{"prompt": "a"}\n')
    (root / "empty.jsonl").write_text("\n")
    save_saelens(ss.SAE.random(32, 40, 4, generator=g), str(root / "trunc"),
                 hook_name="blocks.1.hook_resid_post")
    w = (root / "trunc" / "sae_weights.safetensors").read_bytes()
    (root / "trunc" / "sae_weights.safetensors").write_bytes(w[:len(w) // 2])
    (root / "notasae").mkdir()
    (root / "notamodel").mkdir()
    return root


def train_args(f, out, *extra, sae="sae", data="data.jsonl", model="model"):
    return ["train", "--model", str(f / model), "--sae", str(f / sae), "--data", str(f / data),
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--no-progress", *extra]


def one_line_error(capsys, rc, *, code=2):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()
             and not line.startswith("[transformers]")]
    assert rc == code, err
    assert "Traceback" not in err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, lines
    return errors[0]


def run(capsys, argv):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own mistakes
        rc = e.code
    return rc, one_line_error(capsys, rc)


BAD_TRAIN = [  # (id, extra args / overrides, expected words in the one line)
    ("no-model", dict(model=None), "train needs --model"),
    ("no-data-file", dict(data="missing.jsonl"), "no data file"),
    ("bad-json", dict(data="bad.jsonl"), "bad.jsonl:3: not valid JSON"),
    ("record-without-text", dict(data="nokey.jsonl"),
     "nokey.jsonl:3: each record needs 'text' or 'prompt' and 'completion'"),
    ("no-records", dict(data="empty.jsonl"), "empty.jsonl: no records"),
    ("missing-sae", dict(sae="nowhere"), "nowhere: no such file or directory"),
    ("not-an-sae", dict(sae="notasae"), "no SAE format recognised"),
    ("width-mismatch", dict(sae="wide"),
     "reads vectors of width 64, but the hook blocks.1.hook_resid_post (transformer.h.1) "
     "outputs width 32"),
    ("hook-typo", (["--hook", "transformer.h.7"], {}), "did you mean transformer.h.1"),
    ("hook-past-last-block", (["--hook", "blocks.9.hook_resid_post"], {}),
     "the model has 2 blocks"),
    ("nan-weights", dict(sae="nan_sae"), "non-finite values (NaN/inf) in W_enc (1 of 1280)"),
    ("k-zero", (["--k", "0"], {}), "--k: expected a positive integer, got '0'"),
    ("k-above-d_sae", (["--k", "41"], {}), "k must be"),
    ("relu-sae-without-k", dict(sae="jumprelu"), "has no top-k of its own"),
    ("latents-out-of-range", (["--latents", "3,40"], {}), "--latents 40 is out of range"),
    ("latents-not-ints", (["--latents", "a,b"], {}), "--latents must list integer latent ids"),
    ("latents-file-missing", (["--latents", "@nofile.txt"], {}), "--latents: no file"),
    ("unknown-edit", (["--edit", "gain,foo"], {}), "unknown edit 'foo'"),
    ("bad-baseline", (["--baseline", "lora:x"], {}), "baseline must be None, 'dense' or"),
    ("model-path-typo", dict(model="modle/x"), "no such directory"),
    ("model-dir-without-config", dict(model="notamodel"),
     "is not a Hugging Face model directory"),
    ("hooks-vs-saes", (["--hook", "transformer.h.0", "--hook", "transformer.h.1"], {}),
     "give one --hook per --sae"),
    ("sae-names-no-hook", dict(sae="noname"), "its config names no hook; pass --hook"),
    ("no-cuda", (["--device", "cuda"], {}), "this machine has no CUDA device"),
    ("eval-frac", (["--eval-frac", "1.5"], {}), "--eval-frac: expected a fraction in [0, 1)"),
    ("nan-lr", (["--lr", "nan"], {}), "--lr: expected a finite number, got 'nan'"),
    ("two-saes-one-module", (["--sae", "{sae_h1}"], {}),
     "two SAEs edit the same module transformer.h.1"),
    ("negative-lr", (["--lr", "-1"], {}), "--lr: expected a finite number >= 0"),
    ("negative-warmup", (["--warmup-steps", "-1"], {}), "--warmup-steps: expected an integer >= 0"),
    ("same-sae-twice", (["--sae", "{sae}"], {}), "the same --sae is given twice"),
    ("truncated-sae", dict(sae="trunc"), "trunc/sae_weights.safetensors: not a readable "
     "safetensors file, truncated or corrupt"),
    ("skip-first-word", (["--skip-first", "some"], {}),
     "--skip-first: expected an integer >= 0 or 'auto', got 'some'"),
]


@pytest.mark.parametrize("case", BAD_TRAIN, ids=[c[0] for c in BAD_TRAIN])
def test_train_mistakes_are_one_line_before_anything_is_written(files, tmp_path, capsys, case,
                                                                monkeypatch):
    name, spec, expected = case
    if name == "no-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(files)  # "modle/x": a relative path whose first directory does not exist
    extra, over = spec if isinstance(spec, tuple) else ([], spec)
    extra = [e.replace("{sae}", str(files / "sae")).replace("{sae_h1}", str(files / "sae_h1"))
             for e in extra]
    out = tmp_path / "run"
    argv = train_args(files, out, *extra, **{k: v for k, v in over.items() if v is not None})
    if "model" in over and over["model"] is None:
        i = argv.index("--model")
        del argv[i:i + 2]
    # nothing may load the model's weights before these checks
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    t0 = time.time()
    rc, line = run(capsys, argv)
    assert expected in line, line
    assert not out.exists(), "the run directory was created"
    assert time.time() - t0 < 30


@pytest.mark.parametrize("where", ["out", "parent"])
def test_out_naming_a_file_is_refused_before_the_model_loads(files, tmp_path, capsys,
                                                               monkeypatch, where):
    (tmp_path / "taken").write_text("not a run\n")
    out = tmp_path / "taken" if where == "out" else tmp_path / "taken" / "run"
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    rc, line = run(capsys, train_args(files, out))
    assert f"--out {out}: {tmp_path / 'taken'} is a file" in line, line
    assert (tmp_path / "taken").read_text() == "not a run\n"


def test_debug_shows_the_traceback(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        main(train_args(files, tmp_path / "r", "--debug", data="missing.jsonl"))


def test_hook_from_the_sae_config_and_mismatch_warning(files, tmp_path, capsys):
    """A SAELens SAE naming its hook (TransformerLens blocks.1.hook_resid_post) trains
    without --hook, at transformer.h.1; a --hook elsewhere warns in one line."""
    out = tmp_path / "run"
    assert main(train_args(files, out, "--no-report")) == 0
    conf = json.loads((out / "adapter_config.json").read_text())
    assert list(conf["hooks"]) == ["transformer.h.1"]
    capsys.readouterr()
    assert main(train_args(files, tmp_path / "run2", "--hook", "transformer.h.0",
                           "--no-report")) == 0
    err = capsys.readouterr().err
    assert ("sae-sparse: warning: --hook transformer.h.0 differs from the hook "
            "'blocks.1.hook_resid_post'") in err
    conf = json.loads((tmp_path / "run2" / "adapter_config.json").read_text())
    assert list(conf["hooks"]) == ["transformer.h.0"]


def test_k_against_a_topk_sae_warns(files, tmp_path, capsys):
    assert main(train_args(files, tmp_path / "r", "--k", "2", "--no-report")) == 0
    err = capsys.readouterr().err
    assert "sae-sparse: warning: k=2 replaces the k=4 this TopK SAE was trained with" in err
    conf = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert conf["hooks"]["transformer.h.1"]["k"] == 2


def test_report_model_override(files, tmp_path, capsys):
    """report --model: a run whose base model moved is reported from the model's new place,
    word for word as from the old one; a --model that is not a model is named in one line."""
    import shutil
    model = tmp_path / "model_copy"
    shutil.copytree(files / "model", model)
    out = tmp_path / "run"
    assert main(train_args(files, out, "--lr", "0.1", "--edit", "gain,bias",
                           model=os.path.relpath(model, files))) == 0
    before = (out / "report.md").read_text()
    (out / "report.md").unlink()
    moved = tmp_path / "moved_model"
    os.rename(model, moved)
    capsys.readouterr()
    assert main(["report", str(out), "--model", str(moved)]) == 0
    assert (out / "report.md").read_text() == before
    rc, line = run(capsys, ["report", str(out), "--model", str(files / "notamodel")])
    assert f"--model {files / 'notamodel'}:" in line


def test_run_commands_on_bad_run_dirs(files, tmp_path, capsys):
    """report / merge / generate on a directory that is not a run; a run whose SAE moved
    is reported as missing and found again with --sae; merge of a non-bias edit."""
    rc, line = run(capsys, ["report", str(files / "notamodel")])
    assert "is not a finished run directory" in line
    out = tmp_path / "run"
    sae_dir = tmp_path / "sae_copy"
    import shutil
    shutil.copytree(files / "sae", sae_dir)
    assert main(train_args(files, out, "--no-report", "--lr", "0.1", "--edit", "gain,bias",
                           sae=os.path.relpath(sae_dir, files))) == 0
    capsys.readouterr()
    moved = tmp_path / "moved_sae"
    os.rename(sae_dir, moved)
    rc, line = run(capsys, ["report", str(out)])
    assert "the SAE for transformer.h.1 is missing: nothing at" in line
    assert not (out / "report.md").exists()
    assert main(["report", str(out), "--sae", str(moved)]) == 0
    assert main(["report", str(out), "--sae", f"transformer.h.1={moved}"]) == 0
    assert (out / "report.md").exists()
    capsys.readouterr()
    rc, line = run(capsys, ["report", str(out), "--sae", f"transformer.h.0={moved}"])
    assert "the run has no hook 'transformer.h.0'" in line
    rc, line = run(capsys, ["merge", str(out), "--out", str(tmp_path / "merged"), "--sae",
                            str(moved)])
    assert "non-zero gain/ffn terms; only a bias-only edit" in line
    assert not (tmp_path / "merged").exists()
    rc, line = run(capsys, ["generate", str(out)])
    assert "generate needs --prompt" in line


def test_sparsify_command_says_it_needs_cuda(capsys):
    pytest.importorskip("sparsify")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["sparsify", "gpt2", "data.bin"])
    assert "needs a CUDA GPU" in one_line_error(capsys, rc)


def test_help_shows_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for flag, default in (("--steps", "200"), ("--lr", "0.01"), ("--batch-size", "8"),
                          ("--log-every", "10"), ("--out", "sae_sparse_run"),
                          ("--edit", "gain,bias,ffn:16")):
        pattern = rf"{flag} \S+ (?:(?! --[a-z]).)*?\(default: {re.escape(default)}\)"
        assert re.search(pattern, flat), flag
    flags = set(re.findall(r"^\s+(--[a-z0-9-]+)", out, re.M))
    assert len(flags) >= 25
    for sub in ("report", "merge", "generate", "demo"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        assert "--debug" in capsys.readouterr().out


NON_FINITE = [  # every float flag of every subcommand refuses NaN and inf in one line
    ("train", "--lr"), ("train", "--l1"), ("train", "--weight-decay"), ("train", "--eval-frac"),
    ("generate", "--strength"), ("generate", "--temperature"),
    ("train-sae", "--lr"), ("train-sae", "--auxk-alpha"), ("train-sae", "--eval-frac"),
]


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("cmd,flag", NON_FINITE, ids=[f"{c}{f}" for c, f in NON_FINITE])
def test_non_finite_numbers_are_refused(files, tmp_path, capsys, cmd, flag, value):
    base = {"train": train_args(files, tmp_path / "run"),
            "generate": ["generate", str(tmp_path / "run")],
            "train-sae": ["train-sae", "--model", str(files / "model"), "--hook",
                          "transformer.h.1", "--out", str(tmp_path / "sae")]}[cmd]
    rc, line = run(capsys, [*base, flag, value])
    assert f"argument {flag}: expected a finite number" in line or \
        f"argument {flag}: expected a fraction in [0, 1), got '{value}'" in line, line
    assert not any(tmp_path.iterdir())


def test_width_is_checked_before_loading_a_model_with_a_pad_token(tmp_path, capsys,
                                                                   monkeypatch):
    """The demo GPT-2 has a pad token, for which transformers looks for padding in the input
    (a .item() the meta-device forward cannot give): the width check still runs before the
    model loads, and --out is not made."""
    from sae_sparse.demo import ASSETS
    g = torch.Generator().manual_seed(0)
    save_saelens(ss.SAE.random(16, 48, 4, generator=g), str(tmp_path / "sae16"),
                 hook_name="transformer.h.1")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "the cat runs"}) + "\n")
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    rc, line = run(capsys, ["train", "--model", os.path.join(ASSETS, "model"), "--sae",
                            str(tmp_path / "sae16"), "--data", str(tmp_path / "d.jsonl"),
                            "--out", str(tmp_path / "run"), "--no-progress"])
    assert "reads vectors of width 16, but the hook transformer.h.1 (transformer.h.1) " \
           "outputs width 32" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cmd,cls", [("train", "sae_sparse.training.config:TrainConfig"),
                                     ("train-sae", "sae_sparse.train_sae:SAETrainConfig")])
def test_config_fields_and_flags_are_one_source(cmd, cls):
    """Every field of the config dataclass has a flag of the same name and default, and the
    flag's help is the field's (so a default or a help text lives in one place)."""
    import argparse
    import dataclasses
    import importlib

    from sae_sparse.cli import _parsers
    mod, name = cls.split(":")
    config = getattr(importlib.import_module(mod), name)
    sub = next(a for a in _parsers()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices[cmd]._actions}
    for f in dataclasses.fields(config):
        assert f.name in actions, f"{cmd}: no flag for {name}.{f.name}"
        a = actions[f.name]
        assert a.default == f.default, (f.name, a.default, f.default)
        assert a.option_strings[0] == "--" + f.name.replace("_", "-")
        if f.metadata.get("flag", True):
            assert a.help == f.metadata["help"], f.name
