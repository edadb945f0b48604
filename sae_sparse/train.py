"""Training wrapper: train sparse latent adapters (or baselines) on a frozen causal LM.

    result = train_adapter(model, tokenizer, {"transformer.h.1": sae}, "data.jsonl", "runs/x",
                           TrainConfig(edit="gain,bias,ffn:16", steps=300))

A run directory holds ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT-like: the
SAE's format, path, content hash and hook point are recorded), ``metrics.json``, the eval split
``eval.jsonl`` and, while training, ``checkpoint/`` from which a rerun resumes exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import __version__
from .hooks import ResidualLoRA, attach
from .modules import LatentAdapter
from .ops import cached_folds
from .reference import ACTIVATIONS, MODES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
POSITIONS = ("all", "prompt", "completion")
LOSSES = ("ce", "kl")


def parse_edit(spec: str) -> dict:
    """``"gain,bias,ffn:16"`` -> LatentAdapter kwargs. ``ffn:H[:act]``; ``lowrank:R`` is
    ``ffn:R:identity`` (a rank-R linear map in latent space)."""
    out = dict(gain=False, bias=False, ffn=False, hidden=16, activation="relu")
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, *args = part.split(":")
        if name in ("gain", "bias") and not args:
            out[name] = True
        elif name in ("ffn", "lowrank") and len(args) <= 2:
            out["ffn"] = True
            if args:
                if not args[0].isdigit() or int(args[0]) < 1:
                    raise ValueError(f"edit {part!r}: the width must be a positive integer")
                out["hidden"] = int(args[0])
            act = args[1] if len(args) == 2 else ("identity" if name == "lowrank" else "relu")
            if act not in ACTIVATIONS:
                raise ValueError(f"edit {part!r}: activation must be one of {ACTIVATIONS}")
            out["activation"] = act
        else:
            raise ValueError(f"unknown edit {part!r}: use gain, bias, ffn:H[:relu|gelu|identity] "
                             "or lowrank:R, comma-separated")
    if not (out["gain"] or out["bias"] or out["ffn"]):
        raise ValueError("edit spec names no edit")
    return out


@dataclasses.dataclass
class TrainConfig:
    edit: str = "gain,bias,ffn:16"
    mode: str = "delta"
    baseline: str | None = None  # None (sparse SAE adapter), "dense", or "lora:R"
    latents: list | None = None  # restrict the edit to these latent ids (masked-sparse variant)
    edit_positions: str = "all"  # "all" | "prompt" | "completion"
    # leave each sequence's first positions unedited: 1 for the attention sink of most
    # pretrained LMs (a residual ~100x the others', where the SAE's code is meaningless)
    skip_first: int = 0
    # "ce": next-token cross-entropy on the completion tokens. "kl": distillation,
    # KL(teacher ‖ student) per completion token, the teacher being the frozen model with its
    # edits off reading each record's ``teacher_prompt`` (e.g. the prompt with a system
    # prompt) + the same completion, or a separate ``teacher`` model (train_adapter)
    loss: str = "ce"
    l1: float = 1e-3  # L1 on gain, bias and W_out (scaled by decoder norms): keeps edits sparse
    lr: float = 1e-2
    # the learning rate rises linearly from lr/warmup_steps to lr over the first warmup_steps
    # steps (a function of the step alone: a resumed run follows the same schedule). Adam's
    # first steps move every weight with a gradient by about lr, which for an FFN's dense
    # W_out [H, S] is a large edit at once
    warmup_steps: int = 0
    weight_decay: float = 0.0
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 128
    eval_frac: float = 0.1
    eval_every: int = 50
    # the loss is read back from the device (a host sync) every this many steps, not every
    # micro-step; also at evals, checkpoints and the end
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    backend: str | None = None
    bf16: bool | None = None  # autocast to bf16; None = on CUDA only

    def validate(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.edit_positions not in POSITIONS:
            raise ValueError(f"edit_positions must be one of {POSITIONS}")
        if not isinstance(self.skip_first, int) or self.skip_first < 0:
            raise ValueError(f"skip_first must be an int >= 0, got {self.skip_first!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.baseline is not None and self.baseline != "dense" and not (
                self.baseline.startswith("lora:") and self.baseline[5:].isdigit()):
            raise ValueError(f"baseline must be None, 'dense' or 'lora:R', got {self.baseline!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.latents is not None and (not self.latents or any(
                not isinstance(i, int) or i < 0 for i in self.latents)):
            raise ValueError("latents must be a non-empty list of non-negative latent ids")
        if not 0 <= self.eval_frac < 1:
            raise ValueError("eval_frac must be in [0, 1)")
        parse_edit(self.edit)


# ---------------------------------------------------------------------------------------- data


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
    T = max(len(e[0]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.bool)
    loss = torch.zeros(B, T, dtype=torch.bool)
    prompt = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e[0])
        ids[b, :n], attn[b, :n], loss[b, :n], prompt[b, :n] = e[0], True, e[1], e[2]
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


def lm_loss(model, ids, attn, loss_mask, denom=None):
    """Mean next-token cross-entropy over the loss tokens; with ``denom``, their sum divided
    by it (a data-parallel rank's share of a global batch's mean)."""
    tgt = loss_mask[:, 1:]
    pred = F.pad(tgt, (0, 1))  # the positions that predict a loss token
    logits = model_logits(model, ids, attn, pred).float()
    ce = F.cross_entropy(logits, ids[:, 1:][tgt.to(ids.device)].to(logits.device),
                         reduction="sum")
    return ce / (denom if denom is not None else tgt.sum().clamp_min(1))


@torch.no_grad()
def teacher_logprobs(teacher, examples, pad_id):
    """The teacher's next-token log-probabilities [n, V] (float32) at the positions that
    predict the examples' completion tokens, in order (``teacher``: a model; edits attached
    to it should be off, see :func:`train_adapter`)."""
    ids, attn, mask = collate_teacher(examples, pad_id)
    dev = input_device(teacher)
    pred = F.pad(mask[:, 1:], (0, 1))  # the positions that predict a completion token
    return model_logits(teacher, ids.to(dev), attn.to(dev), pred).float().log_softmax(-1)


def kl_loss(model, ids, attn, loss_mask, teacher_logp, denom=None):
    """Mean KL(teacher ‖ student) per loss token: ``teacher_logp`` [n, V] from
    :func:`teacher_logprobs` for the same examples; with ``denom``, the sum divided by it."""
    pred = F.pad(loss_mask[:, 1:], (0, 1))  # the positions that predict a loss token
    s = model_logits(model, ids, attn, pred).float().log_softmax(-1)
    if s.shape != teacher_logp.shape:
        raise ValueError(f"the teacher's log-probs have shape {tuple(teacher_logp.shape)}, the "
                         f"student's {tuple(s.shape)} (loss tokens x vocabulary): the teacher "
                         "needs the same tokenizer and vocabulary as the student")
    kl = F.kl_div(s, teacher_logp.to(s.device), reduction="sum", log_target=True)
    return kl / (denom if denom is not None else max(s.shape[0], 1))


def _teacher_targets(cfg, model, teacher, edits, examples, pad_id, device):
    """``loss="kl"``: the teacher's log-probs for a batch (the model's own edits off when it
    is its own teacher); ``"ce"``: None."""
    if cfg.loss == "ce":
        return None
    off = edits.disabled() if teacher is None and edits is not None else (
        contextlib.nullcontext())
    with off, _autocast(cfg, device):
        return teacher_logprobs(teacher if teacher is not None else model, examples, pad_id)


def _batch_loss(model, ids, attn, loss_mask, teacher_logp, denom=None):
    if teacher_logp is None:
        return lm_loss(model, ids, attn, loss_mask, denom)
    return kl_loss(model, ids, attn, loss_mask, teacher_logp, denom)


# ------------------------------------------------------------------------------ data parallel


def _world():
    """(rank, world size, process group or None): torch.distributed when initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    return 0, 1, None


def _share(items, rank, world):
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


def _barrier(group):
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group)


def _all_reduce(t, group):
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


# ------------------------------------------------------------------------------------- trainer


def build_trainables(saes: dict, cfg: TrainConfig, device):
    """hook -> LatentAdapter (SAE edit, sparse or dense) or ResidualLoRA (baseline);
    ``device``: one device, or ``{hook: device}``."""
    out = {}
    torch.manual_seed(cfg.seed)
    devices = device if isinstance(device, dict) else {h: device for h in saes}
    for hook in sorted(saes):
        sae, device = saes[hook], devices[hook]
        if cfg.baseline and cfg.baseline.startswith("lora:"):
            out[hook] = ResidualLoRA(sae.d_in, int(cfg.baseline[5:]), device=device)
        else:
            e = parse_edit(cfg.edit)
            out[hook] = LatentAdapter(sae.d_sae, e["hidden"], e["gain"], e["bias"], e["ffn"],
                                      e["activation"], device=device,
                                      latent_mask=_mask(cfg.latents, sae.d_sae, hook))
    return out


def _mask(latents, S, hook):
    if latents is None:
        return None
    bad = [i for i in latents if i >= S]
    if bad:
        raise ValueError(f"latents {bad[:5]} are out of range for the SAE at {hook} (S={S})")
    m = torch.zeros(S, dtype=torch.bool)
    m[list(latents)] = True
    return m


def l1_penalty(adapter, sae):
    if not isinstance(adapter, LatentAdapter):
        return None
    dn = sae.W_dec.detach().norm(dim=1)
    terms = []
    if adapter.gain is not None:
        terms.append(adapter.gain.abs().sum())
    if adapter.bias is not None:
        terms.append((adapter.bias.abs() * dn).sum())
    if adapter.W_out is not None:
        terms.append((adapter.W_out.abs() * dn).sum())
    return sum(terms)


def _attach_trainables(model, saes, trainables, cfg):
    spec = {h: (t if isinstance(t, ResidualLoRA) else (saes[h], t)) for h, t in trainables.items()}
    return attach(model, spec, mode=cfg.mode, backend=cfg.backend, dense=cfg.baseline == "dense",
                  skip_first=cfg.skip_first)


def _edit_mask(cfg, attn, prompt):
    if cfg.edit_positions == "all":
        return None
    return (prompt if cfg.edit_positions == "prompt" else ~prompt) & attn


class _Schedule:
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


def _state_dict(trainables):
    return {f"{h}.{n}": p.detach().cpu().contiguous() for h, t in trainables.items()
            for n, p in t.named_parameters()}


def _load_state(trainables, tensors):
    for h, t in trainables.items():
        for n, p in t.named_parameters():
            with torch.no_grad():
                p.copy_(tensors[f"{h}.{n}"])


def evaluate(model, data, cfg, edits, device, pad_id, group=None, teacher=None):
    """Mean loss (``cfg.loss``) per loss token over ``data``; under torch.distributed
    (``group``) each rank evaluates its share of the batches and the sums are all-reduced."""
    if not data:
        return float("nan")
    rank, world = (0, 1) if group is None else _world()[:2]
    tot = torch.zeros((), dtype=torch.float64, device=device)
    cnt = torch.zeros((), dtype=torch.float64, device=device)
    model_dtype_ctx = _autocast(cfg, device)
    with torch.no_grad(), cached_folds():  # the adapters' M, c folded once per evaluation
        starts = list(range(0, len(data), cfg.batch_size))
        for i in starts[rank::world]:
            batch = data[i:i + cfg.batch_size]
            ids, attn, loss_mask, prompt = (t.to(device) for t in collate(batch, pad_id))
            t_logp = _teacher_targets(cfg, model, teacher, edits, batch, pad_id, device)
            ctx = (edits.token_mask(_edit_mask(cfg, attn, prompt)) if edits is not None
                   else contextlib.nullcontext())
            with ctx, model_dtype_ctx:
                loss = _batch_loss(model, ids, attn, loss_mask, t_logp)
            n = loss_mask[:, 1:].sum()
            tot, cnt = tot + loss.detach().double() * n, cnt + n  # read back once, at the end
    both = _all_reduce(torch.cat([tot.view(1), cnt.view(1)]), group)
    return float(both[0] / both[1].clamp_min(1))


def _autocast(cfg, device):
    use = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train_adapter`: the step in flight was finished and a checkpoint
    saved; rerunning the same call resumes from it."""

    def __init__(self, step, checkpoint):
        super().__init__(f"interrupted after step {step}; checkpoint saved in {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class RunMismatch(ValueError):
    """The run directory holds a run of other data, model, SAEs or configuration."""


RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, "metrics.json", "eval.jsonl", "report.md",
             "report.json")


def _sha256_bytes(chunks) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _file_sha256(path):
    with open(path, "rb") as f:
        return _sha256_bytes(iter(lambda: f.read(1 << 20), b""))


def _tensor_sha256(tensors):
    return _sha256_bytes(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                         for t in tensors)


def run_fingerprint(model, saes, data, *, sae_sources=None, model_source=None) -> dict:
    """What a checkpoint must have been trained on to be resumed: the data (sha256 of the
    JSONL file, or of the records), the model (its source, type and parameter count; not a
    hash of its weights, which would read gigabytes on every start) and each SAE (the sha256
    of its files when they are known, else of its weights). A model built on the meta device
    from the same config has the same fingerprint (the CLI checks a run directory before
    loading any weight)."""
    if isinstance(data, str):
        d = _file_sha256(data)
    else:
        d = _sha256_bytes([json.dumps(list(data), sort_keys=True).encode()])
    m = _model_summary(model, model_source)
    sa = {}
    for h, sae in saes.items():
        src = (sae_sources or {}).get(h) or {}
        sa[h] = src.get("sha256") or _tensor_sha256(
            [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec] + (
                [sae.threshold] if sae.threshold is not None else []))
    return {"data_sha256": d, "model": m, "sae_sha256": sa}


def _model_summary(model, source):
    conf = getattr(model, "config", None)
    return {"source": source or getattr(conf, "_name_or_path", None) or None,
            "model_type": getattr(conf, "model_type", None),
            "n_params": sum(p.numel() for p in model.parameters())}


def _fingerprint_changes(old: dict, new: dict) -> list[str]:
    out = []
    if old.get("data_sha256") != new["data_sha256"]:
        out.append("the data (sha256 %s… now %s…)" % (str(old.get("data_sha256"))[:8],
                                                      new["data_sha256"][:8]))
    om, nm = old.get("model") or {}, new["model"]
    if om != nm:
        out.append(f"the model ({om.get('source')}, {om.get('model_type')}, "
                   f"{om.get('n_params')} parameters -> {nm['source']}, {nm['model_type']}, "
                   f"{nm['n_params']} parameters)")
    if old.get("teacher") != new.get("teacher"):
        out.append(f"the teacher model ({old.get('teacher')} -> {new.get('teacher')})")
    osa, nsa = old.get("sae_sha256") or {}, new["sae_sha256"]
    if set(osa) != set(nsa):
        out.append(f"the hooks ({sorted(osa)} -> {sorted(nsa)})")
    else:
        out += [f"the SAE at {h} (sha256 {osa[h][:8]}… now {nsa[h][:8]}…)"
                for h in sorted(nsa) if osa[h] != nsa[h]]
    return out


def _config_changes(old: dict, new: dict) -> list[str]:
    # settings added since a checkpoint was written count as their defaults
    added = {"loss": "ce", "warmup_steps": 0}
    a, b = {**added, **_resumable(old)}, {**added, **_resumable(new)}
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _clear_run(out_dir, everything):
    import shutil

    shutil.rmtree(os.path.join(out_dir, "checkpoint"), ignore_errors=True)
    if everything:
        for f in os.listdir(out_dir):
            if f in RUN_FILES or (f.endswith(".png") and os.path.isfile(os.path.join(out_dir, f))):
                os.remove(os.path.join(out_dir, f))


class _SigintGuard:
    """Ctrl-C sets a flag the loop checks after each step (a second Ctrl-C interrupts at
    once); only in the main thread, where Python delivers signals."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.hit:
                    raise KeyboardInterrupt
                self.hit = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def train_adapter(model, tokenizer, saes: dict, data, out_dir: str,
                  config: TrainConfig | None = None, *, sae_sources: dict | None = None,
                  model_source: str | None = None, progress: bool = True,
                  resume: bool = True, overwrite: bool = False, log=print,
                  teacher=None) -> dict:
    """Trains one adapter per hooked module on a frozen model and SAEs.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``), e.g. from transformers.
        tokenizer: its tokenizer (a callable returning ``input_ids``; ``pad_token_id`` used).
        saes: ``{hook: SAE}``; the SAE reads and edits that module's output (a module path, a
            sparsify hookpoint or a TransformerLens hook name, see :mod:`sae_sparse.hookpoints`).
        data: a JSONL path or a list of records (``text``, or ``prompt`` + ``completion``).
        out_dir: run directory (created); rerunning with the same arguments resumes from its
            checkpoint exactly ("resuming from step N" is logged). A checkpoint made with other
            data, another model, other SAEs or another configuration is refused
            (:class:`RunMismatch`, naming what changed); a larger ``steps`` continues a run.
        config: a :class:`TrainConfig`.
        sae_sources: ``{hook: {"format", "path", "sha256", ...}}`` recorded in the config.
        model_source: the model's path, recorded in the config.
        resume: False starts from step 0 (the directory's checkpoint is discarded).
        overwrite: discard every file of an earlier run in ``out_dir`` first (checkpoint,
            adapter, metrics, report), whatever it was trained on.
        log: where progress lines go (``print``; None for silence): the resumed step, every
            evaluation (also with ``progress=False``) and the overflow warning.
        teacher: for ``loss="kl"``, a separate frozen teacher model with the same tokenizer
            (it reads each record's ``teacher_prompt``, else its prompt, + the completion).
            None: the model itself with its edits off is the teacher, and every record needs
            a ``teacher_prompt`` (system-prompt distillation).
    Returns:
        the metrics dict also written to ``metrics.json``. Ctrl-C finishes the step in flight,
        saves a checkpoint and raises :class:`TrainingInterrupted`.
    """
    from tqdm.auto import tqdm

    say = log or (lambda *a, **k: None)
    cfg = config or TrainConfig()
    cfg.validate()
    device = input_device(model)
    records = load_jsonl(data) if isinstance(data, str) else list(data)
    if cfg.loss == "kl" and teacher is None:
        lacking = sum(1 for r in records if not isinstance(r.get("teacher_prompt"), str))
        if lacking:
            raise ValueError(
                f"loss='kl' with the model as its own teacher needs a 'teacher_prompt' string "
                f"in every record ({lacking} of {len(records)} have none): without one the "
                "teacher reads what the student reads; or pass a separate teacher model")
    if teacher is not None and cfg.loss != "kl":
        raise ValueError("a teacher model is only used with loss='kl'")
    fingerprint = run_fingerprint(model, saes, data, sae_sources=sae_sources,
                                  model_source=model_source)
    if teacher is not None:
        fingerprint["teacher"] = _model_summary(teacher, None)
    ckpt = os.path.join(out_dir, "checkpoint")
    rank, world, group = _world()
    if world > 1 and cfg.batch_size < world:
        raise ValueError(f"batch_size ({cfg.batch_size}, the global batch) must be at least "
                         f"the number of processes ({world})")
    lead = rank == 0  # writes the run directory; every rank reads it
    state = _check_run_dir(out_dir, cfg, fingerprint, resume=resume, overwrite=overwrite)
    _barrier(group)  # every rank has read the checkpoint before rank 0 may clear it
    if lead:
        os.makedirs(out_dir, exist_ok=True)
        if overwrite or not resume:
            _clear_run(out_dir, everything=overwrite)
    rng = random.Random(cfg.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    n_eval = int(round(cfg.eval_frac * len(records))) if len(records) > 1 else 0
    eval_recs = [records[i] for i in order[:n_eval]]
    train_recs = [records[i] for i in order[n_eval:]]
    if lead:
        with open(os.path.join(out_dir, "eval.jsonl"), "w") as f:
            for r in eval_recs:
                f.write(json.dumps(r) + "\n")
    kl = cfg.loss == "kl"
    train_data = tokenize(train_recs, tokenizer, cfg.max_len, teacher=kl)
    eval_data = tokenize(eval_recs, tokenizer, cfg.max_len, teacher=kl) if eval_recs else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    model.requires_grad_(False).eval()
    if teacher is not None:
        teacher.requires_grad_(False).eval()
    for sae in saes.values():
        sae.requires_grad_(False)
    # a model spread over devices (a device map): each SAE and adapter where its hook runs
    hook_dev = {h: _hook_device(model, h, device) for h in saes}
    for h, sae in saes.items():
        sae.to(hook_dev[h])
    trainables = build_trainables(saes, cfg, hook_dev)
    params = [p for t in trainables.values() for p in t.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": [], "overflow": {}}
    start = 0
    if state is not None:
        from safetensors.torch import load_file

        _load_state(trainables, load_file(os.path.join(ckpt, "trainable.safetensors")))
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["step"]
        history.setdefault("overflow", {})
        if lead:
            say(f"resuming from step {start} of {cfg.steps} ({ckpt})")
    if not lead:
        say, progress = (lambda *a, **k: None), False

    edits = _attach_trainables(model, saes, trainables, cfg)
    counts = {h: history["overflow"].get(h, [0, 0]) for h in trainables}
    history["overflow"] = counts
    try:
        with edits.disabled():
            base_eval = evaluate(model, eval_data, cfg, None, device, pad_id, group, teacher)
        if eval_data and start == 0:
            say(f"step 0/{cfg.steps}: eval loss {base_eval:.4f} (unedited model)")
        sched = _Schedule(len(train_data), cfg.batch_size, cfg.grad_accum, cfg.seed)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
                   desc="train", dynamic_ncols=True)
        pending = []  # (step, loss on the device) not yet read back
        agreed_stop = [False]  # several processes: a Ctrl-C on any rank, as last read back
        stop_dev = None

        def flush():
            """Reads the pending losses and the overflow counts back in one host sync; a
            non-finite loss stops the run (NaN in the data, the model or the SAE)."""
            if not pending:
                return
            tallies = edits.overflow  # {hook: [tokens, overflowing tokens]} on the device
            edits.overflow = {}
            hooks = list(tallies)
            flat = [t.double() for _, t in pending] + [
                torch.as_tensor(c).to(device).double() for h in hooks for c in tallies[h]]
            if world > 1:
                flat.append(stop_dev.double())
            # the one host sync (and, under torch.distributed, the ranks' shares summed)
            vals = _all_reduce(torch.stack(flat), group).tolist()
            if world > 1:
                agreed_stop[0] = vals.pop() > 0
            for i, h in enumerate(hooks):
                t, o = vals[len(pending) + 2 * i:len(pending) + 2 * i + 2]
                counts[h] = [counts[h][0] + int(t), counts[h][1] + int(o)]
            vals = vals[:len(pending)]
            for (s, _), v in zip(pending, vals):
                if not math.isfinite(v):
                    raise FloatingPointError(
                        f"the training loss is {v} at step {s}: check the SAE's weights, the "
                        "model's activations at the hook and the learning rate")
                history["step"].append(s)
                history["train_loss"].append(v)
            pending.clear()
            bar.set_postfix(loss=f"{vals[-1]:.4f}", refresh=False)

        def note(msg):
            if progress:
                bar.write(msg)
            else:
                say(msg)

        with _SigintGuard() as sigint:
            for step in bar:
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for micro in range(cfg.grad_accum):
                    batch = [train_data[i] for i in sched.batch(step, micro)]
                    denom = None
                    if world > 1:  # this rank's share; the mean over the global batch
                        denom = float(max(1, sum(int(e[1][1:].sum()) for e in batch)))
                        batch = _share(batch, rank, world)
                    ids, attn, loss_mask, prompt = (t.to(device) for t in collate(batch, pad_id))
                    t_logp = _teacher_targets(cfg, model, teacher, edits, batch, pad_id, device)
                    with edits.token_mask(_edit_mask(cfg, attn, prompt)), \
                            edits.counting_overflow(attn), _autocast(cfg, device):
                        loss = _batch_loss(model, ids, attn, loss_mask, t_logp, denom)
                    (loss / cfg.grad_accum).backward()
                    total = total + loss.detach().float() / cfg.grad_accum  # on the device
                if world > 1:  # the ranks' Ctrl-C flags travel with the gradients
                    stop_dev = _sync_grads(params, sigint.hit, group, device)
                pen = [l1_penalty(trainables[h], saes[h]) for h in trainables]
                pen = [p for p in pen if p is not None]
                if pen and cfg.l1 > 0:
                    (cfg.l1 * sum(pen)).backward()
                for g in opt.param_groups:
                    g["lr"] = warmup_lr(cfg.lr, cfg.warmup_steps, step)
                opt.step()
                pending.append((step + 1, total))
                last = step + 1 == cfg.steps
                evals = eval_data and ((step + 1) % cfg.eval_every == 0 or last)
                saves = (step + 1) % cfg.checkpoint_every == 0 and not last
                # one process stops after the step Ctrl-C came in; several agree on it when the
                # losses are read back (every log_every steps), then stop together
                local_stop = world == 1 and sigint.hit
                if (step + 1) % cfg.log_every == 0 or last or evals or saves or local_stop:
                    flush()
                stop = local_stop or (world > 1 and agreed_stop[0])
                if evals:
                    history["eval_step"].append(step + 1)
                    history["eval_loss"].append(evaluate(model, eval_data, cfg, edits, device,
                                                         pad_id, group, teacher))
                    note(f"step {step + 1}/{cfg.steps}: train loss "
                         f"{history['train_loss'][-1]:.4f}, eval loss "
                         f"{history['eval_loss'][-1]:.4f}")
                if lead and (saves or (stop and not last)):
                    _save_checkpoint(ckpt, trainables, opt, history, step + 1, cfg, fingerprint)
                if stop and not last:
                    _barrier(group)  # the checkpoint is written before any rank exits
                    bar.close()
                    raise TrainingInterrupted(step + 1, ckpt)
    finally:
        edits.remove()

    overflow = {}
    for h, (t, o) in counts.items():
        sae = saes[h] if h in saes else None
        if sae is None or isinstance(trainables[h], ResidualLoRA):
            continue
        arch = _architecture(sae)
        overflow[h] = {"tokens": t, "overflow_tokens": o, "rate": o / t if t else 0.0,
                       "k": sae.k, "architecture": arch}
        if lead and arch != "topk" and t and o / t > 0.01:
            msg = (f"{100 * o / t:.1f}% of the edited tokens at {h} had more than k={sae.k} "
                   f"active latents (the cap dropped the rest): raise --k")
            warnings.warn(msg, stacklevel=2)
    metrics = {"loss": cfg.loss, "base_eval_loss": base_eval if eval_data else None,
               "final_eval_loss": history["eval_loss"][-1] if history["eval_loss"] else None,
               "final_train_loss": history["train_loss"][-1] if history["train_loss"] else None,
               "n_train": len(train_data), "n_eval": len(eval_data), "overflow": overflow,
               "world_size": world, "history": history}
    if lead:
        save_adapter(out_dir, trainables, saes, cfg, sae_sources=sae_sources,
                     model_source=model_source)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        _save_checkpoint(ckpt, trainables, opt, history, cfg.steps, cfg, fingerprint)
    _barrier(group)  # the run directory is complete when any rank returns
    return metrics


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then ``lr``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return lr
    return lr * (step + 1) / warmup_steps


def _sync_grads(params, stop: bool, group, device) -> bool:
    """Sums the ranks' gradients (each rank's loss is its share of the global batch's mean,
    so the sum is the 1-process gradient) in one all-reduce, with each rank's Ctrl-C flag;
    no host sync."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float().to(device) for g in grads] +
                     [torch.tensor([float(stop)], device=device)])
    _all_reduce(flat, group)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(g).to(g.device, g.dtype)
        off += n
    return flat[-1]  # > 0 when any rank was interrupted (read back later, with the loss)


def _hook_device(model, hook, default):
    from .hookpoints import resolve_hook

    mod = model.get_submodule(resolve_hook(model, hook))
    p = next(mod.parameters(), None)
    return p.device if p is not None else default


def _architecture(sae) -> str:
    """"topk", "jumprelu" or "relu": from the file's format info, else from the SAE."""
    arch = (getattr(sae, "format_info", None) or {}).get("architecture")
    if arch:
        return "relu" if arch == "standard" else arch
    return "jumprelu" if sae.threshold is not None else "topk"


def _check_run_dir(out_dir, cfg, fingerprint, *, resume, overwrite):
    """-> the checkpoint state to resume from, or None; RunMismatch when ``out_dir`` holds
    another run and neither ``overwrite`` nor ``resume=False`` allows replacing it."""
    ckpt = os.path.join(out_dir, "checkpoint", "state.pt")
    if overwrite:
        return None
    if os.path.exists(ckpt):
        if not resume:
            return None
        state = torch.load(ckpt, weights_only=True)
        changes = _config_changes(state["config"], dataclasses.asdict(cfg))
        if state.get("fingerprint"):
            changes = _fingerprint_changes(state["fingerprint"], fingerprint) + changes
        if changes:
            raise RunMismatch(f"{out_dir} holds a run trained with other settings: "
                              f"{'; '.join(changes)}. Use a new --out, or --overwrite to "
                              "replace that run")
        return state
    if resume and os.path.exists(os.path.join(out_dir, CONFIG_NAME)):
        raise RunMismatch(f"{out_dir} holds a finished run without a checkpoint to check it "
                          "against; use a new --out, or --overwrite to replace it")
    return None


def _resumable(conf: dict) -> dict:
    # Everything but the step budget and logging cadence must match to resume a run.
    return {k: v for k, v in conf.items()
            if k not in ("steps", "eval_every", "checkpoint_every", "log_every")}


def _save_checkpoint(ckpt, trainables, opt, history, step, cfg, fingerprint):
    from safetensors.torch import save_file

    os.makedirs(ckpt, exist_ok=True)
    tmp = os.path.join(ckpt, "trainable.safetensors.tmp")
    save_file(_state_dict(trainables), tmp)
    os.replace(tmp, os.path.join(ckpt, "trainable.safetensors"))
    tmp = os.path.join(ckpt, "state.pt.tmp")
    torch.save({"optimizer": opt.state_dict(), "history": history, "step": step,
                "config": dataclasses.asdict(cfg), "fingerprint": fingerprint}, tmp)
    os.replace(tmp, os.path.join(ckpt, "state.pt"))


# ------------------------------------------------------------------------- save / load / merge


def save_adapter(out_dir, trainables, saes, cfg: TrainConfig, *, sae_sources=None,
                 model_source=None):
    """Writes ``adapter_model.safetensors`` + ``adapter_config.json``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(_state_dict(trainables), os.path.join(out_dir, WEIGHTS_NAME))
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
            "edit_positions": cfg.edit_positions, "skip_first": cfg.skip_first,
            "baseline": cfg.baseline,
            "train_config": dataclasses.asdict(cfg), "hooks": hooks}
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(conf, f, indent=2)


def load_adapter(run_dir: str, device=None):
    """-> (``{hook: LatentAdapter | ResidualLoRA}``, config dict) from a run directory."""
    from safetensors.torch import load_file

    if not os.path.isfile(os.path.join(run_dir, CONFIG_NAME)):
        raise FileNotFoundError(f"{run_dir!r} is not a finished run directory (no "
                                f"{CONFIG_NAME})")
    with open(os.path.join(run_dir, CONFIG_NAME)) as f:
        conf = json.load(f)
    tensors = load_file(os.path.join(run_dir, WEIGHTS_NAME))
    out = {}
    for h, e in conf["hooks"].items():
        if e["kind"] == "lora":
            t = ResidualLoRA(e["d_in"], e["rank"])
        else:
            t = LatentAdapter(e["d_sae"], max(e["hidden"], 1), e["gain"], e["bias"], e["ffn"],
                              e["activation"],
                              latent_mask=_mask(e.get("latents"), e["d_sae"], h))
        _load_state({h: t}, tensors)
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
    from .io import content_hash, load_sae

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
        from .hookpoints import resolve_hook

        _, proj = _mlp_out_proj(model.get_submodule(resolve_hook(model, h)))
        with torch.no_grad():
            proj.bias.add_(delta.to(proj.bias.dtype))
    return model
