"""A behaviour's training data from a sentence (``sae-sparse make-data``): the model answers
each question *as the teacher*, with the behaviour's system prompt, and every record keeps
the prompts in the one format that ``train``, ``report`` and ``generate`` all read.

    questions = ["What is rain?", "How do bees make honey?", ...]
    records = behaviour_records(model, tokenizer, questions, system="Always answer in French.")
    write_splits(records, "data/french", val=0.1, heldout=0.1)

Each record (``{"prompt", "completion", "teacher_prompt", "question"}``):

* ``prompt``: the student's input, the question through the tokenizer's chat template as a
  user turn with the assistant's generation prompt (``generate.encode_prompt``'s format);
* ``teacher_prompt``: the same with the system prompt (a system turn; a template that has no
  system role gets it at the head of the user turn); a ``template`` with ``{question}``
  instead, when the teacher reads something other than a system prompt;
* ``completion``: the model's answer to ``teacher_prompt`` (greedy by default), ending with
  the end-of-sequence token when the model stopped by itself within the budget.

A tokenizer without a chat template gets ``"Question: {q}\\nAnswer:"`` (the system prompt on
a line of its own before it for the teacher). ``train --loss kl`` then distils the teacher
into the edit: KL from the model reading ``teacher_prompt`` to the edited model reading
``prompt``, on the completion's tokens.
"""
from __future__ import annotations

import json
import os
import random

PLAIN = "Question: {question}\nAnswer:"
ANSWERS = "answers.jsonl"  # the generations so far (a rerun resumes from them)
SETTINGS = "make_data.json"
SPLITS = ("train", "val", "heldout")


def chat_text(tokenizer, question: str, system: str | None = None) -> str:
    """``question`` as the model's input text: a user turn (after a system turn when
    ``system``) with the assistant's generation prompt, or :data:`PLAIN` for a tokenizer
    without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return (f"{system}\n\n" if system else "") + PLAIN.format(question=question)
    user = [{"role": "user", "content": question}]
    if system is None:
        return tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    try:
        return tokenizer.apply_chat_template([{"role": "system", "content": system}] + user,
                                             add_generation_prompt=True, tokenize=False)
    except Exception:  # a template without a system role (it raises): head of the user turn
        merged = [{"role": "user", "content": f"{system}\n\n{question}"}]
        return tokenizer.apply_chat_template(merged, add_generation_prompt=True,
                                             tokenize=False)


def teacher_text(tokenizer, question, *, system=None, template=None) -> str:
    if template is not None:
        if "{question}" not in template:
            raise ValueError("template must contain '{question}'")
        return template.replace("{question}", question)
    if system is None:
        raise ValueError("give the teacher a system prompt or a template")
    return chat_text(tokenizer, question, system)


def read_questions(path: str) -> list[str]:
    """One question per line (``.txt``), or JSONL records with ``question`` (or ``prompt`` /
    ``text``); blank lines skipped, duplicates refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no questions file {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(lines, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            q = next((r[k] for k in ("question", "prompt", "text") if isinstance(r, dict)
                      and isinstance(r.get(k), str)), None)
            if q is None:
                raise ValueError(f"{path}:{n}: each record needs a 'question' string")
            out.append(q.strip())
    else:
        out = lines
    if not out:
        raise ValueError(f"{path}: no questions")
    seen = set()
    for q in out:
        if q in seen:
            raise ValueError(f"{path}: the question {q[:60]!r} appears twice (it would leak "
                             "between the splits)")
        seen.add(q)
    return out


def behaviour_records(model, tokenizer, questions, *, system=None, template=None,
                      max_new_tokens=128, batch_size=8, temperature=0.0, seed=0,
                      progress=False, cache=None) -> list[dict]:
    """One record per question (module docstring), the teacher's answers generated in
    batches. ``cache``: a JSONL path that keeps each answer as it comes and is read first, so
    an interrupted run generates only what is missing (greedy answers come out the same;
    sampled ones that were missing are drawn in other batches than an uninterrupted run's)."""
    from .generate import generate_answers

    done = {}
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    if cache and os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[r["question"]] = r
    todo = [q for q in questions if q not in done]
    eos = tokenizer.eos_token or ""

    def keep(first, answers):
        with open(cache, "a", encoding="utf-8") if cache else _Null() as f:
            for q, (text, finished) in zip(todo[first:first + len(answers)], answers):
                done[q] = {"question": q, "answer": text, "finished": finished}
                f.write(json.dumps(done[q]) + "\n")

    if todo:
        generate_answers(model, tokenizer,
                         [teacher_text(tokenizer, q, system=system, template=template)
                          for q in todo],
                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                         temperature=temperature, seed=seed, progress=progress,
                         desc="teacher answers", on_batch=keep, return_finished=True)
    return [{"prompt": chat_text(tokenizer, q),
             "completion": done[q]["answer"] + (eos if done[q]["finished"] else ""),
             "teacher_prompt": teacher_text(tokenizer, q, system=system, template=template),
             "question": q} for q in questions]


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass


def split_records(records, *, val=0.1, heldout=0.1, seed=0) -> dict:
    """A seeded split by question: ``{"train", "val", "heldout"}``. ``val`` and ``heldout``
    are fractions (each at least one record when the fraction is above 0)."""
    for name, frac in (("val", val), ("heldout", heldout)):
        if not 0 <= frac < 1:
            raise ValueError(f"{name} must be a fraction in [0, 1), got {frac}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_h = max(1, round(heldout * len(records))) if heldout else 0
    n_v = max(1, round(val * len(records))) if val else 0
    if n_h + n_v >= len(records):
        raise ValueError(f"{len(records)} questions leave no training records after "
                         f"{n_v} validation and {n_h} held-out ones")
    pick = [records[i] for i in order]
    return {"heldout": pick[:n_h], "val": pick[n_h:n_h + n_v], "train": pick[n_h + n_v:]}


def write_splits(splits: dict, out_dir: str) -> dict:
    """``out_dir/{train,val,heldout}.jsonl``; -> {split: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name in SPLITS:
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            for r in splits.get(name, []):
                f.write(json.dumps(r) + "\n")
    return paths


def check_settings(out_dir: str, settings: dict, *, overwrite: bool):
    """A rerun resumes only the same generation (model, prompts, decoding); anything else
    needs ``overwrite`` (which clears the kept answers)."""
    path = os.path.join(out_dir, SETTINGS)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed and not overwrite:
            raise ValueError(f"{out_dir} holds data made with other settings "
                             f"({', '.join(changed)}); pass --overwrite to replace it, or "
                             "another --out")
        if changed:
            for name in (ANSWERS, SETTINGS):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)
