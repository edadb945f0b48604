"""Training data: JSONL records, tokenizing into ``Example``s, collation, and the
resumable example order (``Schedule``) and learning-rate warmup.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import NamedTuple

import torch


def load_jsonl(path: str) -> list[dict]:
    """Records with ``text``, or ``prompt`` + ``completion`` (loss on the completion only),
    optionally with ``teacher_prompt`` (what the teacher reads before the completion when
    ``loss="kl"``)."""
    out = []
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = _read_lines(f, path)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})"
                                 ) from None
            if not isinstance(r, dict) or not (
                    isinstance(r.get("text"), str) or (isinstance(r.get("prompt"), str)
                                                       and isinstance(r.get("completion"), str))):
                raise ValueError(f"{path}:{n}: each record needs 'text' or 'prompt' and "
                                 "'completion' strings")
            if "teacher_prompt" in r and not isinstance(r["teacher_prompt"], str):
                raise ValueError(f"{path}:{n}: 'teacher_prompt' must be a string")
            out.append(r)
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def check_teacher_prompts(records, source="the data"):
    """Distilling the model into itself (``loss="kl"`` without a separate teacher) needs a
    ``teacher_prompt`` string in every record: without one the teacher reads what the student
    reads and there is nothing to learn."""
    lacking = [n for n, r in enumerate(records, 1) if not isinstance(r.get("teacher_prompt"),
                                                                       str)]
    if lacking:
        raise ValueError(f"{len(lacking)} of {len(records)} records in {source} have no "
                         f"'teacher_prompt' string (the first: record {lacking[0]}); the "
                         "teacher is the model with the edits off reading it (make one with "
                         "`sae-sparse make-data`), or pass a separate teacher model")


def _read_lines(f, path):
    try:
        return f.read().split("\n")  # not splitlines: U+2028 may sit inside a JSON string
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


class Example(NamedTuple):
    """One tokenized record: ``ids`` [T]; ``loss_mask`` [T] (the tokens the loss predicts);
    ``prompt_mask`` [T]; ``teacher_ids`` [T'] (the teacher's input, ending with the same
    completion tokens) or None."""
    ids: torch.Tensor
    loss_mask: torch.Tensor
    prompt_mask: torch.Tensor
    teacher_ids: torch.Tensor | None = None


def tokenize(records, tokenizer, max_len, *, teacher=False):
    """-> list of :class:`Example`.

    Records longer than ``max_len`` tokens are truncated and records with fewer than 2 tokens
    are skipped; both are counted in a warning, never silently. With ``teacher`` each example
    also holds the teacher's input: ``teacher_prompt`` (default: the prompt) + the completion
    (``text`` records: the text itself); the completion is then cut so that both inputs fit in
    ``max_len``, and the two end with the same completion tokens."""
    out = []
    truncated = skipped = 0
    for r in records:
        tp = None
        if "text" in r:
            ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
            p, c = ids[:1], ids[1:]
            if teacher:
                tp = p
        else:
            p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
            if teacher:
                tp = tokenizer(r.get("teacher_prompt", r["prompt"]),
                               add_special_tokens=False)["input_ids"]
        room = max_len - max(len(p), len(tp) if tp is not None else 0)
        if len(c) > room:
            truncated += 1
            if tp is not None:  # both inputs keep the same completion tokens
                c = c[:max(room, 0)]
            else:
                p, c = p[:max_len], c[:max(room, 0)]
        if len(p) + len(c) < 2 or (tp is not None and (not c or len(tp) < 1)):
            skipped += 1
            continue
        ids = torch.tensor(p + c)
        pm = torch.tensor([True] * len(p) + [False] * len(c))
        out.append(Example(ids, ~pm, pm,
                           torch.tensor(tp + c) if tp is not None else None))
    if truncated or skipped:
        warnings.warn(f"{truncated} record(s) truncated to max_len={max_len} tokens, "
                      f"{skipped} record(s) with fewer than 2 tokens (or, for a teacher, no "
                      "completion token left) skipped", stacklevel=2)
    if not out:
        raise ValueError("no record has 2 or more tokens")
    return out


def collate(examples, pad_id):
    """-> (ids, attention mask, loss mask, prompt mask), each [B, T], right-padded."""
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.bool)
    loss = torch.zeros(B, T, dtype=torch.bool)
    prompt = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n], attn[b, :n] = e.ids, True
        loss[b, :n], prompt[b, :n] = e.loss_mask, e.prompt_mask
    return ids, attn, loss, prompt


def collate_teacher(examples, pad_id):
    """-> the teacher's (ids, attention mask, loss mask), each [B, T']: the loss mask marks
    the same completion tokens as the student's, in the same order."""
    T = max(len(e.teacher_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.bool)
    loss = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n, c = len(e.teacher_ids), int(e.loss_mask.sum())
        ids[b, :n], attn[b, :n], loss[b, n - c:n] = e.teacher_ids, True, True
    return ids, attn, loss


class Schedule:
    """Deterministic, stateless example order: exact resume needs only the step number."""

    def __init__(self, n, batch_size, grad_accum, seed):
        self.n, self.bs, self.ga, self.seed = n, batch_size, grad_accum, seed
        self._perms = {}

    def batch(self, step, micro):
        start = (step * self.ga + micro) * self.bs
        out = []
        for pos in range(start, start + self.bs):
            epoch = pos // self.n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
            out.append(self._perms[epoch][pos % self.n])
        return out


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then ``lr``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return lr
    return lr * (step + 1) / warmup_steps
