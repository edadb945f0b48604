"""A finished run's adapters: save, load, attach to a model (``attach_run``) and merge a
bias-only edit into the model's weights.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .. import __version__
from ..baselines import ResidualLoRA
from ..hooks import attach
from ..modules import LatentAdapter
from .config import CONFIG_NAME, TrainConfig, WEIGHTS_NAME
from .run_dir import load_trainable_state, trainable_state


def latent_mask_of(latents, S, hook):
    """The bool [S] mask of ``latents`` (a list for every hook, or ``{hook: list}``; a hook
    missing from the dict is not restricted)."""
    if isinstance(latents, dict):
        latents = latents.get(hook)
    if latents is None:
        return None
    bad = [i for i in latents if i >= S]
    if bad:
        raise ValueError(f"latents {bad[:5]} are out of range for the SAE at {hook} (S={S})")
    m = torch.zeros(S, dtype=torch.bool)
    m[list(latents)] = True
    return m


def architecture(sae) -> str:
    """"topk", "jumprelu" or "relu": from the file's format info, else from the SAE."""
    arch = (getattr(sae, "format_info", None) or {}).get("architecture")
    if arch:
        return "relu" if arch == "standard" else arch
    return "jumprelu" if sae.threshold is not None else "topk"


def save_adapter(out_dir, trainables, saes, cfg: TrainConfig, *, sae_sources=None,
                 model_source=None, skip_first=None):
    """Writes ``adapter_model.safetensors`` + ``adapter_config.json``. ``skip_first``: the
    positions the run left unedited (``cfg.skip_first`` resolved, when it is ``"auto"``)."""
    if skip_first is None:
        if cfg.skip_first == "auto":
            raise ValueError("skip_first: give the resolved value of cfg.skip_first='auto'")
        skip_first = cfg.skip_first
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(trainable_state(trainables), os.path.join(out_dir, WEIGHTS_NAME))
    hooks = {}
    for h, t in trainables.items():
        src = dict((sae_sources or {}).get(h) or getattr(saes[h], "format_info", None) or {})
        src.pop("cfg", None)
        entry = {"sae": src, "d_sae": saes[h].d_sae, "d_in": saes[h].d_in, "k": saes[h].k}
        if isinstance(t, ResidualLoRA):
            entry.update(kind="lora", rank=t.rank)
        else:
            entry.update(kind="latent", gain=t.gain is not None, bias=t.bias is not None,
                         ffn=t.W_in is not None, hidden=t.hidden, activation=t.activation,
                         latents=(torch.nonzero(t.latent_mask).reshape(-1).tolist()
                                  if t.latent_mask is not None else None))
        hooks[h] = entry
    conf = {"sae_sparse_version": __version__, "base_model": model_source, "mode": cfg.mode,
            "edit_positions": cfg.edit_positions, "skip_first": skip_first,
            "baseline": cfg.baseline,
            "train_config": dataclasses.asdict(cfg), "hooks": hooks}
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(conf, f, indent=2)


def load_adapter(run_dir: str, device=None):
    """-> (``{hook: LatentAdapter | ResidualLoRA}``, config dict) from a run directory."""
    from ..io import load_safetensors

    if not os.path.isfile(os.path.join(run_dir, CONFIG_NAME)):
        raise FileNotFoundError(f"{run_dir!r} is not a finished run directory (no "
                                f"{CONFIG_NAME})")
    with open(os.path.join(run_dir, CONFIG_NAME)) as f:
        conf = json.load(f)
    if "peft_type" in conf:
        raise ValueError(f"{run_dir} holds a PEFT adapter (trained with train_adapter on a "
                         "PEFT model): load it with peft.PeftModel.from_pretrained; the "
                         "report, merge and generate read sparse latent edits")
    tensors = load_safetensors(os.path.join(run_dir, WEIGHTS_NAME))
    out = {}
    for h, e in conf["hooks"].items():
        if e["kind"] == "lora":
            t = ResidualLoRA(e["d_in"], e["rank"])
        else:
            t = LatentAdapter(e["d_sae"], max(e["hidden"], 1), e["gain"], e["bias"], e["ffn"],
                              e["activation"],
                              latent_mask=latent_mask_of(e.get("latents"), e["d_sae"], h))
        load_trainable_state({h: t}, tensors)
        out[h] = t.to(device) if device is not None else t
    return out, conf


def load_run_saes(conf: dict, *, verify: bool = True, device=None,
                  paths: dict | None = None) -> dict:
    """Loads the SAEs a run was trained with, checking their content hash.

    Args:
        conf: the run's ``adapter_config.json``.
        verify: check each SAE's sha256 against the one recorded at training.
        paths: ``{hook: path}`` for SAEs that moved since training (a single path for a
            one-hook run may be keyed ``None``); the others load from the recorded paths.
    """
    from ..io import content_hash, load_sae

    paths = dict(paths or {})
    hooks = list(conf["hooks"])
    if None in paths:
        if len(hooks) != 1:
            raise ValueError(f"the run has {len(hooks)} hooks ({', '.join(hooks)}): give "
                             "each SAE path as HOOK=PATH")
        paths[hooks[0]] = paths.pop(None)
    unknown = sorted(set(paths) - set(hooks))
    if unknown:
        raise ValueError(f"the run has no hook {unknown[0]!r} (its hooks: {', '.join(hooks)})")
    saes = {}
    for h, e in conf["hooks"].items():
        src = e["sae"]
        path = paths.get(h) or src.get("path")
        if not path:
            raise ValueError(f"the run does not record the SAE path for {h!r}; pass saes=... "
                             "(or --sae PATH)")
        if not os.path.exists(path):
            raise FileNotFoundError(f"the SAE for {h} is missing: nothing at {path}; if it "
                                    "moved, pass its new path (--sae HOOK=PATH, or paths=...)")
        if verify and src.get("sha256"):
            got = content_hash(path)
            if got != src["sha256"]:
                raise ValueError(f"the SAE at {path} is not the one {h} was trained with "
                                 f"(sha256 mismatch: {got[:12]}…, trained with "
                                 f"{src['sha256'][:12]}…)")
        saes[h] = load_sae(path, k=e["k"], device=device)
    return saes


def attach_run(model, run_dir: str, *, saes: dict | None = None, sae_paths: dict | None = None,
               strength: float = 1.0):
    """Loads a run's adapters (and SAEs, unless given; ``sae_paths`` = ``{hook: path}`` for
    SAEs that moved) and attaches them to ``model``; ``strength`` scales the edit (see
    :meth:`AttachedEdits.scaled`)."""
    device = next(model.parameters()).device
    trainables, conf = load_adapter(run_dir, device=device)
    saes = saes or load_run_saes(conf, device=device, paths=sae_paths)
    spec = {h: (t if isinstance(t, ResidualLoRA) else (saes[h], t)) for h, t in trainables.items()}
    edits = attach(model, spec, mode=conf["mode"], dense=conf.get("baseline") == "dense",
                   skip_first=conf.get("skip_first", 0))
    edits.strength = float(strength)
    return edits


def _mlp_out_proj(block):
    """The linear layer whose output the block adds to the residual stream last."""
    for path in ("mlp.c_proj", "mlp.down_proj", "mlp.fc2", "mlp.dense_4h_to_h", "mlp.fc_out"):
        try:
            return path, block.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError("cannot find the block's MLP output projection (looked for mlp.c_proj, "
                     "mlp.down_proj, mlp.fc2, mlp.dense_4h_to_h, mlp.fc_out)")


def merge_bias_edit(model, run_dir: str, *, saes: dict | None = None,
                    sae_paths: dict | None = None):
    """Folds a bias-only delta-mode edit into the model's weights (in place) and returns it.

    A bias-only edit adds the constant ``Δx = bias @ W_dec`` to the hooked block's output at
    every position, which equals adding Δx to the bias of the block's MLP output projection.
    Llama-style MLPs without biases get zero biases (``config.mlp_bias = True``) first, so the
    merged model saves and reloads with ``from_pretrained``.
    """
    trainables, conf = load_adapter(run_dir)
    if conf["mode"] != "delta" or conf["edit_positions"] != "all" or conf.get("skip_first"):
        raise ValueError("only delta-mode edits applied at all positions can be merged (this "
                         f"run: mode {conf['mode']}, edit positions {conf['edit_positions']}, "
                         f"skip_first {conf.get('skip_first', 0)})")
    for h, t in trainables.items():
        if not isinstance(t, LatentAdapter) or t.bias is None:
            kind = "a residual LoRA" if isinstance(t, ResidualLoRA) else "an edit without bias"
            raise ValueError(f"{h}: only a bias-only edit is a constant that can be merged into "
                             f"the weights; this run trained {kind}. Use attach_run (or "
                             "`sae-sparse generate`) to apply it instead")
        if (t.gain is not None and bool(t.gain.ne(0).any())) or (
                t.W_out is not None and bool(t.W_out.ne(0).any())):
            raise ValueError(f"{h}: the edit has non-zero gain/ffn terms; only a bias-only edit "
                             "is a constant Δx that can be merged. Use attach_run (or "
                             "`sae-sparse generate`) to apply it instead")
    saes = saes or load_run_saes(conf, paths=sae_paths)
    if getattr(model.config, "mlp_bias", True) is False:
        for mod in model.modules():
            for name in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(mod, name, None)
                if isinstance(lin, torch.nn.Linear) and lin.bias is None:
                    lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features,
                                                              dtype=lin.weight.dtype,
                                                              device=lin.weight.device))
        model.config.mlp_bias = True
    for h, t in trainables.items():
        sae = saes[h]
        delta = (t.bias.detach().to(sae.W_dec.dtype) @ sae.W_dec.detach()).float()
        from ..hookpoints import resolve_hook

        _, proj = _mlp_out_proj(model.get_submodule(resolve_hook(model, h)))
        with torch.no_grad():
            proj.bias.add_(delta.to(proj.bias.dtype))
    return model
