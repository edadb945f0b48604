"""A model's activations at a hook, streamed from text records (what ``train_sae`` trains on).

The records are tokenised once (int32 ids, kept), cut into ``max_len``-token windows and
grouped, whole records at a time, into model batches of at least ``model_batch`` windows.
:meth:`ActivationStream.batches` lists those batches without running the model (cheap, the
same on every rank of a distributed run); :meth:`ActivationStream.run` runs one, up to the
hooked module only; :meth:`ActivationStream.chunks` does both.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .hookpoints import forward_to, resolve_hook


class Batch(NamedTuple):
    """One model batch: the windows (token-id arrays), the record after its last one, and the
    activations it yields (tokens, less the skipped leading positions)."""

    windows: list
    end: int
    tokens: int


class ActivationStream:
    """Activations of ``hook`` for ``records`` (``{"text"}`` or prompt + completion), in
    ``max_len``-token windows with the first ``skip_first`` positions of each dropped (the
    attention sink); ``chunks()`` yields [tokens, D] fp32 tensors, a model batch at a time."""

    def __init__(self, model, tokenizer, hook, records, *, max_len, model_batch, device=None,
                 skip_first: int = 0):
        self.model, self.tok, self.records = model, tokenizer, records
        self.skip_first = skip_first
        self.path = resolve_hook(model, hook)
        self.max_len, self.model_batch = max_len, model_batch
        self.device = device or next(model.parameters()).device
        self._ids = None

    def _record_ids(self, n):
        if self._ids is None:
            self._ids = [None] * len(self.records)
        if self._ids[n] is None:
            r = self.records[n]
            text = r["text"] if "text" in r else r["prompt"] + r["completion"]
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            self._ids[n] = np.asarray(ids, dtype=np.int32)
        return self._ids[n]

    def _windows(self, n):
        ids, L = self._record_ids(n), self.max_len
        return [ids[s:s + L] for s in range(0, len(ids), L)
                if len(ids[s:s + L]) >= 2 + self.skip_first]

    def n_tokens(self) -> int:
        """The activations one pass over the records yields (tokenizing only; the ids are
        kept for the passes that follow)."""
        return sum(len(w) - self.skip_first for n in range(len(self.records))
                   for w in self._windows(n))

    def batches(self, start=0):
        """The model batches from record ``start`` on, as :class:`Batch` (no model call)."""
        windows = []
        for n in range(start, len(self.records)):
            windows += self._windows(n)
            if len(windows) >= self.model_batch:
                yield Batch(windows, n + 1, sum(len(w) for w in windows)
                            - self.skip_first * len(windows))
                windows = []
        if windows:
            yield Batch(windows, len(self.records), sum(len(w) for w in windows)
                        - self.skip_first * len(windows))

    @torch.no_grad()
    def chunks(self, start=0):
        """-> (records used so far, activations [tokens, D]), a model batch (of at least
        ``model_batch`` windows, whole records) at a time, from record ``start`` on."""
        for b in self.batches(start):
            yield b.end, self._run(b.windows)

    @torch.no_grad()
    def run(self, batch: Batch):
        """The activations [batch.tokens, D] (fp32, on the model's device) of one batch."""
        return self._run(batch.windows)

    def _run(self, windows):
        T = max(len(w) for w in windows)
        ids = torch.zeros(len(windows), T, dtype=torch.long)
        mask = torch.zeros(len(windows), T, dtype=torch.bool)
        for b, w in enumerate(windows):
            ids[b, :len(w)] = torch.from_numpy(w.astype(np.int64))
            mask[b, :len(w)] = True
        keep = mask.clone()
        keep[:, :self.skip_first] = False
        h = forward_to(self.model, self.path, ids.to(self.device), mask.to(self.device))
        return h[keep.to(h.device)].float()
