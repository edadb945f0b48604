"""Training a TopK SAE on a model's activations at a hook, on this package's own ops
(``sae-sparse train-sae``).

    sae, metrics = train_sae(model, tokenizer, "model.layers.15", records, "saes/l15",
                             SAETrainConfig(d_sae=4608, k=32, tokens=2_000_000))

* The step is :meth:`SAE.forward` (one fused op: top-k encode, decode, a backward that groups
  the (token, slot) pairs by latent) with loss ``FVU + auxk_alpha · AuxK``, AuxK (OpenAI's
  top-k paper, App. B.1; sparsify's defaults: the dead latents' top ``k_aux = D // 2``
  reconstruct the residual) as dense GEMMs over the dead latents (:func:`auxk_decode`).
* Decoder rows are kept at unit norm as sparsify and OpenAI do: the gradient component
  parallel to each row is removed before the Adam step and the rows are renormalised after.
  ``b_pre`` is tied to ``b_dec`` (the encoder reads ``x − b_dec``), initialised to the mean of
  the first batch; ``W_enc`` starts as ``W_dec``.
* Activations are streamed: records are tokenised into ``max_len`` windows, the model runs up
  to the hooked module only (the forward is stopped there), the first ``skip_first``
  positions of each window (the attention sink, whose norm is ~100x the others') are
  dropped, and the activations fill a
  shuffled buffer of ``buffer_tokens`` rows from which batches are drawn, so memory stays
  bounded whatever the number of training tokens.
* A latent is dead after ``dead_tokens`` tokens without firing. Held-out records give the
  FVU, L0 and dead fraction; tqdm shows progress; a checkpoint at each buffer refill makes a
  rerun resume exactly; the result is saved in SAELens format with the hook recorded.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import warnings

import torch

from .argtypes import auto_nonneg_int, fraction, nonneg_float, option, positive, positive_float
from .hookpoints import forward_to, resolve_hook
from .io import save_saelens
from .modules import SAE
from .ops import auxk_decode
from .sinks import SINK_RATIO

CKPT = "checkpoint.pt"


@dataclasses.dataclass
class SAETrainConfig:
    """How ``train_sae`` trains; each field's ``help`` is its ``sae-sparse train-sae`` flag's."""

    d_sae: int = option(4096, "latents", type=positive)
    k: int = option(32, "active latents per token", type=positive)
    tokens: int = option(1_000_000, "training tokens", type=positive)
    batch_tokens: int = option(4096, "tokens per step", type=positive)
    lr: float | None = option(None, "Adam learning rate [default: sparsify's "
                              "2e-4 / sqrt(d_sae / 2^14)]", type=positive_float)
    auxk_alpha: float = option(1 / 32, "AuxK weight", type=nonneg_float)
    dead_tokens: int = option(200_000, "a latent is dead after this many tokens without "
                              "firing", type=positive)
    buffer_tokens: int = option(65536, "activations held and shuffled at a time",
                                type=positive)
    max_len: int = option(128, "tokens per window", type=positive)
    model_batch: int = option(16, "windows per model forward", type=positive)
    skip_first: int | str = option(
        "auto", "positions dropped at the start of each window. auto: the leading positions "
        "whose residual norm is an outlier on the data (sinks.sink_positions): a causal "
        "LM's attention sink, whose norm is ~100x the others' (SmolLM2: ~22000 vs ~180), "
        "would dominate the variance (FVU) and the SAE's capacity (sparsify excludes BOS "
        "too)", type=auto_nonneg_int, metavar="N|auto")
    eval_frac: float = option(0.05, "fraction of the records held out", type=fraction)
    seed: int = option(0, "seed", type=int)
    log_every: int = option(20, "log (and read the loss back) every N steps", type=positive)

    def validate(self):
        if self.skip_first != "auto" and (not isinstance(self.skip_first, int)
                                          or self.skip_first < 0):
            raise ValueError(f"skip_first must be an int >= 0 or 'auto', got "
                             f"{self.skip_first!r}")
        for n in ("d_sae", "k", "tokens", "batch_tokens", "dead_tokens", "buffer_tokens",
                  "max_len", "model_batch", "log_every"):
            if getattr(self, n) < 1:
                raise ValueError(f"{n} must be >= 1, got {getattr(self, n)}")
        if self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) must be at most d_sae ({self.d_sae})")
        if self.buffer_tokens < self.batch_tokens:
            raise ValueError("buffer_tokens must be at least batch_tokens")
        if not 0 <= self.eval_frac < 1:
            raise ValueError("eval_frac must be in [0, 1)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 2 ** 14)


class ActivationStream:
    """Activations of ``module`` for ``records`` (``{"text"}`` or prompt + completion), in
    ``max_len``-token windows, the model run only up to the hook; ``chunks()`` yields
    [tokens, D] fp32 tensors, one model batch at a time, starting at record ``start``."""

    def __init__(self, model, tokenizer, hook, records, *, max_len, model_batch, device=None,
                 skip_first: int = 0):
        self.model, self.tok, self.records = model, tokenizer, records
        self.skip_first = skip_first
        self.path = resolve_hook(model, hook)
        self.max_len, self.model_batch = max_len, model_batch
        self.device = device or next(model.parameters()).device

    def _windows(self, n):
        r = self.records[n]
        text = r["text"] if "text" in r else r["prompt"] + r["completion"]
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return [ids[s:s + self.max_len] for s in range(0, len(ids), self.max_len)
                if len(ids[s:s + self.max_len]) >= 2 + self.skip_first]

    def n_tokens(self) -> int:
        """The activations one pass over the records yields (tokenizing only)."""
        return sum(len(w) - self.skip_first for n in range(len(self.records))
                   for w in self._windows(n))

    @torch.no_grad()
    def chunks(self, start=0):
        """-> (records used so far, activations [tokens, D]), a model batch (of at least
        ``model_batch`` windows, whole records) at a time, from record ``start`` on."""
        batch = []
        for n in range(start, len(self.records)):
            batch += self._windows(n)
            if len(batch) >= self.model_batch:
                yield n + 1, self._run(batch)
                batch = []
        if batch:
            yield len(self.records), self._run(batch)

    def _run(self, batch):
        T = max(len(w) for w in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, w in enumerate(batch):
            ids[b, :len(w)] = torch.tensor(w)
            mask[b, :len(w)] = True
        keep = mask.clone()
        keep[:, :self.skip_first] = False
        h = forward_to(self.model, self.path, ids.to(self.device), mask.to(self.device))
        return h[keep.to(h.device)].float()


def _init_sae(D, cfg, first, device):
    g = torch.Generator().manual_seed(cfg.seed)
    W = torch.randn(cfg.d_sae, D, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    b_dec = first.mean(0).cpu()
    sae = SAE(W.clone(), torch.zeros(cfg.d_sae), W, b_dec, cfg.k, b_pre=b_dec)
    return sae.to(device)


@torch.no_grad()
def _unit_decoder(sae):
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def _remove_parallel_grad(sae):
    W, g = sae.W_dec, sae.W_dec.grad
    if g is not None:
        g.sub_((g * W).sum(1, keepdim=True) * W)


@torch.no_grad()
def evaluate_sae(sae, stream, *, max_tokens=65536):
    """Held-out FVU (1 − explained variance, over all tokens), L0 (mean active latents per
    token) and the fraction of latents that never fired on these tokens."""
    err = var = l0 = 0.0
    n = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_dec.device)
    acts = []
    for _, a in stream.chunks():
        acts.append(a)
        n += a.shape[0]
        if n >= max_tokens:
            break
    if not acts:
        return {"fvu": float("nan"), "l0": float("nan"), "dead_frac": float("nan"), "tokens": 0}
    x = torch.cat(acts)[:max_tokens].to(sae.W_dec.device)
    mean = x.mean(0)
    for s in range(0, x.shape[0], 4096):
        xb = x[s:s + 4096]
        y, v, i = sae(xb, return_code=True)
        err += float((y - xb).pow(2).sum())
        var += float((xb - mean).pow(2).sum())
        l0 += float((v > 0).sum())
        fired[i[v > 0]] = True
    return {"fvu": err / var, "l0": l0 / x.shape[0],
            "dead_frac": 1 - float(fired.float().mean()), "tokens": int(x.shape[0])}


def train_sae(model, tokenizer, hook: str, records, out_dir: str,
              config: SAETrainConfig | None = None, *, progress=True, log=print,
              model_name: str | None = None, backend=None):
    """Trains a TopK SAE on ``model``'s activations at ``hook`` (see the module docstring);
    saves it in SAELens format to ``out_dir`` and returns ``(sae, metrics)``. Rerunning with
    the same arguments resumes from ``out_dir/checkpoint.pt``; Ctrl-C raises
    :class:`~sae_sparse.training.TrainingInterrupted` naming the checkpoint it resumes from."""
    return SAETrainer(model, tokenizer, hook, records, out_dir, config, progress=progress,
                      log=log, model_name=model_name, backend=backend).fit()


class SAETrainer:
    """One run of :func:`train_sae`. ``fit`` reads as its table of contents: split the
    records, resolve the sink, restore a checkpoint, then per buffer: fill it, train on it,
    checkpoint; finally evaluate and save."""

    def __init__(self, model, tokenizer, hook, records, out_dir, config=None, *,
                 progress=True, log=print, model_name=None, backend=None):
        self.model, self.tok, self.hook, self.out_dir = model, tokenizer, hook, out_dir
        self.records = list(records)
        self.cfg = config or SAETrainConfig()
        self.progress, self.model_name, self.backend = progress, model_name, backend
        self.say = log or (lambda *a, **k: None)
        self.ckpt = os.path.join(out_dir, CKPT)
        self.device = next(model.parameters()).device

    def fit(self):
        from tqdm.auto import tqdm

        from .training.run_dir import TrainingInterrupted

        self.cfg.validate()
        self.model.requires_grad_(False).eval()
        self._split()
        self.skip_first = self._resolve_skip_first()
        self.stream = self._stream(self.train_recs)
        self._check_passes()
        os.makedirs(self.out_dir, exist_ok=True)
        self._restore()
        self.bar = tqdm(total=self.cfg.tokens, initial=self.seen, disable=not self.progress,
                        desc="train-sae", unit="tok", unit_scale=True, dynamic_ncols=True)
        try:
            while self.seen < self.cfg.tokens:
                self._train_on(self._fill_buffer())
                self.refill += 1
                self._save_ckpt()
        except KeyboardInterrupt:
            self.bar.close()
            if not os.path.exists(self.ckpt):  # before the first buffer was trained
                raise
            raise TrainingInterrupted(self.ckpt_steps, self.ckpt) from None
        self.bar.close()
        return self._finish()

    # -- before the loop ---------------------------------------------------------------------

    def _split(self):
        order = list(range(len(self.records)))
        random.Random(self.cfg.seed).shuffle(order)
        n_eval = int(round(self.cfg.eval_frac * len(self.records)))
        self.eval_recs = [self.records[i] for i in order[:n_eval]]
        self.train_recs = [self.records[i] for i in order[n_eval:]]

    def _resolve_skip_first(self) -> int:
        if self.cfg.skip_first != "auto":
            return self.cfg.skip_first
        from .sinks import sink_positions

        n, ratio = sink_positions(self.model, self.tok, self.train_recs, self.hook)
        self.say(f"skip_first auto: {n} (the leading positions whose residual norm is over "
                 f"{SINK_RATIO:g}x the median; the largest ratio seen {ratio:.0f}x)")
        return n

    def _stream(self, records):
        return ActivationStream(self.model, self.tok, self.hook, records,
                                max_len=self.cfg.max_len, model_batch=self.cfg.model_batch,
                                skip_first=self.skip_first)

    def _check_passes(self):
        """A warning when ``tokens`` asks for more than one pass over the training text."""
        have = self.stream.n_tokens()
        if not have:
            raise ValueError("the records hold no tokens (each window needs "
                             f"{2 + self.skip_first} or more)")
        if self.cfg.tokens > have:
            warnings.warn(f"tokens={self.cfg.tokens} is {self.cfg.tokens / have:.1f} passes "
                          f"over the {have} training tokens of the records (after the "
                          "held-out split); the SAE sees each activation that many times",
                          stacklevel=4)
        self.data_tokens = have

    def _restore(self):
        cfg, state = self.cfg, None
        if os.path.exists(self.ckpt):
            state = torch.load(self.ckpt, weights_only=True)
            if state["config"] != dataclasses.asdict(cfg) | {"tokens": state["config"]["tokens"]}:
                raise ValueError(f"{self.out_dir} holds an SAE run with other settings; use "
                                 "another directory")
        self.sae = self.opt = self.since_fired = None
        self.seen = self.steps = self.rec_pos = self.refill = 0
        self.history = {"step": [], "fvu": [], "dead_frac": []}
        self.state = state
        if state is not None:
            t = state["sae"]
            self.sae = SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], cfg.k,
                           b_pre=t["b_dec"]).to(self.device)
            self.seen, self.steps, self.rec_pos, self.refill = (
                state[n] for n in ("seen", "steps", "rec_pos", "refill"))
            self.since_fired = state["since_fired"].to(self.device)
            self.history = state["history"]
            self.say(f"resuming SAE training at {self.seen} of {cfg.tokens} tokens "
                     f"({self.ckpt})")
        self.ckpt_steps = self.steps
        self.chunks = self.stream.chunks(self.rec_pos)

    # -- the loop ----------------------------------------------------------------------------

    def _fill_buffer(self):
        """The next buffer of activations, shuffled, on the device: ``buffer_tokens`` of them
        (fewer when fewer are left to train), from record ``rec_pos`` on, wrapping around.
        The bar shows the filling."""
        cfg = self.cfg
        want = min(cfg.buffer_tokens, max(cfg.batch_tokens, cfg.tokens - self.seen))
        buf, got = [], 0
        while got < want:
            nxt = next(self.chunks, None)
            if nxt is None:  # a pass over the records ends: start another
                self.rec_pos = 0
                self.chunks = self.stream.chunks(0)
                continue
            self.rec_pos, a = nxt
            buf.append(a)
            got += a.shape[0]
            self.bar.set_postfix_str(f"filling the buffer {min(got, want)}/{want}")
        acts = torch.cat(buf)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.refill)
        acts = acts[torch.randperm(acts.shape[0], generator=g)].to(self.device)
        if self.sae is None:
            self.sae = _init_sae(acts.shape[1], cfg, acts[:cfg.batch_tokens], self.device)
            self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        if self.opt is None:
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate)
            if self.state is not None:
                self.opt.load_state_dict(self.state["optimizer"])
        return acts

    def _train_on(self, acts):
        cfg = self.cfg
        for s in range(0, acts.shape[0] - cfg.batch_tokens + 1, cfg.batch_tokens):
            if self.seen >= cfg.tokens:
                break
            x = acts[s:s + cfg.batch_tokens]
            fvu, dead = self._step(x)
            self.seen += x.shape[0]
            self.steps += 1
            self.bar.update(x.shape[0])
            if self.steps % cfg.log_every == 0:
                f, d = float(fvu.detach()), float(dead.float().mean())
                self.history["step"].append(self.steps)
                self.history["fvu"].append(f)
                self.history["dead_frac"].append(d)
                self.bar.set_postfix(fvu=f"{f:.3f}", dead=f"{d:.1%}", refresh=False)

    def _step(self, x):
        """One Adam step on FVU + AuxK, the decoder kept at unit norm; the dead latents
        counted. -> (FVU, the dead mask before the step), on the device."""
        cfg, sae, backend = self.cfg, self.sae, self.backend
        y, v, i = sae(x, return_code=True, backend=backend)
        total_var = (x - x.mean(0)).pow(2).sum()
        fvu = (y - x).pow(2).sum() / total_var
        dead = self.since_fired > cfg.dead_tokens
        loss = fvu
        n_dead = int(dead.sum())
        if n_dead and cfg.auxk_alpha > 0:
            k_aux = x.shape[1] // 2
            e_hat = auxk_decode(x, sae.W_enc, sae.b_enc, sae.W_dec, dead, k_aux,
                                b_pre=sae.b_pre, backend=backend)
            scale = min(n_dead / k_aux, 1.0)
            aux = scale * (e_hat - (x - y).detach()).pow(2).sum() / total_var
            loss = loss + cfg.auxk_alpha * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        _remove_parallel_grad(sae)
        self.opt.step()
        _unit_decoder(sae)
        with torch.no_grad():
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=self.device)
            fired[i[v > 0]] = True
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
        return fvu, dead

    def _save_ckpt(self):
        tmp = self.ckpt + ".tmp"
        torch.save({"sae": {n: getattr(self.sae, n).detach().cpu() for n in
                            ("W_enc", "b_enc", "W_dec", "b_dec")},
                    "optimizer": self.opt.state_dict(), "config": dataclasses.asdict(self.cfg),
                    "seen": self.seen, "steps": self.steps, "rec_pos": self.rec_pos,
                    "refill": self.refill, "since_fired": self.since_fired.cpu(),
                    "history": self.history}, tmp)
        os.replace(tmp, self.ckpt)
        self.ckpt_steps = self.steps

    # -- after the loop ----------------------------------------------------------------------

    def _finish(self):
        cfg, sae, hook = self.cfg, self.sae, self.hook
        ev = evaluate_sae(sae, self._stream(self.eval_recs))
        metrics = {"held_out": ev, "train_tokens": self.seen, "steps": self.steps,
                   "hook": hook, "module": self.stream.path, "config": dataclasses.asdict(cfg),
                   "skip_first": self.skip_first, "data_tokens": self.data_tokens,
                   "history": self.history, "n_train_records": len(self.train_recs),
                   "n_eval_records": len(self.eval_recs)}
        save_saelens(sae, self.out_dir, hook_name=hook, model_name=self.model_name,
                     training_tokens=self.seen, held_out_fvu=ev["fvu"], held_out_l0=ev["l0"])
        with open(os.path.join(self.out_dir, "training_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        self.say(f"SAE at {hook}: held-out FVU {ev['fvu']:.4f}, L0 {ev['l0']:.1f}, "
                 f"{ev['dead_frac']:.1%} of latents never fired on {ev['tokens']} held-out "
                 f"tokens; saved in {self.out_dir}")
        return sae, metrics
