"""SAELens on this package's ops: its TopK training step, and its SAE objects in memory.

* :func:`patch_saelens` makes ``TopKTrainingSAE.training_forward_pass`` (the step SAELens's
  ``SAETrainer`` calls) run :func:`saelens_training_forward_pass`: the same ``sae_out``, MSE
  loss, AuxK loss and gradients, with the encode and decode as one op (:func:`sae_forward`)
  and AuxK as dense GEMMs over the dead latents (:func:`auxk_decode` with ``relu=False``:
  SAELens takes the dead latents' pre-activations without ReLU and trains the encoder through
  them). The d_sae-wide pre-activations are never built: ``feature_acts`` comes back as a
  sparse COO tensor (SAELens's trainer counts firing latents and L0 from it, as with its own
  ``use_sparse_activations``), and ``hidden_pre`` holds only the selected entries (sparse too).
* :func:`from_saelens` / :func:`to_saelens` convert SAELens SAE objects (TopK, JumpReLU,
  standard ReLU; training or inference classes) to and from :class:`SAE` in memory.

SAELens stores ``W_enc`` as [d_in, d_sae]; here it is [d_sae, d_in]. With
``rescale_acts_by_decoder_norm`` (the default of its TopK training config) it ranks
``pre·‖W_dec_i‖`` and decodes ``acts / ‖W_dec_i‖`` — the same function as an SAE with
``W_enc_i·‖W_dec_i‖``, ``b_enc_i·‖W_dec_i‖`` and unit decoder rows, which is what the op is
given (and what :func:`from_saelens` returns); gradients flow through the norms as in SAELens.
"""
from __future__ import annotations

import functools

import torch

from ._patch import MethodPatch
from .modules import SAE
from .ops import auxk_decode, sae_forward


def _check_supported(sae):
    cfg = sae.cfg
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise NotImplementedError(f"reshape_activations={cfg.reshape_activations!r} (hook_z) "
                                  "is not supported by the sae_sparse patch")


def _effective(sae):
    """(W_enc [S, D], b_enc, W_dec [S, D], norms or None) of the function SAELens computes,
    differentiable in its parameters."""
    W_enc, b_enc, W_dec = sae.W_enc.T, sae.b_enc, sae.W_dec
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        n = W_dec.norm(dim=-1)
        return W_enc * n[:, None], b_enc * n, W_dec / n[:, None], n
    return W_enc, b_enc, W_dec, None


def _sparse_code(values, indices, S):
    N, k = values.shape
    rows = torch.arange(N, device=values.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(torch.stack([rows, indices.reshape(-1)]),
                                   values.reshape(-1), (N, S), check_invariants=False)


def saelens_training_forward_pass(sae, step_input, *, backend=None):
    """SAELens's ``TopKTrainingSAE.training_forward_pass`` on this package's ops (see the
    module docstring); returns SAELens's ``TrainStepOutput``."""
    from sae_lens.saes.sae import TrainStepOutput

    _check_supported(sae)
    cfg = sae.cfg
    sae_in = step_input.sae_in
    x = sae.run_time_activation_norm_fn_in(sae.hook_sae_input(sae.reshape_fn_in(
        sae_in.to(sae.dtype))))
    b_pre = sae.b_dec if cfg.apply_b_dec_to_input else None
    W_enc, b_enc, W_dec, _ = _effective(sae)
    y, values, indices = sae_forward(x, W_enc, b_enc, W_dec, sae.b_dec, cfg.k, b_pre=b_pre,
                                     backend=backend)
    sae_out = sae.reshape_fn_out(sae.run_time_activation_norm_fn_out(sae.hook_sae_recons(y)),
                                 sae.d_head)
    mse_loss = sae.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()

    dead = step_input.dead_neuron_mask
    num_dead = int(dead.sum()) if dead is not None else 0
    if num_dead == 0:
        aux = sae_out.new_tensor(0.0)
    else:
        if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError("TopK auxiliary loss does not support activation normalization "
                             f"(normalize_activations={cfg.normalize_activations!r})")
        residual = (sae_in - sae_out).detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        recons = auxk_decode(x, W_enc, b_enc, W_dec, dead.to(x.device), k_aux, b_pre=b_pre,
                             backend=backend, relu=False)
        aux = cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(-1).mean()
    S = cfg.d_sae
    lead = values.shape[:-1]
    feature_acts = _sparse_code(values.reshape(-1, cfg.k), indices.reshape(-1, cfg.k), S)
    if len(lead) != 1:
        feature_acts = feature_acts.to_dense().view(*lead, S)  # rare: extra leading dims
    return TrainStepOutput(sae_in=sae_in, sae_out=sae_out, feature_acts=feature_acts,
                           hidden_pre=feature_acts, loss=mse_loss + aux,
                           losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux})


class SAELensPatch(MethodPatch):
    """Returned by :func:`patch_saelens`: ``remove()`` (or leaving a ``with`` block) puts
    SAELens's own ``training_forward_pass`` back."""

    name = "training_forward_pass"


def patch_saelens(sae=None, *, backend=None) -> SAELensPatch:
    """Makes SAELens's ``TopKTrainingSAE.training_forward_pass`` run
    :func:`saelens_training_forward_pass` (this package's ops, the same outputs, losses and
    gradients). ``sae=None`` patches the class, so SAELens's ``SAETrainer`` and training
    runners use it; pass one ``TopKTrainingSAE`` to patch only that one. Undo with the
    returned handle's ``remove()``, or use it as a context manager::

        from sae_lens.training.sae_trainer import SAETrainer
        from sae_sparse.compat import patch_saelens
        with patch_saelens():
            SAETrainer(cfg, sae, activations).fit()
    """
    from sae_lens.saes.topk_sae import TopKTrainingSAE

    if sae is not None and not isinstance(sae, TopKTrainingSAE):
        raise TypeError(f"patch_saelens: sae must be a SAELens TopKTrainingSAE or None, got "
                        f"{type(sae).__name__}")
    owner = TopKTrainingSAE if sae is None else sae
    if sae is not None:
        _check_supported(sae)
    previous = owner.__dict__.get("training_forward_pass")
    if sae is None:
        @functools.wraps(TopKTrainingSAE.training_forward_pass)
        def step(self, step_input):
            return saelens_training_forward_pass(self, step_input, backend=backend)
    else:
        def step(step_input):
            return saelens_training_forward_pass(sae, step_input, backend=backend)
    owner.training_forward_pass = step
    return SAELensPatch(owner, previous)


def from_saelens(sae, *, k: int | None = None) -> SAE:
    """A SAELens SAE object (TopK, JumpReLU or standard ReLU; inference or training class) as
    an :class:`SAE`, in memory. ReLU and JumpReLU SAEs need ``k`` (the cap k_max); a TopK SAE
    uses its own k unless ``k`` is given. A decoder-norm-rescaled TopK SAE comes back with the
    norms folded (unit decoder rows: the same function)."""
    cfg = sae.cfg
    arch = cfg.architecture()
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise NotImplementedError("hook_z SAEs (reshape_activations='hook_z') are not supported")
    if getattr(cfg, "normalize_activations", "none") not in ("none", None):
        raise NotImplementedError(f"normalize_activations={cfg.normalize_activations!r}: fold "
                                  "the normalization into the weights first")
    with torch.no_grad():
        W_enc, b_enc, W_dec, _ = _effective(sae)
        W_enc, b_enc, W_dec = (t.detach().clone() for t in (W_enc, b_enc, W_dec))
        b_dec = sae.b_dec.detach().clone()
    if arch == "topk":
        kk, thr = k or cfg.k, None
    elif arch == "jumprelu":
        kk, thr = k, sae.threshold.detach().clone()
    elif arch == "standard":
        kk, thr = k, None
    else:
        raise NotImplementedError(f"SAELens architecture {arch!r} is not supported (topk, "
                                  "jumprelu, standard)")
    if kk is None:
        raise ValueError(f"this SAELens {arch!r} SAE has no top-k of its own: pass k=... (the "
                         "cap k_max on active latents per token)")
    out = SAE(W_enc, b_enc, W_dec, b_dec, int(kk),
              b_pre=b_dec if cfg.apply_b_dec_to_input else None, threshold=thr)
    meta = getattr(cfg, "metadata", None)
    out.format_info = {"format": "saelens", "path": None, "architecture": arch,
                       "hook_name": getattr(meta, "hook_name", None),
                       "neuronpedia_id": getattr(meta, "neuronpedia_id", None)}
    return out


def to_saelens(sae: SAE, *, hook_name: str | None = None, architecture: str | None = None):
    """An :class:`SAE` as a SAELens inference SAE object (``TopKSAE``; ``JumpReLUSAE`` when it
    has a threshold; ``architecture="standard"`` for a ReLU SAE), in memory. An untied
    ``b_pre`` has no SAELens equivalent and raises."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens import TopKSAE, TopKSAEConfig

    if sae.b_pre is not None and not sae.tied_b_pre:
        raise ValueError("SAELens has no separate input bias: b_pre must be tied to b_dec "
                         "(or None)")
    arch = architecture or ("jumprelu" if sae.threshold is not None else "topk")
    common = dict(d_in=sae.d_in, d_sae=sae.d_sae, dtype=str(sae.W_enc.dtype).split(".")[-1],
                  device=str(sae.W_enc.device), apply_b_dec_to_input=sae.tied_b_pre)
    if arch == "topk":
        out = TopKSAE(TopKSAEConfig(k=sae.k, **common))
    elif arch == "jumprelu":
        out = JumpReLUSAE(JumpReLUSAEConfig(**common))
    elif arch == "standard":
        out = StandardSAE(StandardSAEConfig(**common))
    else:
        raise ValueError(f"architecture must be topk, jumprelu or standard, got {arch!r}")
    if hook_name is not None:
        out.cfg.metadata.hook_name = hook_name
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc.detach().T)
        out.b_enc.copy_(sae.b_enc.detach())
        out.W_dec.copy_(sae.W_dec.detach())
        out.b_dec.copy_(sae.b_dec.detach())
        if arch == "jumprelu":
            out.threshold.copy_(sae.threshold.detach())
    return out
