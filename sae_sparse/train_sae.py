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
  FVU, L0 and dead fraction; tqdm shows progress; a checkpoint at each buffer refill
  (``checkpoint/``: a manifest and a safetensors file per latent shard) makes a rerun resume
  exactly; the result is saved in SAELens format with the hook recorded.
* Under torchrun, ``shard_latents`` splits the dictionary over ranks and the other factor of
  the processes trains data-parallel (:mod:`sae_sparse.mesh`), to the one-process SAE.
* Memory: the fp32 weights W_enc and W_dec, their gradients and Adam's two moments (fused
  Adam: no temporaries of a parameter's size), so about ``32·S·D`` bytes (2^20 latents at
  D = 576: 18 GiB), plus the buffer and the model; checkpoints and the saved file are
  written from the tensors' own memory.
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
from .activations import ActivationStream
from .distributed import (ShardedSAE, save_saelens_sharded, shard_range, sharded_auxk_encode,
                          sharded_decode)
from .io import save_saelens
from .mesh import MANIFEST, SAEMesh, ShardReader, save_shards
from .modules import SAE
from .ops import auxk_decode
from .sinks import SINK_RATIO

__all__ = ["ActivationStream", "SAETrainConfig", "SAETrainer", "evaluate_sae", "train_sae"]

CKPT = "checkpoint"  # a directory: manifest.json and one safetensors file per latent shard


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


_INIT_BLOCK = 4096  # latents drawn per generator seed: the init does not depend on the mesh


def _init_rows(s0: int, s1: int, D: int, seed: int) -> torch.Tensor:
    """Rows [s0, s1) of the initial decoder (unit-norm Gaussian rows), the same whichever
    shard draws them: each block of ``_INIT_BLOCK`` latents has its own generator."""
    out = torch.empty(s1 - s0, D)
    B = _INIT_BLOCK
    for blk in range(s0 // B, -(-s1 // B)):
        g = torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 32) | blk)
        lo, hi = max(s0, blk * B), min(s1, (blk + 1) * B)
        W = torch.randn(B, D, generator=g)  # the whole block: its values do not depend on S
        out[lo - s0:hi - s0] = W[lo - blk * B:hi - blk * B]
    return out / out.norm(dim=1, keepdim=True)


@torch.no_grad()
def _unit_decoder(sae):
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


_ROWS = 1 << 16  # rows per chunk of the decoder-gradient projection (no [S, D] temporaries)


@torch.no_grad()
def _remove_parallel_grad(sae):
    W, g = sae.W_dec, sae.W_dec.grad
    if g is not None:
        for s in range(0, W.shape[0], _ROWS):
            w, gs = W[s:s + _ROWS], g[s:s + _ROWS]
            gs.addcmul_(torch.linalg.vecdot(gs, w)[:, None], w, value=-1)


@torch.no_grad()
def evaluate_sae(sae, stream, *, max_tokens=65536):
    """Held-out FVU (1 − explained variance, over all tokens), L0 (mean active latents per
    token) and the fraction of latents that never fired on these tokens."""
    acts, n = [], 0
    for _, a in stream.chunks():
        acts.append(a)
        n += a.shape[0]
        if n >= max_tokens:
            break
    x = torch.cat(acts)[:max_tokens] if acts else None
    return _evaluate(sae, x, SAEMesh())


@torch.no_grad()
def _evaluate(sae, x, mesh):
    """``evaluate_sae`` of the activations x [N, D] (every rank holds all N; each replica
    evaluates its rows, the sums are added over the replicas)."""
    if x is None or not x.shape[0]:
        return {"fvu": float("nan"), "l0": float("nan"), "dead_frac": float("nan"), "tokens": 0}
    x = x.to(sae.W_dec.device)
    var = float((x - x.mean(0)).pow(2).sum())
    sums = torch.zeros(2 + sae.d_sae, device=x.device)  # err, l0, fired per latent
    a, b = mesh.rows(x.shape[0])
    for s in range(a, b, 4096):
        xb = x[s:min(s + 4096, b)]
        y, v, i = sae(xb, return_code=True)
        sums[0] += (y - xb).pow(2).sum()
        sums[1] += (v > 0).sum()
        sums[2:][i[v > 0]] = 1
    mesh.sum_replicas(sums)
    return {"fvu": float(sums[0]) / var, "l0": float(sums[1]) / x.shape[0],
            "dead_frac": 1 - float((sums[2:] > 0).float().mean()), "tokens": int(x.shape[0])}


def train_sae(model, tokenizer, hook: str, records, out_dir: str,
              config: SAETrainConfig | None = None, *, progress=True, log=print,
              model_name: str | None = None, backend=None, shard_latents: int = 1):
    """Trains a TopK SAE on ``model``'s activations at ``hook`` (see the module docstring);
    saves it in SAELens format to ``out_dir`` and returns ``(sae, metrics)``. Rerunning with
    the same arguments resumes from ``out_dir/checkpoint/``; Ctrl-C raises
    :class:`~sae_sparse.training.TrainingInterrupted` naming the checkpoint it resumes from.

    Under torch.distributed (torchrun, P processes) every rank calls it with the same
    arguments: the dictionary is split over ``shard_latents`` ranks (L) and the P / L
    replicas of it train on disjoint rows of each batch (:mod:`sae_sparse.mesh`). The SAE,
    the losses and the checkpoints are the one-process run's (to fp32 rounding), for any
    mesh; a checkpoint resumes on another mesh too. ``sae`` is then this rank's
    :class:`~sae_sparse.distributed.ShardedSAE` (L > 1) or the whole SAE (L = 1); rank 0
    logs and writes the shared files; the SAELens file is written from the shards."""
    return SAETrainer(model, tokenizer, hook, records, out_dir, config, progress=progress,
                      log=log, model_name=model_name, backend=backend,
                      shard_latents=shard_latents).fit()


class SAETrainer:
    """One run of :func:`train_sae`. ``fit`` reads as its table of contents: place this
    process in the mesh, split the records, resolve the sink, restore a checkpoint, then per
    buffer: fill it, train on it, checkpoint; finally evaluate and save."""

    def __init__(self, model, tokenizer, hook, records, out_dir, config=None, *,
                 progress=True, log=print, model_name=None, backend=None, shard_latents=1):
        self.model, self.tok, self.hook, self.out_dir = model, tokenizer, hook, out_dir
        self.records = list(records)
        self.cfg = config or SAETrainConfig()
        self.progress, self.model_name, self.backend = progress, model_name, backend
        self.shard_latents = shard_latents
        self.say = log or (lambda *a, **k: None)
        self.ckpt = os.path.join(out_dir, CKPT)
        self.device = next(model.parameters()).device

    def fit(self):
        from tqdm.auto import tqdm

        from .training.run_dir import TrainingInterrupted

        self.cfg.validate()
        self._place()
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
            if self.ckpt_steps is None:  # before the first buffer was trained
                raise
            raise TrainingInterrupted(self.ckpt_steps, self.ckpt) from None
        except RuntimeError as e:
            self.bar.close()
            if self.mesh.world == 1:
                raise
            raise self._lost_peer(e) from e
        self.bar.close()
        return self._finish()

    # -- before the loop ---------------------------------------------------------------------

    def _place(self):
        """This process's place in the (replica, shard) mesh; only rank 0 logs and shows
        progress."""
        self.mesh = mesh = SAEMesh(self.shard_latents, self.device)
        if self.cfg.d_sae < mesh.L:
            raise ValueError(f"d_sae ({self.cfg.d_sae}) must be at least shard_latents "
                             f"({mesh.L}): each shard holds one latent or more")
        if self.cfg.batch_tokens < mesh.R:
            raise ValueError(f"batch_tokens ({self.cfg.batch_tokens}) must be at least the "
                             f"number of data-parallel replicas ({mesh.R})")
        self.rows = shard_range(self.cfg.d_sae, mesh.shard, mesh.L)
        if not mesh.main:
            self.say, self.progress = (lambda *a, **k: None), False
        elif mesh.world > 1:
            self.say(f"train-sae on {mesh.world} processes: {mesh.R} data-parallel "
                     f"replica(s) x {mesh.L} latent shard(s) of {self.cfg.d_sae} latents")

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

        n = ratio = 0
        if self.mesh.main:  # one rank measures, every rank uses its answer
            n, ratio = sink_positions(self.model, self.tok, self.train_recs, self.hook)
            self.say(f"skip_first auto: {n} (the leading positions whose residual norm is "
                     f"over {SINK_RATIO:g}x the median; the largest ratio seen {ratio:.0f}x)")
        return self.mesh.broadcast_int(n)

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
        if self.cfg.tokens > have and self.mesh.main:
            warnings.warn(f"tokens={self.cfg.tokens} is {self.cfg.tokens / have:.1f} passes "
                          f"over the {have} training tokens of the records (after the "
                          "held-out split); the SAE sees each activation that many times",
                          stacklevel=4)
        self.data_tokens = have

    def _restore(self):
        cfg = self.cfg
        old = os.path.join(self.out_dir, "checkpoint.pt")
        if os.path.exists(old):
            raise ValueError(f"{old} is a checkpoint of an earlier sae_sparse's train-sae, "
                             "which this version does not resume; use another directory")
        self.sae = self.opt = self.since_fired = self.reader = self.ckpt_steps = None
        self.seen = self.steps = self.rec_pos = self.refill = 0
        self.history = {"step": [], "fvu": [], "dead_frac": []}
        if os.path.exists(os.path.join(self.ckpt, MANIFEST)):
            self.reader = r = ShardReader(self.ckpt)
            m = r.manifest
            if m["config"] != dataclasses.asdict(cfg) | {"tokens": m["config"]["tokens"]}:
                raise ValueError(f"{self.out_dir} holds an SAE run with other settings; use "
                                 "another directory")
            s0, s1 = self.rows
            self.sae = self._make_sae(r.rows("W_enc", s0, s1), r.rows("b_enc", s0, s1),
                                      r.rows("W_dec", s0, s1), r.whole("b_dec"))
            self.seen, self.steps, self.rec_pos, self.refill = (
                m[n] for n in ("seen", "steps", "rec_pos", "refill"))
            self.since_fired = r.rows("since_fired", 0, cfg.d_sae).to(self.device)
            self.history = m["history"]
            self.ckpt_steps = self.steps
            self.say(f"resuming SAE training at {self.seen} of {cfg.tokens} tokens "
                     f"({self.ckpt})")
        self.batches = self.stream.batches(self.rec_pos)

    def _make_sae(self, W_enc, b_enc, W_dec, b_dec):
        """The whole SAE (one shard) or this rank's :class:`ShardedSAE`, b_pre tied to b_dec."""
        cfg, dev = self.cfg, self.device
        W_enc, b_enc, W_dec, b_dec = (t.to(dev) for t in (W_enc, b_enc, W_dec, b_dec))
        if self.mesh.L == 1:
            return SAE(W_enc, b_enc, W_dec, b_dec, cfg.k, b_pre=b_dec)
        return ShardedSAE(W_enc, b_enc, W_dec, b_dec, cfg.k, d_sae=cfg.d_sae,
                          offset=self.rows[0], b_pre=b_dec, group=self.mesh.shard_group,
                          copy=False)

    # -- the loop ----------------------------------------------------------------------------

    def _fill_buffer(self):
        """The next buffer of activations, shuffled, on the device: ``buffer_tokens`` of them
        (fewer when fewer are left to train), from record ``rec_pos`` on, wrapping around.
        The model batches are split over the ranks (:meth:`SAEMesh.run_split`); every rank
        ends with the same buffer. The bar shows the filling."""
        cfg = self.cfg
        want = min(cfg.buffer_tokens, max(cfg.batch_tokens, cfg.tokens - self.seen))
        todo, got = [], 0
        while got < want:
            b = next(self.batches, None)
            if b is None:  # a pass over the records ends: start another
                self.rec_pos = 0
                self.batches = self.stream.batches(0)
                continue
            self.rec_pos = b.end
            todo.append(b)
            got += b.tokens
        made = [0]

        def shown(rows):
            made[0] += rows * self.mesh.world
            self.bar.set_postfix_str(f"filling the buffer {min(made[0], want)}/{want}")
        acts = self.mesh.run_split(self.stream, todo, on_batch=shown)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.refill)
        acts = acts[torch.randperm(acts.shape[0], generator=g).to(acts.device)].to(self.device)
        if self.sae is None:
            first = acts[:cfg.batch_tokens].mean(0)
            W = _init_rows(*self.rows, acts.shape[1], cfg.seed)
            self.sae = self._make_sae(W.clone(), torch.zeros(W.shape[0]), W, first.cpu())
            self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        if self.opt is None:  # fused: one pass per parameter, no temporaries of its size
            fused = self.device.type in ("cpu", "cuda")
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate,
                                        fused=fused or None)
            if self.reader is not None:
                self.opt.load_state_dict(self._saved_adam())
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
        """One Adam step on FVU + AuxK over the global batch x (this replica's rows of it;
        the replicas' gradients summed), the decoder kept at unit norm; the dead latents
        counted. -> (FVU of the whole batch, the dead mask before the step), on the device."""
        cfg, sae, mesh = self.cfg, self.sae, self.mesh
        total_var = (x - x.mean(0)).pow(2).sum()  # the whole batch's, as on one process
        a, b = mesh.rows(x.shape[0])
        xr = x[a:b]
        y, v, i = sae(xr, return_code=True, backend=self.backend)
        err = (y - xr).pow(2).sum()
        dead = self.since_fired > cfg.dead_tokens
        loss = err / total_var
        n_dead = int(dead.sum())
        if n_dead and cfg.auxk_alpha > 0:
            k_aux = x.shape[1] // 2
            e_hat = self._auxk(xr, dead, k_aux)
            scale = min(n_dead / k_aux, 1.0)
            aux = scale * (e_hat - (xr - y).detach()).pow(2).sum() / total_var
            loss = loss + cfg.auxk_alpha * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            fired = torch.zeros(cfg.d_sae, device=x.device)
            fired[i[v > 0]] = 1
            err = self._sum_replicas(err.detach(), fired)
        _remove_parallel_grad(sae)
        self.opt.step()
        _unit_decoder(sae)
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[fired > 0] = 0
        return err / total_var, dead

    def _auxk(self, x, dead, k_aux):
        """AuxK's reconstruction from the dead latents (sharded: each rank its own)."""
        sae = self.sae
        if self.mesh.L == 1:
            return auxk_decode(x, sae.W_enc, sae.b_enc, sae.W_dec, dead, k_aux,
                               b_pre=sae.b_pre, backend=self.backend)
        values, idx = sharded_auxk_encode(x, sae, dead, k_aux)
        return sharded_decode(values, idx, sae, b_dec=False, backend=self.backend)

    def _sum_replicas(self, err, fired):
        """One all-reduce over the replicas: the gradients (the one-process gradient: each
        replica's loss is its rows' share of the batch's), the squared error, and which
        latents fired (in place). -> the batch's squared error."""
        if self.mesh.R == 1:
            return err
        params = list(self.sae.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [err.reshape(1), fired])
        self.mesh.sum_replicas(flat)
        at = 0
        for p, g in zip(params, grads):
            p.grad = flat[at:at + g.numel()].view_as(g)
            at += g.numel()
        fired.copy_(flat[at + 1:])
        return flat[at]

    def _save_ckpt(self):
        """Each shard's rows (weights, Adam moments, steps since each latent fired) in its own
        file, then the manifest (:func:`sae_sparse.mesh.save_shards`)."""
        state = self.opt.state_dict()["state"]
        s0, s1 = self.rows
        sliced, whole = {"since_fired": self.since_fired[s0:s1]}, {}
        for j, (n, p) in enumerate(self.sae.named_parameters()):
            dest = whole if n == "b_dec" else sliced
            dest[n] = p
            dest[f"exp_avg.{n}"] = state[j]["exp_avg"]
            dest[f"exp_avg_sq.{n}"] = state[j]["exp_avg_sq"]
        manifest = {"format": "sae_sparse.train_sae.checkpoint/1",
                    "config": dataclasses.asdict(self.cfg), "d_sae": self.cfg.d_sae,
                    "mesh": {"replicas": self.mesh.R, "shards": self.mesh.L},
                    **{n: getattr(self, n) for n in ("seen", "steps", "rec_pos", "refill",
                                                     "history")}}
        save_shards(self.ckpt, self.mesh, f"refill{self.refill:06d}", self.rows, sliced,
                    whole, manifest)
        self.ckpt_steps = self.steps

    def _saved_adam(self):
        """The optimizer state of the checkpoint, this rank's rows of it."""
        r, (s0, s1) = self.reader, self.rows
        steps = torch.tensor(float(r.manifest["steps"]))
        state = {}
        for j, (n, _) in enumerate(self.sae.named_parameters()):
            get = (lambda m, n=n: r.whole(f"{m}.{n}")) if n == "b_dec" else (
                lambda m, n=n: r.rows(f"{m}.{n}", s0, s1))
            state[j] = {"step": steps.clone(), "exp_avg": get("exp_avg").to(self.device),
                        "exp_avg_sq": get("exp_avg_sq").to(self.device)}
        return {"state": state, "param_groups": self.opt.state_dict()["param_groups"]}

    def _lost_peer(self, e):
        """What each rank raises when it fails mid-run, on several processes (a dead rank
        shows on the others as a failed collective): the rank, the cause, and the
        checkpoint a rerun resumes from."""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = (f"the checkpoint in {self.ckpt} (step {self.ckpt_steps}) resumes: rerun the "
                 "same command" if self.ckpt_steps is not None else
                 "no checkpoint was written yet")
        return RuntimeError(f"train-sae rank {self.mesh.rank} of {self.mesh.world} stopped: "
                            f"{first} (when another rank has died, its collectives fail "
                            f"here). {where}")

    # -- after the loop ----------------------------------------------------------------------

    def _finish(self):
        cfg, sae, hook, mesh = self.cfg, self.sae, self.hook, self.mesh
        self.opt = None  # the checkpoint holds its state: free it (and the gradients) before
        sae.zero_grad(set_to_none=True)  # the evaluation and the save
        ev = self._evaluate_held_out()
        metrics = {"held_out": ev, "train_tokens": self.seen, "steps": self.steps,
                   "hook": hook, "module": self.stream.path, "config": dataclasses.asdict(cfg),
                   "skip_first": self.skip_first, "data_tokens": self.data_tokens,
                   "history": self.history, "n_train_records": len(self.train_recs),
                   "n_eval_records": len(self.eval_recs),
                   "mesh": {"replicas": mesh.R, "shards": mesh.L}}
        extra = dict(hook_name=hook, model_name=self.model_name, training_tokens=self.seen,
                     held_out_fvu=ev["fvu"], held_out_l0=ev["l0"])
        if mesh.L > 1:
            save_saelens_sharded(sae, self.out_dir, write=mesh.writes_shard, **extra)
        elif mesh.main:
            save_saelens(sae, self.out_dir, **extra)
        if mesh.main:
            with open(os.path.join(self.out_dir, "training_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
        mesh.barrier()
        self.say(f"SAE at {hook}: held-out FVU {ev['fvu']:.4f}, L0 {ev['l0']:.1f}, "
                 f"{ev['dead_frac']:.1%} of latents never fired on {ev['tokens']} held-out "
                 f"tokens; saved in {self.out_dir}")
        return sae, metrics

    def _evaluate_held_out(self, max_tokens=65536):
        stream = self._stream(self.eval_recs)
        todo, n = [], 0
        for b in stream.batches():
            todo.append(b)
            n += b.tokens
            if n >= max_tokens:
                break
        x = self.mesh.run_split(stream, todo)[:max_tokens] if todo else None
        return _evaluate(self.sae, x, self.mesh)
