"""Attention sinks, found on the data (``skip_first="auto"`` in training, ``train_sae`` and the
report's contexts)."""
from __future__ import annotations

from .hookpoints import forward_to, resolve_hook
from .models import input_device

SINK_RATIO = 8.0  # a leading position is a sink when its mean residual norm is over this
# multiple of the median norm of the later positions
MAX_SINKS = 4


def sink_positions(model, tokenizer, records, hook, *, max_records=32, max_len=64,
                   ratio=SINK_RATIO, max_sinks=MAX_SINKS) -> tuple[int, float]:
    """Attention sinks, found on the data: -> (n, the largest ratio seen), ``n`` the number
    of leading positions whose mean residual norm at ``hook`` (over up to ``max_records``
    records, their first ``max_len`` tokens) is over ``ratio`` × the median norm of the
    positions from ``max_sinks`` on. Most pretrained LMs have one at position 0 (a norm
    10–100× the others), some a second one after it (e.g. the chat template's role token);
    an SAE's code there is meaningless and huge, and an edit there moves nothing useful.
    (0, ratio) when the records are too short to tell."""
    import torch


    path = resolve_hook(model, hook)
    heads, rest = [[] for _ in range(max_sinks)], []
    for r in records[:max_records]:
        text = r["text"] if "text" in r else r["prompt"] + r.get("completion", "")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
        if len(ids) <= max_sinks:
            continue
        with torch.no_grad():
            h = forward_to(model, path, torch.tensor([ids], device=input_device(model)))[0]
        norms = h.float().norm(dim=-1).cpu()
        for p in range(max_sinks):
            heads[p].append(float(norms[p]))
        rest += norms[max_sinks:].tolist()
    if not rest:
        return 0, 0.0
    ref = max(float(torch.tensor(rest).median()), 1e-30)
    seen = [sum(v) / len(v) / ref for v in heads]
    n = 0
    while n < max_sinks and seen[n] > ratio:
        n += 1
    return n, max(seen)
