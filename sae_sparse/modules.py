"""nn.Modules: the canonical :class:`SAE` and the trainable :class:`LatentAdapter`."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _validate as V
from .ops import auxk_decode, auxk_encode, encode_rows, forward_rows, sparse_decode
from .reference import ACTIVATIONS


class SAE(nn.Module):
    """A sparse autoencoder in the canonical layout of docs/design.md.

    Parameters (``nn.Parameter``, exactly these names): ``W_enc`` [S, D], ``b_enc`` [S],
    ``W_dec`` [S, D], ``b_dec`` [D], optional ``b_pre`` [D] (subtracted from x before encoding)
    and ``threshold`` [S] (JumpReLU; kept with ``requires_grad=False``: the hard threshold has
    no gradient here). Pass the *same tensor* as ``b_pre`` and ``b_dec`` to tie them (sparsify,
    SAELens ``apply_b_dec_to_input``): one Parameter is then registered under both names, so
    training keeps them equal. Freeze with ``sae.requires_grad_(False)``.

    Args:
        W_enc, b_enc, W_dec, b_dec: tensors in the shapes above (same dtype and device).
        k: latents kept per token (for ReLU/JumpReLU SAEs: the cap k_max).
        b_pre, threshold: optional, see above.

    After each :meth:`encode`, ``last_overflow`` holds the number of rows (0-dim tensor) that
    had more than k active latents, i.e. where the cap changed the result.
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, k: int, *, b_pre=None, threshold=None):
        super().__init__()
        V.check_x(W_enc, "W_enc")
        if W_enc.dim() != 2:
            raise ValueError(f"W_enc must have shape [S, D], got {list(W_enc.shape)}")
        S, D = W_enc.shape
        V.check_tensor(b_enc, "b_enc", (S,), like=W_enc)
        V.check_tensor(W_dec, "W_dec", (S, D), like=W_enc)
        V.check_tensor(b_dec, "b_dec", (D,), like=W_enc)
        if b_pre is not None:
            V.check_tensor(b_pre, "b_pre", (D,), like=W_enc)
        if threshold is not None:
            V.check_tensor(threshold, "threshold", (S,), like=W_enc)
        self.k = V.check_k(k, S)
        tied = b_pre is not None and b_pre is b_dec
        self.W_enc = nn.Parameter(W_enc.detach().clone())
        self.b_enc = nn.Parameter(b_enc.detach().clone())
        self.W_dec = nn.Parameter(W_dec.detach().clone())
        self.b_dec = nn.Parameter(b_dec.detach().clone())
        if tied:
            self.b_pre = self.b_dec
        else:
            self.b_pre = nn.Parameter(b_pre.detach().clone()) if b_pre is not None else None
        self.threshold = (nn.Parameter(threshold.detach().clone(), requires_grad=False)
                          if threshold is not None else None)
        self._overflow_rows = None  # [N] bool of the last call; counted on access

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[0]

    @property
    def tied_b_pre(self) -> bool:
        return self.b_pre is not None and self.b_pre is self.b_dec

    @classmethod
    def random(cls, d_in: int, d_sae: int, k: int, *, b_pre: bool = False,
               threshold: bool = False, dtype=torch.float32, device=None, generator=None):
        """A randomly initialised SAE (unit-norm decoder rows, W_enc = W_dec), for tests/demos."""
        g = dict(dtype=dtype, device=device)
        W_dec = torch.randn(d_sae, d_in, generator=generator, dtype=dtype).to(device)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        b_dec = 0.1 * torch.randn(d_in, generator=generator, dtype=dtype).to(device)
        thr = (0.05 * torch.rand(d_sae, generator=generator, dtype=dtype).to(device)
               if threshold else None)
        return cls(W_dec.clone(), torch.zeros(d_sae, **g), W_dec, b_dec, k,
                   b_pre=b_dec if b_pre else None, threshold=thr)

    def encode(self, x, *, backend=None):
        """x [..., D] -> (values [..., k], indices [..., k]); see :func:`sae_sparse.topk_encode`."""
        values, indices, self._overflow_rows = encode_rows(
            x, self.W_enc, self.b_enc, self.k, b_pre=self.b_pre, threshold=self.threshold,
            backend=backend)
        return values, indices

    @property
    def last_overflow(self):
        """The number of rows of the last :meth:`encode` / :meth:`forward` / ``sae_edit``
        with more than k active latents (a 0-dim int64 tensor; None before any call). Counted
        when read, so a training step that never reads it launches nothing for it."""
        rows = self._overflow_rows
        return None if rows is None else rows.sum()

    def auxk_encode(self, x, dead_mask, k_aux: int, *, backend=None):
        """The k_aux largest pre-activations among the dead latents (AuxK, for training
        top-k SAEs; a JumpReLU threshold is not applied); see :func:`sae_sparse.auxk_encode`."""
        return auxk_encode(x, self.W_enc, self.b_enc, dead_mask, k_aux, b_pre=self.b_pre,
                           backend=backend)

    def auxk_decode(self, x, dead_mask, k_aux: int, *, backend=None):
        """The AuxK reconstruction of the residual (b_dec included, as sparsify's decode):
        the k_aux largest pre-activations among the dead latents, decoded, with dense GEMMs
        over the dead latents; see :func:`sae_sparse.auxk_decode`."""
        return auxk_decode(x, self.W_enc, self.b_enc, self.W_dec, dead_mask, k_aux,
                           b_pre=self.b_pre, b_dec=self.b_dec, backend=backend)

    def decode(self, values, indices, *, backend=None):
        """(values, indices) [..., k] -> reconstruction [..., D]."""
        return sparse_decode(values, indices, self.W_dec, self.b_dec, backend=backend)

    def forward(self, x, *, backend=None, return_code: bool = False):
        """The SAE's reconstruction of x, [..., D] (with ``return_code``: ``(y, values,
        indices)``, the code as :meth:`encode` returns it; a loss on ``values`` reaches the
        encoder too). One op for encode and decode (:func:`sae_sparse.sae_forward`): on the
        kernel backends its backward groups the (token, slot) pairs by latent once for dW_enc
        and dW_dec. Sets ``last_overflow``."""
        y, values, indices, self._overflow_rows = forward_rows(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, b_pre=self.b_pre,
            threshold=self.threshold, backend=backend)
        return (y, values, indices) if return_code else y

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}, b_pre="
                f"{'tied' if self.tied_b_pre else self.b_pre is not None}, "
                f"jumprelu={self.threshold is not None}")


class LatentAdapter(nn.Module):
    """A trainable edit in SAE latent space (DESIGN.md "Edit").

    ``z'_i = z_i (1 + gain_i) + bias_i + (W_out^T act(W_in^T z + b_in))_i``

    Parameters (``None`` when the kind is switched off): ``gain`` [S], ``bias`` [S],
    ``W_in`` [S, h], ``b_in`` [h], ``W_out`` [h, S]. Everything starts at zero except ``W_in``
    (normal, std 1/sqrt(h)), so the edited model equals the original at step 0.
    ``activation="identity"`` makes the FFNN a rank-h linear map.

    Args:
        d_sae: number of latents S.
        hidden: h, the FFNN width (ignored when ``ffn=False``).
        gain, bias, ffn: which kinds of edit to train.
        activation: "relu", "gelu" or "identity".
        latent_mask: optional bool [S]; the edit then touches only these latents (gain, bias,
            W_in rows and W_out columns outside the mask are held at zero) -- the masked-sparse
            variant.
    """

    def __init__(self, d_sae: int, hidden: int = 16, gain: bool = True, bias: bool = True,
                 ffn: bool = True, activation: str = "relu", *, latent_mask=None,
                 dtype=torch.float32, device=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if ffn and hidden < 1:
            raise ValueError(f"hidden must be >= 1 when ffn=True, got {hidden}")
        if not (gain or bias or ffn):
            raise ValueError("LatentAdapter needs at least one of gain, bias, ffn")
        g = dict(dtype=dtype, device=device)
        self.d_sae, self.hidden, self.activation = d_sae, hidden if ffn else 0, activation
        self.gain = nn.Parameter(torch.zeros(d_sae, **g)) if gain else None
        self.bias = nn.Parameter(torch.zeros(d_sae, **g)) if bias else None
        if ffn:
            self.W_in = nn.Parameter(torch.randn(d_sae, hidden, **g) / math.sqrt(hidden))
            self.b_in = nn.Parameter(torch.zeros(hidden, **g))
            self.W_out = nn.Parameter(torch.zeros(hidden, d_sae, **g))
        else:
            self.W_in = self.b_in = self.W_out = None
        if latent_mask is not None:
            V.check_tensor(latent_mask, "latent_mask", (d_sae,), dtype=torch.bool)
            self.register_buffer("latent_mask", latent_mask.to(device))
        else:
            self.latent_mask = None

    def edit_params(self) -> dict:
        """The tensors the op consumes, with the latent mask applied."""
        m = self.latent_mask
        out = {}
        for name in ("gain", "bias", "W_in", "b_in", "W_out"):
            t = getattr(self, name)
            if t is None:
                continue
            if m is not None and name != "b_in":
                mm = m.to(t.dtype)
                t = t * (mm[:, None] if name == "W_in" else mm)
            out[name] = t
        return out

    def extra_repr(self) -> str:
        kinds = [n for n in ("gain", "bias") if getattr(self, n) is not None]
        if self.W_in is not None:
            kinds.append(f"ffn(h={self.hidden}, {self.activation})")
        return f"d_sae={self.d_sae}, edit={'+'.join(kinds)}"
