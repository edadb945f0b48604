"""What the report measures, each a function of a model, an SAE, an adapter and records:
the edit's readout through the SAE (``edit_readout``), the distillation's target
(``target_readout``), mean |Δz| (``mean_abs_delta_z``), the adapter's own weights
(``latent_scores``), and what a latent is (``latent_activations``, ``activation_lift``,
``top_contexts``).
"""
from __future__ import annotations

import torch

from ..modules import LatentAdapter
from ..reference import activation_fn


def _top(scores: torch.Tensor, n: int):
    n = min(n, scores.numel())
    v, i = torch.topk(scores.float(), n)
    return [(int(a), float(b)) for a, b in zip(i, v)]


def latent_scores(adapter: LatentAdapter, sae) -> dict:
    dn = sae.W_dec.detach().float().norm(dim=1)
    p = adapter.edit_params()  # latent mask applied
    out = {}
    if "gain" in p:
        out["|gain|"] = p["gain"].detach().float().abs()
    if "bias" in p:
        out["|bias|·‖W_dec‖"] = p["bias"].detach().float().abs() * dn
    return out


@torch.no_grad()
def mean_abs_delta_z(model, tokenizer, sae, adapter, hook, records, *, max_tokens=4096,
                     chunk_elems=1 << 22, skip_first=0):
    """Mean |z'_i − z_i| per latent over the hooked activations of ``records`` (less each
    record's first ``skip_first`` positions, which the edit leaves alone)."""
    from ..hookpoints import forward_to, resolve_hook
    from ..models import input_device

    path = resolve_hook(model, hook)
    acts = []
    n = 0
    for r in records:
        text = r["text"] if "text" in r else r["prompt"] + r["completion"]
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        h = forward_to(model, path, ids.to(input_device(model)))[:, skip_first:]
        acts.append(h.detach().reshape(-1, h.shape[-1]).float())
        n += h.shape[0] * h.shape[1]
        if n >= max_tokens:
            break
    if not acts:
        return None
    x = torch.cat(acts)[:max_tokens].to(sae.W_dec.dtype)
    S = sae.d_sae
    p = {k: v.detach() for k, v in adapter.edit_params().items()}
    act = activation_fn(adapter.activation)
    total = torch.zeros(S, dtype=torch.float64, device=x.device)
    step = max(1, chunk_elems // S)
    for i in range(0, x.shape[0], step):
        v, idx = sae.encode(x[i:i + step])
        z = torch.zeros(v.shape[0], S, dtype=v.dtype, device=v.device).scatter(1, idx, v)
        dz = torch.zeros_like(z)
        if "gain" in p:
            dz += z * p["gain"]
        if "bias" in p:
            dz += p["bias"]
        if "W_in" in p:
            h = z @ p["W_in"] + p.get("b_in", 0)
            dz += act(h) @ p["W_out"]
        total += dz.abs().sum(0).double()
    return (total / x.shape[0]).float()


def _record_ids(tokenizer, r, max_len, completion_only=True):
    """-> (the record's first ``max_len`` token ids, the index of its first completion token:
    0 for ``text`` records, or when not ``completion_only``)."""
    if "text" in r:
        ids, start = tokenizer(r["text"], add_special_tokens=False)["input_ids"], 0
    else:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        ids, start = p + c, (len(p) if completion_only else 0)
    return ids[:max_len], start


@torch.no_grad()
def edit_readout(model, tokenizer, sae, adapter, hook, records, *, mode="delta",
                 max_tokens=4096, max_len=256, switched=False, skip_first=0, upstream=None):
    """The edit as the SAE itself reads it: per latent, the mean over ``records``' tokens
    (completion tokens of prompt/completion records) of ``enc(edited output) − enc(output)``
    at ``hook``, signed. Unlike the adapter's own weights, which an overcomplete dictionary
    does not determine (a bias over S latents writes one d-dimensional vector, and Adam moves
    every coordinate it touches by about the same step), this reads which latents the edited
    residual turns on or off. None when the records hold no token.

    ``switched=True`` returns ``(readout, switched)``, the second counting on each token only
    the latents the edit switches: active in the edited code and not in the unedited one
    (+ their edited value) or the reverse (− their unedited value). A latent that is already
    active and only grows or shrinks (a frequent one, such as a comma's) is left out, so this
    part names what the edit adds to or removes from the residual's description.

    ``upstream``: a multi-layer run's other edits, ``{hook: (sae, adapter)}``, on as well, so
    that at a later layer this reads the whole run's effect so far (its edits before ``hook``
    and the one at it), not the one adapter's on the unedited residual; edits after ``hook``
    play no part."""
    from ..hookpoints import forward_to, resolve_hook
    from ..hooks import attach
    from ..models import input_device

    path = resolve_hook(model, hook)
    if upstream and hook in upstream:
        raise ValueError(f"upstream: holds the edit at {hook!r} itself; pass the run's other "
                         "edits only")
    edits = attach(model, {**(upstream or {}), hook: (sae, adapter)}, mode=mode,
                   skip_first=skip_first)  # forward_to reads after the hooked module
    total = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device)
    flips = torch.zeros_like(total)
    n = 0
    try:
        for r in records:
            ids, start = _record_ids(tokenizer, r, max_len)
            if len(ids) <= start:
                continue
            x = torch.tensor([ids], device=input_device(model))
            with edits.disabled():
                off = forward_to(model, path, x)[0, start:].to(sae.W_dec.dtype)
            on = forward_to(model, path, x)[0, start:].to(sae.W_dec.dtype)
            codes = []
            for h, sign in ((on, 1.0), (off, -1.0)):
                v, i = sae.encode(h)
                total.index_add_(0, i.reshape(-1), sign * v.reshape(-1).double())
                active = v > 0  # a TopK code may hold zeros; they are not active
                row = torch.arange(v.shape[0], device=v.device)[:, None].expand_as(i)
                codes.append((sign, v[active].double(), i[active], (row * sae.d_sae + i)[active]))
            (s1, v1, i1, k1), (s0, v0, i0, k0) = codes
            new = ~torch.isin(k1, k0)  # (token, latent) pairs in one code and not the other
            gone = ~torch.isin(k0, k1)
            flips.index_add_(0, i1[new], s1 * v1[new])
            flips.index_add_(0, i0[gone], s0 * v0[gone])
            n += off.shape[0]
            if n >= max_tokens:
                break
    finally:
        edits.remove()
    if not n:
        return (None, None) if switched else None
    return ((total / n).float(), (flips / n).float()) if switched else (total / n).float()


@torch.no_grad()
def target_readout(model, tokenizer, sae, hook, records, *, max_tokens=4096, max_len=256):
    """What a distillation's edit aims at, as the SAE reads it: per latent, the mean over the
    completion tokens of ``records`` (prompt/completion records with a ``teacher_prompt``) of
    ``enc(h after teacher_prompt + completion) − enc(h after prompt + completion)`` at ``hook``
    of the unedited model, the same completion tokens after the two prompts. An edit that made
    the student's residual there the teacher's would have exactly this readout
    (``edit_readout``). None when no record has a teacher prompt and a completion token."""
    from ..hookpoints import forward_to, resolve_hook
    from ..models import input_device

    path = resolve_hook(model, hook)
    total = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device)
    n = 0
    for r in records:
        if "teacher_prompt" not in r or "completion" not in r:
            continue
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        ids = [tokenizer(r[key], add_special_tokens=False)["input_ids"]
               for key in ("teacher_prompt", "prompt")]
        m = min(len(c), *(max_len - len(p) for p in ids))  # the same tokens in both
        if m <= 0:
            continue
        for p, sign in zip(ids, (1.0, -1.0)):
            h = forward_to(model, path, torch.tensor([p + c[:m]], device=input_device(model)))
            v, i = sae.encode(h[0, len(p):].to(sae.W_dec.dtype))
            total.index_add_(0, i.reshape(-1), sign * v.reshape(-1).double())
        n += m
        if n >= max_tokens:
            break
    return (total / n).float() if n else None


@torch.no_grad()
def latent_activations(model, tokenizer, sae, hook, records, latents, *, completion_only=True,
                       max_len=256):
    """Per record: (token strings, activations [T, len(latents)]) of the chosen latents at the
    hooked module of the unedited model (completion tokens only for prompt/completion
    records when ``completion_only``)."""
    from ..hookpoints import forward_to, resolve_hook
    from ..models import input_device

    path = resolve_hook(model, hook)
    lat = torch.as_tensor(latents, dtype=torch.long)
    out = []
    for r in records:
        ids, start = _record_ids(tokenizer, r, max_len, completion_only)
        if len(ids) <= start:
            continue
        h = forward_to(model, path, torch.tensor([ids], device=input_device(model)))
        h = h[0].to(sae.W_dec.dtype)
        v, i = sae.encode(h)
        dense = torch.zeros(h.shape[0], sae.d_sae, dtype=v.dtype, device=v.device)
        dense.scatter_(1, i, v)
        out.append(([tokenizer.decode([t]) for t in ids[start:]],
                    dense[start:, lat.to(dense.device)].float().cpu()))
    return out


def activation_lift(model, tokenizer, sae, hook, latents, records_a, records_b):
    """Per latent: mean activation per token on ``records_a`` (e.g. the teacher's
    completions), on ``records_b`` (the base model's) and their ratio (the lift)."""
    def mean(recs):
        acts = [a for _, a in latent_activations(model, tokenizer, sae, hook, recs, latents)]
        return torch.cat(acts).mean(0) if acts else torch.zeros(len(latents))
    a, b = mean(records_a), mean(records_b)
    return [{"latent": int(i), "mean_a": float(x), "mean_b": float(y),
             "lift": float(x / y) if y > 0 else float("inf") if x > 0 else 1.0}
            for i, x, y in zip(latents, a, b)]


def directional_lift(x: dict) -> float:
    """A latent's lift in the direction its edit (``x["edit"]``, signed) pushes: a/b when the
    edit raises it, b/a when it lowers it (a latent the edit suppresses should be one the
    teacher uses less)."""
    if x.get("edit") is None or x["edit"] >= 0:
        return x["lift"]
    a, b = x["mean_a"], x["mean_b"]
    return b / a if a > 0 else float("inf") if b > 0 else 1.0


def _finite_mean(xs):
    xs = [v for v in xs if v != float("inf")]
    return sum(xs) / len(xs) if xs else float("nan")


def top_contexts(model, tokenizer, sae, hook, latents, records, *, n=5, window=8,
                 skip_first=1):
    """Per latent: its ``n`` top-activating tokens in ``records`` with ``window`` tokens of
    context on each side (the token in ⟦ ⟧), as SAE dashboards show them. A record's first
    ``skip_first`` positions are context only: the first is an attention sink in most
    models (a residual norm ~100x the others; ``train_sae`` leaves it out the same way), where
    an SAE's code is meaningless and huge."""
    acts = latent_activations(model, tokenizer, sae, hook, records, latents,
                              completion_only=False)
    out = {}
    for j, lat in enumerate(latents):
        best = []
        for toks, a in acts:
            col = a[skip_first:, j]
            for t in torch.topk(col, min(n, col.numel())).indices.tolist():
                if col[t] > 0:
                    best.append((float(col[t]), toks, t + skip_first))
        best.sort(key=lambda b: -b[0])
        out[int(lat)] = [{"activation": v, "context": _context(toks, t, window)}
                         for v, toks, t in best[:n]]
    return out


def _context(toks, t, window):
    def clean(ts):  # decoded token strings; line breaks shown as ⏎
        return "".join(ts).replace("\n", "⏎")
    return (clean(toks[max(0, t - window):t]) + "⟦" + clean([toks[t]]) + "⟧"
            + clean(toks[t + 1:t + 1 + window]))
