"""Attach SAE latent edits (or a residual LoRA baseline) to any Hugging Face model's modules.

    edits = attach(model, {"transformer.h.6": (sae, adapter)}, mode="delta")
    with edits.token_mask(mask):        # [B, T] bool: edit only these positions
        logits = model(input_ids).logits
    edits.remove()

The edit replaces the module's output hidden states (the first element when the module returns
a tuple) by ``sae_edit(h, sae, adapter, mode=mode)``. With a zero adapter in delta mode the
model's outputs are unchanged.

``attach(..., skip_first=1)`` leaves each sequence's first position unedited: in most
pretrained LMs it is an attention sink whose residual norm is ~100x the others' (SmolLM2-135M
at layer 15: ~25,000 against ~170), where an SAE's code is meaningless (``train_sae`` leaves
it out of training the same way) and an edit there moves every later token through
attention. A position is its ``position_ids`` entry when the hooked module receives one (a
transformers decoder layer does: with a KV cache, and with left padding when the caller
passes position ids, as ``generate`` does), else its index in a forward of more than one
token (a one-token forward, a cached decoding step, is then edited).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .baselines import DenseLatentAdapterEdit, ResidualLoRA  # noqa: F401 (their old home)
from .modules import SAE
from .ops import sae_edit


class _Edit:
    def __init__(self, owner, path, module, fn, sae=None):
        self.owner, self.path, self.fn, self.sae = owner, path, fn, sae
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if not self.owner.enabled:
            return output
        h = output[0] if isinstance(output, tuple) else output
        if self.sae is not None and h.shape[-1] != self.sae.d_in:
            raise ValueError(f"the SAE at {self.path} reads vectors of width {self.sae.d_in}, "
                             f"but {self.path} outputs width {h.shape[-1]}")
        mask = self.owner._mask
        if mask is not None and mask.shape != h.shape[:-1]:
            raise ValueError(f"token mask must have shape {list(h.shape[:-1])} (the hooked "
                             f"hidden states' leading dims), got {list(mask.shape)}")
        sink = self.owner._sink_mask(h, kwargs)
        if sink is not None:
            mask = ~sink if mask is None else mask & ~sink
        e = self.fn(h)
        # every token through the edit, the masked-out ones then taken as they were: no
        # boolean indexing (a host sync and a copy per layer per step)
        s = self.owner.strength
        if s != 1.0:
            e = h + (e - h) * s
        y = e if mask is None else torch.where(mask[..., None], e, h)
        counted = self.owner._count
        if counted is not None and self.sae is not None and self.sae._overflow_rows is not None:
            self.owner._tally(self.path, self.sae._overflow_rows, counted, mask)
        return (y, *output[1:]) if isinstance(output, tuple) else y


class AttachedEdits:
    """Handle to the hooks placed by :func:`attach`."""

    def __init__(self, skip_first: int = 0):
        self.edits: dict[str, _Edit] = {}
        self.enabled = True
        self.strength = 1.0
        self.skip_first = skip_first  # positions < this are left unedited (attention sinks)
        self._mask = None
        self._count = None
        # hook -> [edited tokens, tokens with more than k active latents], 0-dim device tensors
        self.overflow: dict[str, list] = {}

    def _sink_mask(self, h, kwargs):
        """[*h.shape[:-1]] bool, True at positions < skip_first; None when none are."""
        if not self.skip_first:
            return None
        lead = h.shape[:-1]
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.shape[-1] == lead[-1] and pos.dim() <= len(lead):
            return (pos.to(h.device) < self.skip_first).expand(lead)
        if h.dim() < 3 or lead[-1] == 1:  # no sequence axis, or one token: not the first
            return None
        return (torch.arange(lead[-1], device=h.device) < self.skip_first).expand(lead)

    @contextlib.contextmanager
    def scaled(self, strength: float):
        """Scale every edit: the output is ``h + strength·(edit(h) − h)`` (0 = unedited,
        1 = as trained, 2 = twice as strong, negative = the opposite direction)."""
        old, self.strength = self.strength, float(strength)
        try:
            yield self
        finally:
            self.strength = old

    @contextlib.contextmanager
    def counting_overflow(self, valid):
        """Count, per hook, the edited tokens among ``valid`` [B, T] (e.g. the attention mask)
        and those whose SAE code had more than k active latents (the cap cut them), into
        :attr:`overflow`. The counts stay on the device: nothing is read back here."""
        old, self._count = self._count, valid
        try:
            yield self
        finally:
            self._count = old

    def _tally(self, path, rows, valid, mask):
        sel = valid if mask is None else valid & mask
        if rows.numel() != sel.numel():
            return
        sel = sel.reshape(-1)
        acc = self.overflow.setdefault(path, [0, 0])
        acc[0] = acc[0] + sel.sum()
        acc[1] = acc[1] + (rows.reshape(-1) & sel).sum()

    @contextlib.contextmanager
    def token_mask(self, mask):
        """Edit only where ``mask`` [B, T] is True (e.g. only prompt or only response tokens)."""
        old, self._mask = self._mask, mask
        try:
            yield self
        finally:
            self._mask = old

    @contextlib.contextmanager
    def disabled(self):
        """Run the unedited model."""
        old, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = old

    def remove(self):
        """Removes every hook: the model is exactly as before."""
        for e in self.edits.values():
            e.handle.remove()
        self.edits.clear()


def _module(model, path):
    from .hookpoints import resolve_hook

    # a module path, a sparsify hookpoint or a TransformerLens hook name; a ValueError naming
    # close matches when none fits
    return model.get_submodule(resolve_hook(model, path))


def attach(model: nn.Module, edits: dict, *, mode: str = "delta", backend=None,
           dense: bool = False, skip_first: int = 0) -> AttachedEdits:
    """Attaches SAE edits or baselines at module outputs.

    Args:
        model: any nn.Module (e.g. a transformers causal LM).
        edits: ``{hook: (sae, adapter)}`` for SAE edits (adapter may be None), or
            ``{hook: module}`` for a baseline such as :class:`ResidualLoRA` (any
            callable mapping hidden states to edited hidden states).
        mode: "delta" or "replace" (SAE edits).
        backend: kernel backend for the SAE op.
        dense: compute SAE edits with the dense-latent baseline instead of the sparse op.
        skip_first: leave each sequence's first ``skip_first`` positions unedited (1 for the
            attention sink of most pretrained LMs; see the module's docstring).

    A hook is a module path (``transformer.h.6``), a sparsify hookpoint (``h.6``) or a
    TransformerLens hook name (``blocks.6.hook_resid_post``); see :mod:`sae_sparse.hookpoints`.
    """
    if not isinstance(skip_first, int) or skip_first < 0:
        raise ValueError(f"skip_first must be an int >= 0, got {skip_first!r}")
    out = AttachedEdits(skip_first)
    seen = {}
    for path, spec in edits.items():
        module = _module(model, path)
        if id(module) in seen:  # e.g. "transformer.h.1" and "blocks.1.hook_resid_post"
            raise ValueError(f"edits {seen[id(module)]!r} and {path!r} name the same module; "
                             "one edit per module")
        seen[id(module)] = path
        sae = None
        if isinstance(spec, tuple):
            sae, adapter = spec
            if not isinstance(sae, SAE):
                raise TypeError(f"edits[{path!r}]: expected (SAE, LatentAdapter or None), got "
                                f"({type(sae).__name__}, ...)")
            if dense:
                fn = DenseLatentAdapterEdit(sae, adapter, mode)
            else:
                def fn(h, sae=sae, adapter=adapter):
                    return sae_edit(h, sae, adapter, mode=mode, backend=backend)
        else:
            fn = spec
        out.edits[path] = _Edit(out, path, module, fn, sae)
    return out
