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

    ``prompts``: questions (through the chat template, as ``chat`` says) or training records
    (``{"prompt", ...}`` dicts, e.g. ``make-data``'s held-out split), whose ``prompt`` is
    read as is, the text the run was trained on.

    Greedy decoding unless ``temperature > 0`` (then sampled, seeded per generation so the
    base and edited texts share their random draws)."""
    from .ops import cached_folds

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        if isinstance(prompt, dict):  # a training record: its prompt as the run read it
            ids = tokenizer(prompt["prompt"], add_special_tokens=False)["input_ids"]
            prompt = prompt.get("question", prompt["prompt"])
        else:
            ids = encode_prompt(tokenizer, prompt, chat)
        ids = torch.tensor([ids], device=device)

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


def context_length(model) -> int:
    """The most positions the model's config allows (a large number when it names none)."""
    c = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(c, name, None), int):
            return getattr(c, name)
    return 1 << 30


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, *, max_new_tokens=128, batch_size=8,
                     temperature=0.0, seed=0, progress=False, desc="generating",
                     on_batch=None, return_finished=False) -> list:
    """The model's answers to ``prompts``: text already in the model's input format (e.g.
    chat-templated, as in a training record's ``prompt``), tokenized without adding special
    tokens, generated ``batch_size`` at a time with left padding, up to ``max_new_tokens``
    each or the end-of-sequence token. Greedy unless ``temperature > 0`` (then sampled,
    seeded per batch from ``seed`` and the batch's first index: the same prompts in the same
    batches draw the same). The answer is the decoded new text without special tokens; with
    ``return_finished`` each is ``(text, finished)``, ``finished`` when the model ended it with
    its end-of-sequence token within the budget. ``on_batch(first_index, answers)`` is called
    after each batch (to write it as it comes)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    from .models import input_device

    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
    out = []
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", disable=not progress)
    for s in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts[s:s + batch_size]]
        T = max(len(i) for i in ids)
        x = torch.full((len(ids), T), pad, dtype=torch.long)
        att = torch.zeros(len(ids), T, dtype=torch.long)
        for b, row in enumerate(ids):  # left padding: every prompt ends where generation starts
            x[b, T - len(row):] = torch.tensor(row, dtype=torch.long)
            att[b, T - len(row):] = 1
        kw = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(
            do_sample=False)
        room = context_length(model) - T
        if room < 1:
            raise ValueError(f"prompts[{s}:{s + len(ids)}]: {T} tokens leave no room to "
                             f"generate in the model's {context_length(model)}-token context")
        torch.manual_seed(seed + s)
        y = model.generate(input_ids=x.to(device), attention_mask=att.to(device),
                           max_new_tokens=min(max_new_tokens, room), pad_token_id=pad, **kw)
        answers = [tokenizer.decode(r[T:], skip_special_tokens=True) for r in y]
        if return_finished:
            eos = tokenizer.eos_token_id
            answers = [(a, eos is not None and bool((r[T:] == eos).any()))
                       for a, r in zip(answers, y)]
        out += answers
        if on_batch is not None:
            on_batch(s, answers)
        bar.update(len(ids))
    bar.close()
    return out


def format_side_by_side(rows) -> str:
    lines = []
    for n, r in enumerate(rows, 1):
        lines += [f"=== prompt {n}: {r['prompt']}", "--- base", r["base"].strip()]
        for s, text in r["edited"].items():
            lines += [f"--- edited (strength {s:g})", text.strip()]
        lines.append("")
    return "\n".join(lines)
