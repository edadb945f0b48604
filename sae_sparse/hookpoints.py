"""Where an SAE reads: module paths, sparsify hookpoints and TransformerLens hook names.

Edits attach to a module's output (``model.get_submodule(path)``). SAE files often name their
hook in another vocabulary; :func:`resolve_hook` maps each of them to a module path:

* a module path of the model itself (``transformer.h.6``, ``model.layers.6``);
* a path relative to the base model, as EleutherAI sparsify records hookpoints (``layers.6``,
  ``h.6``);
* dictionary_learning's ``resid_post_layer_N`` (block N's output);
* a TransformerLens hook name, as SAELens records ``hook_name``: ``blocks.N.hook_resid_post``
  (block N's output), ``blocks.N.hook_resid_pre`` (block N-1's output; for N = 0 the embedding
  where the model adds nothing to it), ``blocks.N.hook_mlp_out`` and ``blocks.N.hook_attn_out``
  (the MLP's / attention's output as it is added to the residual: after the post-norms of
  Gemma 2 and 3). Supported for GPT-2, GPT-NeoX / Pythia, Llama / Mistral / Qwen and Gemma.

:func:`hook_width` gives the width of a module's output without running the real model (the
model is rebuilt on the ``meta`` device from its config), so a mismatch between an SAE's
``d_in`` and its hook is caught before any weight is loaded.
"""
from __future__ import annotations

import difflib
import re

import torch
from torch import nn

_TL = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_resid_mid|hook_mlp_out|"
                 r"hook_attn_out)$")
_ATTN = ("self_attn", "attn", "attention")  # Llama-likes / GPT-2 / GPT-NeoX


def blocks_path(model: nn.Module) -> str:
    """The path of the model's list of transformer blocks (``transformer.h``, ``model.layers``,
    ``gpt_neox.layers``): the longest ``nn.ModuleList`` of the model."""
    best, n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > n:
            best, n = name, len(mod)
    if best is None:
        raise ValueError("cannot find the model's list of transformer blocks")
    return best


def _model_type(model) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _child(block: nn.Module, names, what: str, path: str) -> str:
    for n in names:
        if hasattr(block, n) and isinstance(getattr(block, n), nn.Module):
            return n
    raise ValueError(f"block {path} has no {what} module (looked for {', '.join(names)})")


def transformer_lens_to_module(model: nn.Module, name: str) -> str:
    """Maps a TransformerLens hook name to the module path whose output is that activation."""
    m = _TL.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a supported TransformerLens hook (blocks.N."
                         "hook_resid_post / hook_resid_pre / hook_mlp_out / hook_attn_out)")
    n, kind = int(m.group(1)), m.group(2)
    blocks = blocks_path(model)
    n_blocks = len(model.get_submodule(blocks))
    if n >= n_blocks:
        raise ValueError(f"{name!r}: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    mt = _model_type(model)
    post_norms = mt in ("gemma2", "gemma3", "gemma3_text")
    if kind == "hook_resid_post":
        return f"{blocks}.{n}"
    if kind == "hook_resid_pre":
        if n > 0:
            return f"{blocks}.{n - 1}"
        if mt == "gpt2":
            return f"{blocks.rsplit('.', 1)[0]}.drop"  # token + position embeddings, dropped out
        if mt.startswith("gemma"):
            raise ValueError(f"{name!r}: Gemma scales its embeddings inside the model, so no "
                             "module outputs block 0's input; use a later block")
        emb = model.get_input_embeddings()
        return next(p for p, mod in model.named_modules() if mod is emb)
    if kind == "hook_resid_mid":
        raise ValueError(f"{name!r}: no module of a Hugging Face model outputs the residual "
                         "stream between attention and MLP")
    block = model.get_submodule(f"{blocks}.{n}")
    if kind == "hook_mlp_out":
        sub = "post_feedforward_layernorm" if post_norms else _child(block, ("mlp",), "MLP",
                                                                    f"{blocks}.{n}")
    else:
        sub = "post_attention_layernorm" if post_norms else _child(block, _ATTN, "attention",
                                                                  f"{blocks}.{n}")
    return f"{blocks}.{n}.{sub}"


def resolve_hook(model: nn.Module, name: str) -> str:
    """-> the module path for ``name`` (a module path, a sparsify hookpoint relative to the
    base model, or a TransformerLens hook name); a ValueError naming close matches if none."""
    names = {n for n, _ in model.named_modules() if n}
    if name in names:
        return name
    if _TL.match(name):
        return transformer_lens_to_module(model, name)
    m = re.fullmatch(r"resid_post_layer_(\d+)", name)  # dictionary_learning's submodule_name
    if m:
        return transformer_lens_to_module(model, f"blocks.{m.group(1)}.hook_resid_post")
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
    hint = (f"; did you mean {', '.join(close)}?" if close else
            f"; block outputs are {blocks_path(model)}.N" if any(
                isinstance(m, nn.ModuleList) for m in model.modules()) else "")
    raise ValueError(f"the model has no module {name!r}{hint}")


def meta_model(config):
    """The model of ``config`` built on the meta device: its module tree and shapes, no
    memory and no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def hook_width(model: nn.Module, path: str) -> int:
    """The last dimension of ``path``'s output (the first element of a tuple output), found by
    one forward of a 2-token input, stopped at that module (on a :func:`meta_model`: no
    computation and no memory)."""
    device = next(model.parameters(), torch.empty(0, device="meta")).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    # without a pad token transformers does not look for padding in ids (an .item(), which a
    # meta tensor cannot give: GPT-2 does it)
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is not None:
        config.pad_token_id = None
    try:
        return int(forward_to(model, path, ids).shape[-1])
    finally:
        if pad is not None:
            config.pad_token_id = pad


class _Stop(Exception):
    pass


def forward_to(model: nn.Module, path: str, ids, attention_mask=None):
    """The output of the module at ``path`` (the first element of a tuple output) for a
    forward of ``ids``, the forward stopped there: the layers after it and the LM head never
    run. Hooks registered on the module before this call (an attached edit's) have run, so
    the output is the edited one when an edit is on. ``model``: a transformers model (or a
    TransformerLens ``HookedTransformer``)."""
    from .models import model_logits

    seen = []

    def grab(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = model.get_submodule(path).register_forward_hook(grab)
    try:
        model_logits(model, ids, attention_mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"the module {path!r} is not run by the model's forward")
    return seen[0]
