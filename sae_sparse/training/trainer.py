"""``train_adapter``: attach trainable edits (or a baseline) to a frozen causal LM, train,
evaluate, checkpoint and save.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import warnings

import torch

from ..hooks import attach, ResidualLoRA
from ..models import input_device
from ..modules import LatentAdapter
from ..ops import cached_folds
from .adapters import architecture, latent_mask_of, save_adapter
from .config import parse_edit, TrainConfig
from .data import collate, load_jsonl, Schedule, tokenize, warmup_lr
from .losses import autocast, batch_loss, l1_penalty, teacher_targets
from .parallel import all_reduce, barrier, rank_world, share, sync_grads
from .run_dir import (check_run_dir, clear_run, load_trainable_state, model_summary,
                      run_fingerprint, save_checkpoint, TrainingInterrupted)

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
                                      latent_mask=latent_mask_of(cfg.latents, sae.d_sae, hook))
    return out


def _attach_trainables(model, saes, trainables, cfg):
    spec = {h: (t if isinstance(t, ResidualLoRA) else (saes[h], t)) for h, t in trainables.items()}
    return attach(model, spec, mode=cfg.mode, backend=cfg.backend, dense=cfg.baseline == "dense",
                  skip_first=cfg.skip_first)


def _edit_mask(cfg, attn, prompt):
    if cfg.edit_positions == "all":
        return None
    return (prompt if cfg.edit_positions == "prompt" else ~prompt) & attn


def evaluate(model, data, cfg, edits, device, pad_id, group=None, teacher=None):
    """Mean loss (``cfg.loss``) per loss token over ``data``; under torch.distributed
    (``group``) each rank evaluates its share of the batches and the sums are all-reduced."""
    if not data:
        return float("nan")
    rank, world = (0, 1) if group is None else rank_world()[:2]
    tot = torch.zeros((), dtype=torch.float64, device=device)
    cnt = torch.zeros((), dtype=torch.float64, device=device)
    model_dtype_ctx = autocast(cfg, device)
    with torch.no_grad(), cached_folds():  # the adapters' M, c folded once per evaluation
        starts = list(range(0, len(data), cfg.batch_size))
        for i in starts[rank::world]:
            batch = data[i:i + cfg.batch_size]
            ids, attn, loss_mask, prompt = (t.to(device) for t in collate(batch, pad_id))
            t_logp = teacher_targets(cfg, model, teacher, edits, batch, pad_id, device)
            ctx = (edits.token_mask(_edit_mask(cfg, attn, prompt)) if edits is not None
                   else contextlib.nullcontext())
            with ctx, model_dtype_ctx:
                loss = batch_loss(model, ids, attn, loss_mask, t_logp)
            n = loss_mask[:, 1:].sum()
            tot, cnt = tot + loss.detach().double() * n, cnt + n  # read back once, at the end
    both = all_reduce(torch.cat([tot.view(1), cnt.view(1)]), group)
    return float(both[0] / both[1].clamp_min(1))


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
        fingerprint["teacher"] = model_summary(teacher, None)
    ckpt = os.path.join(out_dir, "checkpoint")
    rank, world, group = rank_world()
    if world > 1 and cfg.batch_size < world:
        raise ValueError(f"batch_size ({cfg.batch_size}, the global batch) must be at least "
                         f"the number of processes ({world})")
    lead = rank == 0  # writes the run directory; every rank reads it
    state = check_run_dir(out_dir, cfg, fingerprint, resume=resume, overwrite=overwrite)
    barrier(group)  # every rank has read the checkpoint before rank 0 may clear it
    if lead:
        os.makedirs(out_dir, exist_ok=True)
        if overwrite or not resume:
            clear_run(out_dir, everything=overwrite)
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

        load_trainable_state(trainables, load_file(os.path.join(ckpt, "trainable.safetensors")))
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
        sched = Schedule(len(train_data), cfg.batch_size, cfg.grad_accum, cfg.seed)
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
            vals = all_reduce(torch.stack(flat), group).tolist()
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
                        batch = share(batch, rank, world)
                    ids, attn, loss_mask, prompt = (t.to(device) for t in collate(batch, pad_id))
                    t_logp = teacher_targets(cfg, model, teacher, edits, batch, pad_id, device)
                    with edits.token_mask(_edit_mask(cfg, attn, prompt)), \
                            edits.counting_overflow(attn), autocast(cfg, device):
                        loss = batch_loss(model, ids, attn, loss_mask, t_logp, denom)
                    (loss / cfg.grad_accum).backward()
                    total = total + loss.detach().float() / cfg.grad_accum  # on the device
                if world > 1:  # the ranks' Ctrl-C flags travel with the gradients
                    stop_dev = sync_grads(params, sigint.hit, group, device)
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
                    save_checkpoint(ckpt, trainables, opt, history, step + 1, cfg, fingerprint)
                if stop and not last:
                    barrier(group)  # the checkpoint is written before any rank exits
                    bar.close()
                    raise TrainingInterrupted(step + 1, ckpt)
    finally:
        edits.remove()

    overflow = {}
    for h, (t, o) in counts.items():
        sae = saes[h] if h in saes else None
        if sae is None or isinstance(trainables[h], ResidualLoRA):
            continue
        arch = architecture(sae)
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
        save_checkpoint(ckpt, trainables, opt, history, cfg.steps, cfg, fingerprint)
    barrier(group)  # the run directory is complete when any rank returns
    return metrics


def _hook_device(model, hook, default):
    from ..hookpoints import resolve_hook

    mod = model.get_submodule(resolve_hook(model, hook))
    p = next(mod.parameters(), None)
    return p.device if p is not None else default
