"""Command line: ``sae-sparse train | train-sae | report | merge | generate | demo | sparsify``.

``sae-sparse train`` with no arguments runs the offline demo (tiny model + SAE shipped in the
package, a planted edit, training and the report).

A mistake of the user's own (a missing file, a bad record, an SAE that does not fit its hook,
a run directory of another run) ends with one line, ``sae-sparse: error: ...``, and exit
status 2, found before the model is loaded and before anything is written where possible;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import warnings

from . import argtypes


class UsageError(ValueError):
    """A mistake in the command line or its files: reported as one line."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, unless the help already says it, the flag is
    required, or it has none to show (None, a switch's False, an empty list)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("default" in h or action.required
                or action.default is None or action.default is False or action.default == []):
            return h
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_positive, _nonneg_int = argtypes.positive, argtypes.nonneg_int
_finite_float, _nonneg_float = argtypes.finite_float, argtypes.nonneg_float
_positive_float, _fraction = argtypes.positive_float, argtypes.fraction


def _common(p):
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line")


def config_flags(p, cls):
    """One flag per field of the config dataclass ``cls`` (``--field-name``), its default,
    help and argparse keywords taken from the field (``training.config.option``); fields
    marked ``flag=False`` have a flag of their own."""
    for f in dataclasses.fields(cls):
        kw = dict(f.metadata)
        if not kw.pop("flag", True):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, **kw)


def config_values(a, cls) -> dict:
    """The parsed values of ``cls``'s generated flags, by field name."""
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("flag", True)}


def _train_parser(sub):
    from .training.config import TrainConfig


    p = sub.add_parser("train", help="train a sparse latent adapter (no arguments: the demo)",
                       formatter_class=_Formatter,
                       description="Train an adapter in SAE latent space on a frozen causal LM. "
                       "With no arguments, runs the offline demo. Rerunning the same command "
                       "resumes from the run directory's checkpoint.")
    p.add_argument("--model", help="the causal LM: a save_pretrained directory, a .gguf file, "
                   "or a Hugging Face hub id")
    p.add_argument("--sae", action="append", default=[],
                   help="SAE path (SAELens/sparsify dir, Gemma Scope .npz, dictionary_learning "
                        "ae.pt, OpenAI .pt); repeatable, one per hook")
    p.add_argument("--hook", action="append", default=[],
                   help="where the SAE reads and edits: a module path (model.layers.6, "
                        "transformer.h.6) or a TransformerLens name (blocks.6.hook_resid_post); "
                        "repeatable, one per --sae; optional when the SAE's config names its "
                        "hook")
    p.add_argument("--data", help="JSONL of {'text'} or {'prompt','completion'} records")
    p.add_argument("--out", default="sae_sparse_run", help="run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of other data/model/SAEs/settings in --out")
    p.add_argument("--no-resume", action="store_true",
                   help="start from step 0 even if --out holds a checkpoint of this run")
    p.add_argument("--k", type=_positive, default=None,
                   help="active latents kept per token for ReLU/JumpReLU SAEs (the cap k_max; "
                        "tokens above it are counted and reported). TopK SAEs use their own k")
    p.add_argument("--latents", default=None,
                   help="restrict the edit to these latent ids: '3,17,42' or @file (ids "
                        "separated by commas/whitespace)")
    config_flags(p, TrainConfig)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if "
                   "available)")
    p.add_argument("--no-report", action="store_true", help="skip report.md")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (evaluations are still printed)")
    _common(p)
    return p


def _sae_arg(p):
    p.add_argument("--sae", action="append", default=[], metavar="[HOOK=]PATH",
                   help="the SAE's path if it moved since training (HOOK=PATH for a run with "
                        "several hooks); repeatable")


def _parse_sae_paths(items):
    out = {}
    for it in items:
        hook, eq, path = it.partition("=")
        key, val = (hook, path) if eq and not os.path.exists(it) else (None, it)
        if key in out:
            raise UsageError(f"--sae given twice for {key or 'the run'}")
        out[key] = val
    return out


# --------------------------------------------------------------------------------- pre-checks


def _parse_latents(spec):
    if spec.startswith("@"):
        if not os.path.isfile(spec[1:]):
            raise UsageError(f"--latents: no file {spec[1:]!r}")
        with open(spec[1:]) as f:
            text = f.read()
    else:
        text = spec
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--latents must list integer latent ids, got {spec!r}") from None
    if not ids or min(ids) < 0:
        raise UsageError(f"--latents must list non-negative latent ids, got {spec!r}")
    return ids


def _device(spec):
    import torch

    dev = torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: this machine has no CUDA device")
    return dev


def _precheck_train(a):
    """Everything that can be checked before the model's weights load and before the run
    directory is created. -> (records, config, {hook: SAE on the CPU}, sources, meta model)."""
    from .hookpoints import hook_width, meta_model, resolve_hook
    from .io import content_hash, load_sae, resolve_sae_path
    from .models import load_config
    from .training import TrainConfig, check_run_dir, load_jsonl, run_fingerprint

    missing = [f"--{n}" for n in ("model", "data", "sae") if not getattr(a, n)]
    if missing:
        raise UsageError(f"train needs {', '.join(missing)} (or no arguments for the demo)")
    if a.hook and len(a.hook) != len(a.sae):
        raise UsageError(f"give one --hook per --sae (got {len(a.sae)} --sae, {len(a.hook)} "
                         "--hook), or no --hook to use the hooks the SAEs' configs name")
    if len(set(a.sae)) != len(a.sae):
        raise UsageError("the same --sae is given twice")
    latents = _parse_latents(a.latents) if a.latents else None
    cfg = TrainConfig(**config_values(a, TrainConfig), latents=latents)
    cfg.validate()
    _device(a.device)  # --device cuda on a machine without CUDA fails here
    if a.backend:
        from .backends import available_backends

        if a.backend not in available_backends():
            raise UsageError(f"--backend {a.backend} is not available here (available: "
                             f"{', '.join(available_backends())})")
    records = load_jsonl(a.data)
    if a.loss == "kl":
        lacking = [n for n, r in enumerate(records, 1) if "teacher_prompt" not in r]
        if lacking:
            raise UsageError(f"--loss kl: {len(lacking)} of {len(records)} records in {a.data} "
                             f"have no 'teacher_prompt' (the first: record {lacking[0]}); the "
                             "teacher is the model with the edits off reading it")
    local = {}
    for path in a.sae:  # before the model: a missing SAE should not wait for a model load
        try:
            local[path] = resolve_sae_path(path)  # a hub folder is fetched (or found cached)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--sae: {e}") from None
    try:
        config = load_config(a.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from e
    meta = meta_model(config)
    saes, sources = {}, {}
    for n, path in enumerate(a.sae):
        sae = load_sae(local[path], k=a.k)
        info = {k: v for k, v in sae.format_info.items() if k != "cfg"}
        own = info.get("hook_name")
        if not a.hook and not own:
            raise UsageError(f"--sae {path}: its config names no hook; pass --hook (e.g. "
                             "model.layers.6 or blocks.6.hook_resid_post)")
        hook = a.hook[n] if a.hook else own
        try:
            module = resolve_hook(meta, hook)
        except ValueError as e:
            raise UsageError(f"--hook {hook}: {e}" if a.hook else
                             f"the SAE at {path} names its hook {hook!r}, which does not fit "
                             f"this model ({e}); pass --hook") from None
        if a.hook and own:
            try:
                same = resolve_hook(meta, own) == module
            except ValueError:
                same = False
            if not same:
                warnings.warn(f"--hook {hook} differs from the hook {own!r} that the SAE at "
                              f"{path} was trained on")
        if module in saes:
            raise UsageError(f"two SAEs edit the same module {module}")
        try:
            width = hook_width(meta, module)
        except Exception as e:  # a model whose forward does not run on the meta device
            warnings.warn(f"could not find {module}'s output width before loading the model "
                          f"({type(e).__name__}); it is checked at the first forward instead")
            width = sae.d_in
        if width != sae.d_in:
            raise UsageError(f"the SAE at {path} reads vectors of width {sae.d_in}, but the "
                             f"hook {hook} ({module}) outputs width {width}")
        if latents is not None and max(latents) >= sae.d_sae:
            raise UsageError(f"--latents {max(latents)} is out of range for the SAE at {path} "
                             f"(d_sae = {sae.d_sae})")
        saes[module] = sae
        sources[module] = {**info, "sha256": content_hash(local[path])}
    fingerprint = run_fingerprint(meta, saes, a.data, sae_sources=sources,
                                  model_source=_model_source(a.model))
    check_run_dir(a.out, cfg, fingerprint, resume=not a.no_resume, overwrite=a.overwrite)
    return records, cfg, saes, sources


def _model_source(spec):
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def _init_distributed(device_spec):
    """Under torchrun (WORLD_SIZE > 1): joins the process group (NCCL on CUDA, else gloo) and
    puts each rank on its own GPU. -> (rank, device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return 0, _device(device_spec)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device_spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dev


def cmd_train(a):
    if not (a.model or a.sae or a.hook or a.data):
        from .demo import run_demo

        rep = run_demo(a.out if a.out != "sae_sparse_run" else "sae_sparse_demo_run",
                       seed=a.seed, progress=not a.no_progress)
        ok = all(h["planted"]["recovered"] for h in rep["hooks"].values())
        return 0 if ok else 1
    records, cfg, saes, sources = _precheck_train(a)
    import torch.distributed as dist

    joined = not (dist.is_available() and dist.is_initialized())
    rank, device = _init_distributed(a.device)
    joined = joined and dist.is_available() and dist.is_initialized()
    try:
        return _train_and_report(a, records, cfg, saes, sources, rank, device)
    finally:
        if joined:
            # leave the group we joined before the interpreter exits: a gloo group still
            # alive at exit tears its threads down unjoined, and the process aborts
            # ("terminate called without an active exception") after a successful run
            dist.destroy_process_group()


def _train_and_report(a, records, cfg, saes, sources, rank, device):
    from .models import load_model
    from .report import write_report
    from .training import train_adapter

    model, tok = load_model(a.model, device=device)
    saes = {h: s.to(device) for h, s in saes.items()}
    m = train_adapter(model, tok, saes, a.data, a.out, cfg,
                      sae_sources=sources, model_source=_model_source(a.model),
                      progress=not a.no_progress, resume=not a.no_resume,
                      overwrite=a.overwrite)
    if rank != 0:
        return 0
    base, final = m["base_eval_loss"], m["final_eval_loss"]
    print((f"eval loss {base:.4f} (unedited) -> {final:.4f} (edited)" if final is not None
           else "no eval split") + f"; adapter saved in {a.out}")
    if not a.no_report:
        write_report(a.out, model=model, tokenizer=tok, saes=saes)
        print(f"report: {os.path.join(a.out, 'report.md')}")
    return 0


def cmd_train_sae(a):
    from .hookpoints import meta_model, resolve_hook
    from .models import load_config, load_model
    from .training import load_jsonl
    from .train_sae import SAETrainConfig, train_sae

    if not a.data and not a.python_docs:
        raise UsageError("train-sae needs --data JSONL or --python-docs")
    cfg = SAETrainConfig(**config_values(a, SAETrainConfig))
    cfg.validate()
    records = load_jsonl(a.data) if a.data else []
    if a.python_docs:
        from .corpora import python_docs

        records += python_docs()
    try:
        config = load_config(a.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from e
    try:
        resolve_hook(meta_model(config), a.hook)
    except ValueError as e:
        raise UsageError(f"--hook {a.hook}: {e}") from None
    device = _device(a.device)
    model, tok = load_model(a.model, device=device)
    train_sae(model, tok, a.hook, records, a.out, cfg, progress=not a.no_progress,
              model_name=_model_source(a.model))
    return 0


def cmd_report(a):
    from .report import write_report

    planted = None
    if a.planted:
        hook, _, ids = a.planted.partition(":")
        try:
            planted = {hook: [int(i) for i in ids.split(",") if i]}
        except ValueError:
            raise UsageError(f"--planted must be HOOK:i,j,k, got {a.planted!r}") from None
    from .training import load_jsonl

    lift = None
    if a.lift:
        lift = (load_jsonl(a.lift[0]), load_jsonl(a.lift[1]))
    ctx = load_jsonl(a.contexts) if a.contexts else None
    model = tok = None
    if a.model:
        from .models import load_model

        try:
            model, tok = load_model(a.model)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from e
    rep = write_report(a.run_dir, model=model, tokenizer=tok, planted=planted, top=a.top,
                       sae_paths=_parse_sae_paths(a.sae), lift_records=lift,
                       context_records=ctx)
    print(f"report: {os.path.join(a.run_dir, 'report.md')}")
    if planted:
        return 0 if all(h["planted"]["recovered"] for h in rep["hooks"].values()) else 1
    return 0


def cmd_merge(a):
    from .models import load_model
    from .training import load_adapter, merge_bias_edit

    _, conf = load_adapter(a.run_dir)
    base = a.model or conf.get("base_model")
    if not base:
        raise UsageError("the run records no base model: pass --model")
    if os.path.exists(a.out) and os.listdir(a.out):
        raise UsageError(f"--out {a.out} exists and is not empty")
    model, tok = load_model(base)
    merge_bias_edit(model, a.run_dir, sae_paths=_parse_sae_paths(a.sae))
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"merged model written to {a.out}")
    return 0


def cmd_generate(a):
    from .generate import format_side_by_side, side_by_side
    from .models import load_model
    from .training import attach_run, load_adapter

    prompts = list(a.prompt)
    if a.prompts:
        if not os.path.isfile(a.prompts):
            raise UsageError(f"--prompts: no file {a.prompts!r}")
        with open(a.prompts, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UsageError("generate needs --prompt TEXT (repeatable) or --prompts FILE")
    _, conf = load_adapter(a.run_dir)
    base = a.model or conf.get("base_model")
    if not base:
        raise UsageError("the run records no base model: pass --model")
    device = _device(a.device)
    model, tok = load_model(base, device=device)
    edits = attach_run(model, a.run_dir, sae_paths=_parse_sae_paths(a.sae))
    try:
        rows = side_by_side(model, tok, edits, prompts, strengths=a.strength,
                            max_new_tokens=a.max_new_tokens,
                            chat={"auto": None, "on": True, "off": False}[a.chat],
                            temperature=a.temperature, seed=a.seed,
                            edit_positions=conf.get("edit_positions", "all"))
    finally:
        edits.remove()
    print(format_side_by_side(rows))
    return 0


def cmd_sparsify(args):
    """Runs sparsify's own command line (``sparsify.__main__.run``, which parses sys.argv)
    under compat.patch_sparsify, so ``sae-sparse sparsify MODEL DATASET --k 32 ...`` is
    ``python -m sparsify MODEL DATASET --k 32 ...`` on this package's kernels; torchrun
    works as with sparsify: ``torchrun --nproc_per_node 8 -m sae_sparse.cli sparsify ...``."""
    try:
        from sparsify.__main__ import run
    except ImportError as e:
        print(f"sae-sparse: error: `sae-sparse sparsify` needs EleutherAI sparsify (pip "
              f"install eai-sparsify): {e}", file=sys.stderr)
        return 2
    import torch

    from .compat import patch_sparsify

    if not torch.cuda.is_available() and not any(x in ("-h", "--help") for x in args):
        print("sae-sparse: error: `sae-sparse sparsify` runs sparsify's own command line, which "
              "needs a CUDA GPU (it loads the model on cuda:RANK); on a CPU, call sparsify's "
              "Trainer from Python under compat.patch_sparsify()", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["sparsify", *args]
    try:
        with patch_sparsify():
            run()
    finally:
        sys.argv = saved
    return 0


def _parsers():
    from .train_sae import SAETrainConfig

    ap = _Parser(prog="sae-sparse", description=__doc__.splitlines()[0],
                 formatter_class=_Formatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    rp = sub.add_parser("report", help="write report.md + plots for a run directory",
                        formatter_class=_Formatter)
    rp.add_argument("run_dir", help="a finished run directory")
    rp.add_argument("--planted", default=None, help="HOOK:i,j,k planted latents to check")
    rp.add_argument("--top", type=_positive, default=20, help="latents per ranking")
    rp.add_argument("--model", default=None,
                    help="base model for the Δz statistics, lift and contexts (default: the "
                         "run's recorded one); a directory, hub id or .gguf file")
    rp.add_argument("--lift", nargs=2, metavar=("A.jsonl", "B.jsonl"), default=None,
                    help="activation lift of the top latents: their mean activation on A's "
                         "completions (e.g. the teacher's) over B's (e.g. the base model's)")
    rp.add_argument("--contexts", metavar="C.jsonl", default=None,
                    help="records in which to find the top latents' top-activating contexts")
    _sae_arg(rp)
    _common(rp)
    mp = sub.add_parser("merge", help="fold a bias-only edit into the model's weights",
                        formatter_class=_Formatter)
    mp.add_argument("run_dir", help="a finished run directory")
    mp.add_argument("--out", required=True, help="directory for the merged model")
    mp.add_argument("--model", default=None, help="base model (default: the run's)")
    _sae_arg(mp)
    _common(mp)
    gp = sub.add_parser("generate", help="base and edited generations side by side",
                        formatter_class=_Formatter)
    gp.add_argument("run_dir", help="a finished run directory")
    gp.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    gp.add_argument("--prompts", default=None, help="a file of prompts, one per line")
    gp.add_argument("--strength", type=_finite_float, action="append", default=None,
                    help="scale of the edit (1 = as trained, 0 = none); repeatable "
                         "[default: 1]")
    gp.add_argument("--max-new-tokens", type=_positive, default=40,
                    help="tokens generated per prompt")
    gp.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                    help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    gp.add_argument("--temperature", type=_nonneg_float, default=0.0,
                    help="0 = greedy decoding")
    gp.add_argument("--seed", type=int, default=0, help="seed for sampling")
    gp.add_argument("--model", default=None, help="base model (default: the run's)")
    gp.add_argument("--device", default=None, help="cpu, cuda, ...")
    _sae_arg(gp)
    _common(gp)
    sp = sub.add_parser("train-sae", formatter_class=_Formatter,
                        help="train a TopK SAE on a model's activations at a hook (this "
                             "package's fused op, AuxK, unit-norm decoder); SAELens format",
                        description="Train a TopK SAE on a model's activations at one hook "
                        "and save it in SAELens format with the hook recorded. Rerunning "
                        "resumes from --out's checkpoint.")
    sp.add_argument("--model", required=True, help="a save_pretrained directory, a .gguf "
                    "file or a hub id")
    sp.add_argument("--hook", required=True, help="module path or TransformerLens name, e.g. "
                    "model.layers.15 or blocks.15.hook_resid_post")
    sp.add_argument("--data", default=None, help="JSONL of {'text'} records")
    sp.add_argument("--python-docs", action="store_true",
                    help="add Python's own reference docs (pydoc_data) as text")
    sp.add_argument("--out", required=True, help="directory for the SAE")
    config_flags(sp, SAETrainConfig)
    sp.add_argument("--device", default=None, help="cpu, cuda, ...")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(sp)
    dp = sub.add_parser("demo", help="the offline demo (same as `train` with no arguments)",
                        formatter_class=_Formatter)
    dp.add_argument("--out", default="sae_sparse_demo_run", help="run directory")
    dp.add_argument("--seed", type=int, default=0, help="seed of the data and training")
    dp.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(dp)
    sub.add_parser("doctor", add_help=False,
                   help="check this install on this machine: every op and backend against "
                        "the float64 reference, timings on a GPU (`sae-sparse doctor --help`)")
    sub.add_parser("sparsify", add_help=False,
                   help="EleutherAI sparsify's trainer (`python -m sparsify ARGS`; needs "
                        "CUDA) with every SparseCoder on this package's ops "
                        "(compat.patch_sparsify); the backend from $SAE_SPARSE_BACKEND")
    return ap


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    return " ".join(msg.split())  # one line, whatever the exception held


@contextlib.contextmanager
def _short_warnings():
    """Warnings (this package's and the libraries') as one line each on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda msg, *a, **k: print(f"sae-sparse: warning: {msg}",
                                                          file=sys.stderr)
        yield


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sparsify"]:  # everything after it is sparsify's, --help included
        return cmd_sparsify(argv[1:])
    if argv[:1] == ["doctor"]:  # its own parser (python -m sae_sparse.doctor is the same)
        from .doctor import main as doctor

        return doctor(argv[1:])
    a = _parsers().parse_args(argv)
    from .training import RunMismatch, TrainingInterrupted

    try:
        with _short_warnings():
            if a.cmd == "train":
                return cmd_train(a)
            if a.cmd == "report":
                return cmd_report(a)
            if a.cmd == "merge":
                return cmd_merge(a)
            if a.cmd == "train-sae":
                return cmd_train_sae(a)
            if a.cmd == "generate":
                a.strength = a.strength or [1.0]
                return cmd_generate(a)
            from .demo import run_demo

            rep = run_demo(a.out, seed=a.seed, progress=not a.no_progress)
            return 0 if all(h["planted"]["recovered"] for h in rep["hooks"].values()) else 1
    except TrainingInterrupted as e:
        print(f"sae-sparse: interrupted after step {e.step}; checkpoint saved in "
              f"{e.checkpoint}. Run the same command again to resume.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("sae-sparse: interrupted", file=sys.stderr)
        return 130
    except (UsageError, RunMismatch, ValueError, KeyError, OSError,
            FloatingPointError, ImportError) as e:
        if a.debug:
            raise
        print(f"sae-sparse: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
