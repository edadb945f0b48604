"""Loading the causal LM an adapter edits: a local Hugging Face directory, a hub id, or a GGUF
file (dequantized by transformers; needs the ``gguf`` package); and running one
(``model_logits``, ``input_device``) whatever its kind.

    model, tokenizer = load_model("path/to/model")                  # save_pretrained folder
    model, tokenizer = load_model("path/to/SmolLM2-135M.Q4_1.gguf")  # a GGUF file
    model, tokenizer = load_model("path/to/folder", gguf_file="x.gguf")

A spec that is a path (absolute, starting with ``.`` or ``~``, ending in ``.gguf``, or whose
first directory exists here) and does not exist is reported as a missing path; only a bare
``org/name`` is looked up on the Hugging Face hub.
"""
from __future__ import annotations

import os


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf"):
        return True
    parts = spec.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def model_location(spec: str, gguf_file: str | None = None) -> tuple[str, dict]:
    """-> (directory or hub id, extra ``from_pretrained`` kwargs) for a model spec; raises
    FileNotFoundError for a path that does not exist (without asking the hub)."""
    spec = os.path.expanduser(str(spec))
    if gguf_file is None and spec.endswith(".gguf"):
        spec, gguf_file = os.path.dirname(spec) or ".", os.path.basename(spec)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if os.path.isdir(spec):
        if gguf_file and not os.path.isfile(os.path.join(spec, gguf_file)):
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {spec}")
        if not gguf_file and not os.path.isfile(os.path.join(spec, "config.json")):
            ggufs = sorted(f for f in os.listdir(spec) if f.endswith(".gguf"))
            hint = f" (it holds {ggufs[0]}: pass that file)" if ggufs else ""
            raise FileNotFoundError(f"{spec} is not a Hugging Face model directory: no "
                                    f"config.json{hint}")
        return spec, kw
    if os.path.exists(spec):
        raise FileNotFoundError(f"{spec} is a file, not a model directory or a .gguf file")
    if _looks_like_path(spec) or gguf_file:
        raise FileNotFoundError(f"no model at {spec!r}: no such directory (a path, so the "
                                "Hugging Face hub was not asked)")
    return spec, kw


def load_config(spec: str, gguf_file: str | None = None):
    """The model's config alone (no weights): for checks before loading."""
    from transformers import AutoConfig

    where, kw = model_location(spec, gguf_file)
    return AutoConfig.from_pretrained(where, **kw)


def load_model(spec: str, *, gguf_file: str | None = None, device=None, dtype=None):
    """-> (model in eval mode, tokenizer) from a directory, a hub id or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, kw = model_location(spec, gguf_file)
    if dtype is not None:
        kw["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(where, **kw).eval()
    if device is not None:
        model = model.to(device)
    tok = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kw.items() if k != "dtype"})
    return model, tok


def model_logits(model, ids, attn=None, positions=None):
    """Logits [B, T, V] of a transformers causal LM or a TransformerLens HookedTransformer.

    With ``positions`` (bool [B, T]) only the logits there, [n, V] in row-major order (as
    ``logits[positions]``): a transformers model that takes ``logits_to_keep`` runs its LM head
    on the columns some row needs and no others (a prompt's positions cost no V-wide
    projection, forward or backward)."""
    if hasattr(model, "run_with_hooks"):  # TransformerLens: forward(input, ...) -> logits
        out = model(ids, attention_mask=attn.long() if attn is not None else None)
        return out if positions is None else out[positions.to(out.device)]
    kw = {"attention_mask": attn.long()} if attn is not None else {}
    if positions is None:
        return model(input_ids=ids, **kw).logits
    positions = positions.to(ids.device)
    if not _takes_logits_to_keep(model):
        return model(input_ids=ids, **kw).logits[positions]
    cols = positions.any(0).nonzero().squeeze(1)
    logits = model(input_ids=ids, logits_to_keep=cols, **kw).logits  # [B, len(cols), V]
    return logits[positions[:, cols].to(logits.device)]


def _takes_logits_to_keep(model) -> bool:
    """Whether the (PEFT-unwrapped) model's forward has transformers' ``logits_to_keep``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def input_device(model):
    """Where the token ids go: the input embedding's device (a model spread over devices
    takes them there)."""
    emb = getattr(model, "get_input_embeddings", None)
    try:
        return emb().weight.device
    except (TypeError, AttributeError, NotImplementedError):
        return next(model.parameters()).device

