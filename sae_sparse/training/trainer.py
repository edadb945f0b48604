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

from ..baselines import ResidualLoRA
from ..hooks import attach
from ..models import input_device
from ..sinks import SINK_RATIO
from ..modules import LatentAdapter
from ..ops import cached_folds
from .adapters import architecture, latent_mask_of, save_adapter
from .config import parse_edit, TrainConfig
from .data import check_teacher_prompts, collate, load_jsonl, Schedule, tokenize, warmup_lr
from .peft_model import NAME, PeftEdits, PeftTrainable, is_peft_model
from .losses import autocast, batch_loss, l1_penalty, shrink_latents, teacher_targets
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
            if cfg.l1_group > 0 and out[hook].W_in is not None:
                with torch.no_grad():  # every latent's group starts near zero, not at the
                    out[hook].W_in.mul_(L1_GROUP_W_IN)  # ~1 of its random W_in row
    return out


L1_GROUP_W_IN = 0.01  # W_in's initial scale under --l1-group (its usual one: 1)


def _attach_trainables(model, saes, trainables, cfg, skip_first):
    spec = {h: (t if isinstance(t, ResidualLoRA) else (saes[h], t)) for h, t in trainables.items()}
    return attach(model, spec, mode=cfg.mode, backend=cfg.backend, dense=cfg.baseline == "dense",
                  skip_first=skip_first)


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
    return Trainer(model, tokenizer, saes, data, out_dir, config, sae_sources=sae_sources,
                   model_source=model_source, progress=progress, resume=resume,
                   overwrite=overwrite, log=log, teacher=teacher).fit()


class Trainer:
    """One run of :func:`train_adapter`. ``fit`` reads as its table of contents: check the
    inputs, prepare the run directory, split and tokenize the data, build the adapters and
    optimizer, restore a checkpoint, then per step: train, read back, evaluate, checkpoint;
    finally the overflow report, the adapter and the metrics."""

    def __init__(self, model, tokenizer, saes, data, out_dir, config=None, *,
                 sae_sources=None, model_source=None, progress=True, resume=True,
                 overwrite=False, log=print, teacher=None):
        self.model, self.tokenizer, self.saes, self.teacher = model, tokenizer, saes, teacher
        self.data, self.out_dir, self.ckpt = data, out_dir, os.path.join(out_dir, "checkpoint")
        self.cfg = config or TrainConfig()
        self.sae_sources, self.model_source = sae_sources, model_source
        self.progress, self.resume, self.overwrite = progress, resume, overwrite
        self.say = log or (lambda *a, **k: None)
        self.device = input_device(model)
        self.peft = not saes and is_peft_model(model)  # PEFT's own adapter, same loop
        if not saes and not self.peft:
            raise ValueError("saes is empty: give {hook: SAE} (or a PEFT model to train "
                             "PEFT's adapter in the same loop)")
        self.rank, self.world, self.group = rank_world()
        self.lead = self.rank == 0  # writes the run directory; every rank reads it

    def fit(self) -> dict:
        self.cfg.validate()
        records = self._check_inputs()
        state = self._prepare_run_dir()
        self._split_data(records)
        self._build()
        self.skip_first = self._resolve_skip_first()
        self._restore(state)
        self.edits = (PeftEdits(self.model) if self.peft else _attach_trainables(
            self.model, self.saes, self.trainables, self.cfg, self.skip_first))
        self.counts = {h: self.history["overflow"].get(h, [0, 0]) for h in self.trainables}
        self.history["overflow"] = self.counts
        try:
            self._evaluate_unedited()
            self._loop()
        finally:
            self.edits.remove()
        return self._finish()

    # -- before the loop ---------------------------------------------------------------------

    def _check_inputs(self):
        cfg, teacher = self.cfg, self.teacher
        records = load_jsonl(self.data) if isinstance(self.data, str) else list(self.data)
        if cfg.loss == "kl" and teacher is None:
            check_teacher_prompts(records, self.data if isinstance(self.data, str)
                                  else "the data")
        if self.peft and (cfg.edit_positions != "all" or cfg.skip_first not in (0, "auto")):
            raise ValueError("a PEFT model is trained on every position: edit_positions "
                             "must be 'all' and skip_first 0 or 'auto'")
        if teacher is not None and cfg.loss != "kl":
            raise ValueError("a teacher model is only used with loss='kl'")
        if self.world > 1 and cfg.batch_size < self.world:
            raise ValueError(f"batch_size ({cfg.batch_size}, the global batch) must be at "
                             f"least the number of processes ({self.world})")
        return records

    def _prepare_run_dir(self):
        """The run's fingerprint and the resume decision (the checkpoint's state or None);
        rank 0 clears what the decision discards."""
        self.fingerprint = run_fingerprint(self.model, self.saes, self.data,
                                           sae_sources=self.sae_sources,
                                           model_source=self.model_source)
        if self.teacher is not None:
            self.fingerprint["teacher"] = model_summary(self.teacher, None)
        state = check_run_dir(self.out_dir, self.cfg, self.fingerprint, resume=self.resume,
                              overwrite=self.overwrite)
        barrier(self.group)  # every rank has read the checkpoint before rank 0 may clear it
        if self.lead:
            os.makedirs(self.out_dir, exist_ok=True)
            if self.overwrite or not self.resume:
                clear_run(self.out_dir, everything=self.overwrite)
        return state

    def _split_data(self, records):
        """A seeded eval split; both halves written (eval.jsonl, train.jsonl) and tokenized."""
        cfg = self.cfg
        order = list(range(len(records)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = cfg.eval_count(len(records))
        eval_recs = [records[i] for i in order[:n_eval]]
        train_recs = [records[i] for i in order[n_eval:]]
        if self.lead:  # the report reads both (contexts, lift, readouts)
            for name, part in (("eval.jsonl", eval_recs), ("train.jsonl", train_recs)):
                with open(os.path.join(self.out_dir, name), "w") as f:
                    for r in part:
                        f.write(json.dumps(r) + "\n")
        self.train_records = train_recs
        kl = cfg.loss == "kl"
        self.train_data = tokenize(train_recs, self.tokenizer, cfg.max_len, teacher=kl)
        self.eval_data = (tokenize(eval_recs, self.tokenizer, cfg.max_len, teacher=kl)
                          if eval_recs else [])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    def _build(self):
        """Frozen model, teacher and SAEs; the adapters where their hooks run (a model spread
        over devices: each SAE and adapter on its hook's device); AdamW; an empty history."""
        peft_params = PeftTrainable(self.model) if self.peft else None  # before freezing
        self.model.requires_grad_(False).eval()
        if self.teacher is not None:
            self.teacher.requires_grad_(False).eval()
        for sae in self.saes.values():
            sae.requires_grad_(False)
        hook_dev = {h: _hook_device(self.model, h, self.device) for h in self.saes}
        for h, sae in self.saes.items():
            sae.to(hook_dev[h])
        if self.peft:  # its own trainable parameters, frozen above with the rest
            peft_params.requires_grad_()
            self.trainables = {NAME: peft_params}
        else:
            self.trainables = build_trainables(self.saes, self.cfg, hook_dev)
        self.params = [p for t in self.trainables.values() for p in t.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr,
                                     weight_decay=self.cfg.weight_decay)
        self.history = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": [],
                        "overflow": {}}
        self.start = 0

    def _resolve_skip_first(self) -> int:
        """``skip_first``, with ``"auto"`` found on the training records (the most sink
        positions over the hooks; the same on a resumed run, which reads the same data)."""
        if self.cfg.skip_first != "auto" or self.peft:
            return 0 if self.cfg.skip_first == "auto" else self.cfg.skip_first
        from ..sinks import sink_positions

        found = {h: sink_positions(self.model, self.tokenizer, self.train_records, h)
                 for h in self.trainables}
        n = max(n for n, _ in found.values())
        ratio = max(r for _, r in found.values())
        self.say(f"skip_first auto: {n} (the leading positions whose residual norm is over "
                 f"{SINK_RATIO:g}x the median; the largest ratio seen {ratio:.0f}x)")
        return n

    def _restore(self, state):
        if state is not None:
            from ..io import load_safetensors

            weights = load_safetensors(os.path.join(self.ckpt, "trainable.safetensors"))
            load_trainable_state(self.trainables, weights)
            self.opt.load_state_dict(state["optimizer"])
            self.history, self.start = state["history"], state["step"]
            self.history.setdefault("overflow", {})
            if self.lead:
                self.say(f"resuming from step {self.start} of {self.cfg.steps} ({self.ckpt})")
        if not self.lead:
            self.say, self.progress = (lambda *a, **k: None), False

    def _evaluate(self, edits):
        return evaluate(self.model, self.eval_data, self.cfg, edits, self.device, self.pad_id,
                        self.group, self.teacher)

    def _evaluate_unedited(self):
        with self.edits.disabled():
            self.base_eval = self._evaluate(None)
        if self.eval_data and self.start == 0:
            self.say(f"step 0/{self.cfg.steps}: eval loss {self.base_eval:.4f} (unedited model)")

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self):
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.sched = Schedule(len(self.train_data), cfg.batch_size, cfg.grad_accum, cfg.seed)
        self.bar = tqdm(range(self.start, cfg.steps), initial=self.start, total=cfg.steps,
                        disable=not self.progress, desc="train", dynamic_ncols=True)
        self.pending = []  # (step, loss on the device) not yet read back
        self.agreed_stop = False  # several processes: a Ctrl-C on any rank, as last read back
        self.stop_dev = None
        with _SigintGuard() as sigint:
            for step in self.bar:
                self._train_step(step, sigint)
                self._after_step(step + 1, sigint)

    def _train_step(self, step, sigint):
        """The micro-batches' forward and backward, the ranks' gradients summed, the L1
        penalty, the warmed-up rate and the optimizer step; the loss stays on the device."""
        cfg, device = self.cfg, self.device
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = [self.train_data[i] for i in self.sched.batch(step, micro)]
            denom = None
            if self.world > 1:  # this rank's share; the mean over the global batch
                denom = float(max(1, sum(int(e.loss_mask[1:].sum()) for e in batch)))
                batch = share(batch, self.rank, self.world)
            ids, attn, loss_mask, prompt = (t.to(device) for t in collate(batch, self.pad_id))
            t_logp = teacher_targets(cfg, self.model, self.teacher, self.edits, batch,
                                     self.pad_id, device)
            with self.edits.token_mask(_edit_mask(cfg, attn, prompt)), \
                    self.edits.counting_overflow(attn), autocast(cfg, device):
                loss = batch_loss(self.model, ids, attn, loss_mask, t_logp, denom)
            (loss / cfg.grad_accum).backward()
            total = total + loss.detach().float() / cfg.grad_accum  # on the device
        if self.world > 1:  # the ranks' Ctrl-C flags travel with the gradients
            self.stop_dev = sync_grads(self.params, sigint.hit, self.group, device)
        pen = [l1_penalty(self.trainables[h], self.saes.get(h)) for h in self.trainables]
        pen = [p for p in pen if p is not None]
        if pen and cfg.l1 > 0:
            (cfg.l1 * sum(pen)).backward()
        lr = warmup_lr(cfg.lr, cfg.warmup(), step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        if cfg.l1_group > 0:  # decoupled group shrinkage: whole latents to exactly zero
            for h, t in self.trainables.items():
                shrink_latents(t, self.saes.get(h), lr * cfg.l1_group)
        self.pending.append((step + 1, total))

    def _after_step(self, done, sigint):
        """After ``done`` steps: read back, evaluate, checkpoint and stop, when due. One
        process stops after the step Ctrl-C came in; several agree on it when the losses
        are read back (every log_every steps), then stop together."""
        cfg, history = self.cfg, self.history
        last = done == cfg.steps
        evals = self.eval_data and (done % cfg.eval_every == 0 or last)
        saves = done % cfg.checkpoint_every == 0 and not last
        local_stop = self.world == 1 and sigint.hit
        if done % cfg.log_every == 0 or last or evals or saves or local_stop:
            self._read_back()
        stop = local_stop or (self.world > 1 and self.agreed_stop)
        if evals:
            history["eval_step"].append(done)
            history["eval_loss"].append(self._evaluate(self.edits))
            self._note(f"step {done}/{cfg.steps}: train loss {history['train_loss'][-1]:.4f}, "
                       f"eval loss {history['eval_loss'][-1]:.4f}")
        if self.lead and (saves or (stop and not last)):
            save_checkpoint(self.ckpt, self.trainables, self.opt, history, done, cfg,
                            self.fingerprint)
        if stop and not last:
            barrier(self.group)  # the checkpoint is written before any rank exits
            self.bar.close()
            raise TrainingInterrupted(done, self.ckpt)

    def _read_back(self):
        """The pending losses and the overflow counts read back in one host sync (and,
        under torch.distributed, the ranks' shares summed); a non-finite loss stops the run
        (NaN in the data, the model or the SAE)."""
        pending = self.pending
        if not pending:
            return
        tallies = self.edits.overflow  # {hook: [tokens, overflowing tokens]} on the device
        self.edits.overflow = {}
        hooks = list(tallies)
        flat = [t.double() for _, t in pending] + [
            torch.as_tensor(c).to(self.device).double() for h in hooks for c in tallies[h]]
        if self.world > 1:
            flat.append(self.stop_dev.double())
        vals = all_reduce(torch.stack(flat), self.group).tolist()
        if self.world > 1:
            self.agreed_stop = vals.pop() > 0
        for i, h in enumerate(hooks):
            t, o = vals[len(pending) + 2 * i:len(pending) + 2 * i + 2]
            self.counts[h] = [self.counts[h][0] + int(t), self.counts[h][1] + int(o)]
        vals = vals[:len(pending)]
        for (s, _), v in zip(pending, vals):
            if not math.isfinite(v):
                raise FloatingPointError(
                    f"the training loss is {v} at step {s}: check the SAE's weights, the "
                    "model's activations at the hook and the learning rate")
            self.history["step"].append(s)
            self.history["train_loss"].append(v)
        pending.clear()
        self.bar.set_postfix(loss=f"{vals[-1]:.4f}", refresh=False)

    def _note(self, msg):
        if self.progress:
            self.bar.write(msg)
        else:
            self.say(msg)

    # -- after the loop ----------------------------------------------------------------------

    def _overflow_report(self):
        """Per SAE hook: tokens, tokens with more than k active latents, their rate (a warning
        above 1% for a ReLU/JumpReLU SAE, whose cap then dropped latents)."""
        out = {}
        for h, (t, o) in self.counts.items():
            sae = self.saes.get(h)
            if sae is None or isinstance(self.trainables[h], ResidualLoRA):
                continue
            arch = architecture(sae)
            out[h] = {"tokens": t, "overflow_tokens": o, "rate": o / t if t else 0.0,
                      "k": sae.k, "architecture": arch}
            if self.lead and arch != "topk" and t and o / t > 0.01:
                warnings.warn(f"{100 * o / t:.1f}% of the edited tokens at {h} had more than "
                              f"k={sae.k} active latents (the cap dropped the rest): raise --k",
                              stacklevel=5)  # the caller of train_adapter
        return out

    def _warnings(self) -> list:
        """What the run's numbers say went wrong: an edit that ends worse than none."""
        out, ev = [], self.history["eval_loss"]
        if self.eval_data and ev and ev[-1] > self.base_eval:
            out.append(f"the edited model's eval loss ({ev[-1]:.4f}) ended above the unedited "
                       f"model's ({self.base_eval:.4f}): the edit is worse than none; try a "
                       "lower --lr, more --warmup-steps or more --steps")
        return out

    def _finish(self):
        cfg, history = self.cfg, self.history
        metrics = {"loss": cfg.loss,
                   "base_eval_loss": self.base_eval if self.eval_data else None,
                   "final_eval_loss": history["eval_loss"][-1] if history["eval_loss"] else None,
                   "final_train_loss": (history["train_loss"][-1] if history["train_loss"]
                                        else None),
                   "n_train": len(self.train_data), "n_eval": len(self.eval_data),
                   "overflow": self._overflow_report(), "world_size": self.world,
                   "skip_first": self.skip_first, "warmup_steps": cfg.warmup(),
                   "warnings": self._warnings(), "history": history}
        if self.lead:
            for w in metrics["warnings"]:
                warnings.warn(w, stacklevel=4)  # the caller of train_adapter
            if self.peft:
                self.model.save_pretrained(self.out_dir)
            else:
                save_adapter(self.out_dir, self.trainables, self.saes, cfg,
                             sae_sources=self.sae_sources, model_source=self.model_source,
                             skip_first=self.skip_first)
            with open(os.path.join(self.out_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
            save_checkpoint(self.ckpt, self.trainables, self.opt, history, cfg.steps, cfg,
                            self.fingerprint)
        barrier(self.group)  # the run directory is complete when any rank returns
        return metrics


def _hook_device(model, hook, default):
    from ..hookpoints import resolve_hook

    mod = model.get_submodule(resolve_hook(model, hook))
    p = next(mod.parameters(), None)
    return p.device if p is not None else default
