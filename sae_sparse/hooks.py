"""Attach SAE latent edits (or a residual LoRA baseline) to any Hugging Face model's modules.

    edits = attach(model, {"transformer.h.6": (sae, adapter)}, mode="delta")
    with edits.token_mask(mask):        # [B, T] bool: edit only these positions
        logits = model(input_ids).logits
    edits.remove()

The edit replaces the module's output hidden states (the first element when the module returns
a tuple) by ``sae_edit(h, sae, adapter, mode=mode)``. With a zero adapter in delta mode the
model's outputs are unchanged.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .modules import SAE, LatentAdapter
from .ops import sae_edit
from .reference import dense_sae_edit


class ResidualLoRA(nn.Module):
    """Baseline: a rank-r update of the residual stream, ``h + (h @ A) @ B`` (B starts at 0)."""

    def __init__(self, d_model: int, rank: int = 8, dtype=torch.float32, device=None):
        super().__init__()
        self.rank = rank
        self.A = nn.Parameter(torch.randn(d_model, rank, dtype=dtype, device=device)
                              / math.sqrt(d_model))
        self.B = nn.Parameter(torch.zeros(rank, d_model, dtype=dtype, device=device))

    def forward(self, h):
        return h + (h.to(self.A.dtype) @ self.A @ self.B).to(h.dtype)


class DenseLatentAdapterEdit(nn.Module):
    """Baseline: the same math as the sparse op but with a dense N x S latent code."""

    def __init__(self, sae: SAE, adapter: LatentAdapter, mode: str):
        super().__init__()
        self.sae, self.adapter, self.mode = sae, adapter, mode

    def forward(self, h):
        shape = h.shape
        x = h.reshape(-1, shape[-1]).to(self.sae.W_dec.dtype)
        v, i = self.sae.encode(x, backend="torch")
        p = self.adapter.edit_params()
        y = dense_sae_edit(x, v, i, self.sae.W_dec, self.sae.b_dec,
                           activation=self.adapter.activation,
                           mode=self.mode, **p)
        return y.to(h.dtype).reshape(shape)


class _Edit:
    def __init__(self, owner, path, module, fn):
        self.owner, self.path, self.fn = owner, path, fn
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not self.owner.enabled:
            return output
        h = output[0] if isinstance(output, tuple) else output
        mask = self.owner._mask
        if mask is None:
            y = self.fn(h)
        else:
            if mask.shape != h.shape[:-1]:
                raise ValueError(f"token mask must have shape {list(h.shape[:-1])} (the hooked "
                                 f"hidden states' leading dims), got {list(mask.shape)}")
            # every token through the edit, the masked-out ones then taken as they were: no
            # boolean indexing (a host sync and a copy per layer per step)
            y = torch.where(mask[..., None], self.fn(h), h)
        return (y, *output[1:]) if isinstance(output, tuple) else y


class AttachedEdits:
    """Handle to the hooks placed by :func:`attach`."""

    def __init__(self):
        self.edits: dict[str, _Edit] = {}
        self.enabled = True
        self._mask = None

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
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(f"model has no module {path!r}; module paths look like {names} ...")


def attach(model: nn.Module, edits: dict, *, mode: str = "delta", backend=None,
           dense: bool = False) -> AttachedEdits:
    """Attaches SAE edits or baselines at module outputs.

    Args:
        model: any nn.Module (e.g. a transformers causal LM).
        edits: ``{module_path: (sae, adapter)}`` for SAE edits (adapter may be None), or
            ``{module_path: module}`` for a baseline such as :class:`ResidualLoRA` (any
            callable mapping hidden states to edited hidden states).
        mode: "delta" or "replace" (SAE edits).
        backend: kernel backend for the SAE op.
        dense: compute SAE edits with the dense-latent baseline instead of the sparse op.
    """
    out = AttachedEdits()
    for path, spec in edits.items():
        module = _module(model, path)
        if isinstance(spec, tuple):
            sae, adapter = spec
            if dense:
                fn = DenseLatentAdapterEdit(sae, adapter, mode)
            else:
                def fn(h, sae=sae, adapter=adapter):
                    return sae_edit(h, sae, adapter, mode=mode, backend=backend)
        else:
            fn = spec
        out.edits[path] = _Edit(out, path, module, fn)
    return out
