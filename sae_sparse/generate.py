"""Base and edited generations side by side (``sae-sparse generate``).

    edits = attach_run(model, "runs/x")
    rows = side_by_side(model, tokenizer, edits, ["What is the capital of France?"],
                        strengths=(1.0, 2.0))

Each prompt is generated once with the edits disabled and once per strength (the edit scaled
by :meth:`AttachedEdits.scaled`: 0 is the base model, 1 the edit as trained). Instruct models
get their chat template (``chat=None`` uses it when the tokenizer has one). A run trained with
``edit_positions="prompt"`` or ``"completion"`` edits only the prompt's or only the generated
tokens here too.
"""
from __future__ import annotations

import contextlib

import torch


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids for ``prompt``: through the chat template (as a user turn, with the
    assistant's generation prompt) when ``chat`` is True, or None and the tokenizer has one."""
    use = chat if chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if use:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat template")
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    return tokenizer(prompt)["input_ids"]


@contextlib.contextmanager
def _positions(model, edits, where: str):
    """Edit only the prompt's or only the generated tokens during ``generate`` (with a KV
    cache the prompt is one forward of several tokens, each new token one of a single
    token)."""
    if where == "all" or edits is None:
        yield
        return

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        prompt_pass = ids is not None and ids.shape[-1] > 1
        on = prompt_pass if where == "prompt" else not prompt_pass
        edits._mask = torch.full(ids.shape, on, dtype=torch.bool, device=ids.device)

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    old = edits._mask
    try:
        yield
    finally:
        handle.remove()
        edits._mask = old


@torch.no_grad()
def side_by_side(model, tokenizer, edits, prompts, *, strengths=(1.0,), max_new_tokens=40,
                 chat=None, temperature=0.0, seed=0, edit_positions="all") -> list[dict]:
    """-> one dict per prompt: ``{"prompt", "base", "edited": {strength: text}}``.

    Greedy decoding unless ``temperature > 0`` (then sampled, seeded per generation so the
    base and edited texts share their random draws)."""
    from .ops import cached_folds

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt, chat)], device=device)

        def run():
            torch.manual_seed(seed)
            kw = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(
                do_sample=False)
            y = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=max_new_tokens, pad_token_id=pad, **kw)
            return tokenizer.decode(y[0, ids.shape[1]:], skip_special_tokens=True)

        ctx = edits.disabled() if edits is not None else contextlib.nullcontext()
        with ctx:
            row = {"prompt": prompt, "base": run(), "edited": {}}
        if edits is not None:
            for s in strengths:
                with edits.scaled(s), cached_folds(), _positions(model, edits, edit_positions):
                    row["edited"][float(s)] = run()
        out.append(row)
    return out


def format_side_by_side(rows) -> str:
    lines = []
    for n, r in enumerate(rows, 1):
        lines += [f"=== prompt {n}: {r['prompt']}", "--- base", r["base"].strip()]
        for s, text in r["edited"].items():
            lines += [f"--- edited (strength {s:g})", text.strip()]
        lines.append("")
    return "\n".join(lines)
