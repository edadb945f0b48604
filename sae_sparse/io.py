"""Loading and saving SAEs in other projects' file formats (no pickle is ever executed).

Supported (a path may also be a Hugging Face repo folder or a SAELens release, see
:func:`resolve_sae_path`):

* SAELens: ``cfg.json`` + ``sae_weights.safetensors``; ``W_enc`` stored [D, S];
  ``apply_b_dec_to_input`` ties ``b_pre`` to ``b_dec``; ``architecture`` "standard" / "jumprelu"
  (``threshold``) / "topk" (``k`` in the cfg or ``activation_fn_kwargs``).
* EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight`` [S, D],
  ``encoder.bias``, ``W_dec`` [S, D], ``b_dec``; the encoder subtracts ``b_dec`` unless
  ``transcode``.
* Gemma Scope: ``params.npz`` with ``W_enc`` [D, S], ``W_dec`` [S, D], ``b_enc``, ``b_dec``,
  ``threshold`` (JumpReLU).
* dictionary_learning: ``ae.pt`` (+ ``config.json``): ``AutoEncoder`` (``encoder.*``,
  ``decoder.weight`` [D, S], ``bias`` subtracted before encoding), ``AutoEncoderTopK``
  (``b_dec`` subtracted, ``k`` buffer) and ``JumpReluAutoEncoder`` (``W_enc`` [D, S], ``W_dec``,
  ``threshold``).
* e2e_sae (PyPI ``e2e-sae``, end-to-end SAEs): ``final_config.yaml`` + ``samples_N.pt``, one
  ReLU SAE per hook position (``hook=`` picks one), decoder columns normalised as it uses them.
* OpenAI sparse_autoencoder state dicts (a ``.pt`` file): ``pre_bias``, ``encoder.weight``
  [S, D], ``latent_bias``, ``decoder.weight`` [D, S], ``activation`` / ``activation_state_dict``
  (TopK ``k``).

``.pt`` files are read with ``torch.load(weights_only=True)``: no pickled code runs.

ReLU and JumpReLU SAEs have no k of their own: pass ``k`` (the cap k_max; the op records how
many rows exceeded it, see :attr:`SAE.last_overflow`).
"""
from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import torch

from .modules import SAE


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _need_k(k, what):
    if k is None:
        raise ValueError(f"{what} has no top-k of its own: pass k=... (--k on the command "
                         "line), the cap k_max on active latents per token; sae.last_overflow "
                         "counts rows that exceed it")
    return k


def _is_e2e_state(path) -> bool:
    try:
        keys = _load_pt(path).keys()
    except ValueError:
        return False
    return any(k.endswith(".encoder.0.weight") for k in keys)


def detect_format(path: str) -> str:
    """Names the on-disk format of the SAE at `path` (a directory or a params.npz file)."""
    if os.path.isfile(path) and path.endswith(".npz"):
        return "gemmascope"
    if os.path.isfile(path) and path.endswith((".pt", ".pth")):
        if os.path.basename(path) == "ae.pt":
            return "dictionary_learning"
        return "e2e" if _is_e2e_state(path) else "openai"
    if os.path.isdir(path):
        files = set(os.listdir(path))
        if "sae_weights.safetensors" in files:
            return "saelens"
        if "sae.safetensors" in files:
            return "sparsify"
        if "params.npz" in files:
            return "gemmascope"
        if "ae.pt" in files:
            return "dictionary_learning"
        if "final_config.yaml" in files and any(f.endswith(".pt") for f in files):
            return "e2e"
    raise ValueError(f"no SAE format recognised at {path!r}: expected a SAELens directory "
                     "(cfg.json + sae_weights.safetensors), a sparsify directory (cfg.json + "
                     "sae.safetensors), a Gemma Scope params.npz, a dictionary_learning ae.pt, "
                     "an e2e_sae checkpoint (final_config.yaml + samples_N.pt) or an OpenAI "
                     "sparse_autoencoder .pt state dict")


def resolve_sae_path(spec: str, *, cache_dir=None) -> str:
    """A local path for an SAE spec:

    * a path that exists here is returned as it is;
    * ``saelens://RELEASE/SAE_ID``: a SAELens pretrained release and SAE id (needs sae-lens
      installed), looked up in its directory and fetched as below;
    * ``hf://ORG/REPO[/SUBFOLDER...]``, or ``ORG/REPO/SUBFOLDER...`` when no such local path
      exists: a Hugging Face repo and the SAE's folder in it, fetched with
      ``huggingface_hub.snapshot_download`` (only that folder) into its cache; offline
      (``HF_HUB_OFFLINE=1``) it is served from the cache or reported missing.
    """
    if os.path.exists(spec):
        return spec
    if spec.startswith("saelens://"):
        release, _, sae_id = spec[len("saelens://"):].partition("/")
        try:
            from sae_lens.loading.pretrained_saes_directory import (
                get_pretrained_saes_directory)
        except ImportError:
            raise ValueError(f"{spec}: SAELens releases need sae-lens installed "
                             "(pip install sae-lens)") from None
        info = get_pretrained_saes_directory().get(release)
        if info is None:
            raise ValueError(f"{spec}: no SAELens release {release!r}")
        if sae_id not in info.saes_map:
            some = ", ".join(list(info.saes_map)[:3])
            raise ValueError(f"{spec}: release {release!r} has no SAE {sae_id!r} (it has "
                             f"{some}, ...)")
        return _hub_folder(info.repo_id, info.saes_map[sae_id], spec, cache_dir)
    hub = spec[len("hf://"):] if spec.startswith("hf://") else spec
    parts = [p for p in hub.split("/") if p]
    looks_local = spec.startswith((".", "/", "~")) or (parts and os.path.isdir(parts[0]))
    if spec.startswith("hf://") or (len(parts) >= 2 and not looks_local):
        return _hub_folder("/".join(parts[:2]), "/".join(parts[2:]), spec, cache_dir)
    raise FileNotFoundError(f"no SAE at {spec}: no such file or directory")


def _hub_folder(repo_id, folder, spec, cache_dir):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = snapshot_download(repo_id, allow_patterns=[f"{folder}/*"] if folder else None,
                                 cache_dir=cache_dir)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"no SAE at {spec!r} locally, and the Hugging Face repo "
                                f"{repo_id} could not be read ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    path = os.path.join(root, folder) if folder else root
    if not os.path.exists(path):
        raise FileNotFoundError(f"{spec}: the repo {repo_id} has no folder {folder!r}")
    return path


def load_sae(path: str, *, k: int | None = None, dtype=None, device=None,
             hook: str | None = None) -> SAE:
    """Loads an SAE saved by SAELens, sparsify, Gemma Scope, dictionary_learning, e2e_sae or
    OpenAI into the canonical :class:`SAE`.

    Args:
        path: the SAE's directory or file, a Hugging Face repo and folder
            (``org/repo/folder``, ``hf://org/repo/folder``) or a SAELens release
            (``saelens://release/sae_id``); see :func:`resolve_sae_path`.
        k: latents per token; required for ReLU/JumpReLU SAEs, overrides a TopK SAE's own k.
        dtype, device: optional conversion of the loaded tensors.
        hook: which SAE of a file holding several (e2e_sae: one per hook position).
    Returns:
        an :class:`SAE`; ``sae.format_info`` records the source format and config.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    path = resolve_sae_path(path)
    fmt = detect_format(path)
    if fmt == "e2e":
        sae, info = _load_e2e(path, k, hook)
    else:
        sae, info = _LOADERS[fmt](path, k)
    own_k = info.pop("own_k", None)
    if k is not None and own_k and int(own_k) != k:
        warnings.warn(f"k={k} replaces the k={int(own_k)} this TopK SAE was trained with "
                      f"({path}); its reconstructions change", stacklevel=2)
    check_finite(sae, path)
    sae.format_info = {"format": fmt, "path": os.path.abspath(path), **info}
    if dtype is not None or device is not None:
        sae = sae.to(dtype=dtype, device=device)
    return sae


def check_finite(sae: SAE, where: str = "the SAE") -> None:
    """Raises a ValueError naming each weight of ``sae`` that holds NaN or inf: one NaN in
    W_enc makes backends select different latents, one in W_dec makes every loss NaN."""
    bad = []
    for name, t in sae.named_parameters():
        n = int((~torch.isfinite(t.detach())).sum())
        if n:
            bad.append(f"{name} ({n} of {t.numel()})")
    if bad:
        raise ValueError(f"{where}: non-finite values (NaN/inf) in {', '.join(bad)}")


def load_safetensors(path) -> dict:
    """``safetensors.torch.load_file``, its errors (a truncated or corrupt file, a missing
    one) one line that names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt "
                         f"({' '.join(str(e).split())})") from None


def _load_saelens(path, k):
    cfg = _read_json(os.path.join(path, "cfg.json"))
    w = load_safetensors(os.path.join(path, "sae_weights.safetensors"))
    arch = cfg.get("architecture", "standard")
    own_k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" or own_k:
        k = k or own_k
    k = _need_k(k, f"this SAELens '{arch}' SAE")
    b_dec = w["b_dec"]
    sae = SAE(w["W_enc"].T.contiguous(), w["b_enc"], w["W_dec"], b_dec, int(k),
              b_pre=b_dec if cfg.get("apply_b_dec_to_input", False) else None,
              threshold=w.get("threshold") if arch == "jumprelu" else None)
    meta = cfg.get("metadata") or {}
    return sae, {"hook_name": meta.get("hook_name", cfg.get("hook_name")),
                 "neuronpedia_id": meta.get("neuronpedia_id", cfg.get("neuronpedia_id")),
                 "architecture": arch, "cfg": cfg, "own_k": own_k if arch == "topk" else None}


def _sparsify_hookpoint(path):
    # sparsify saves each SAE in a folder named by its hookpoint (``layers.6``, ``h.6.mlp``)
    base = os.path.basename(os.path.normpath(path))
    return base if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", base) else None


def _load_sparsify(path, k):
    cfg = _read_json(os.path.join(path, "cfg.json"))
    w = load_safetensors(os.path.join(path, "sae.safetensors"))
    if "W_skip" in w:
        raise ValueError("sparsify SAEs with a skip connection (W_skip) are not supported yet")
    b_dec = w["b_dec"]
    sae = SAE(w["encoder.weight"], w["encoder.bias"], w["W_dec"], b_dec, int(k or cfg["k"]),
              b_pre=None if cfg.get("transcode", False) else b_dec)
    return sae, {"hook_name": _sparsify_hookpoint(path), "neuronpedia_id": None,
                 "architecture": "topk", "cfg": cfg, "own_k": cfg.get("k")}


def _load_gemmascope(path, k):
    f = path if path.endswith(".npz") else os.path.join(path, "params.npz")
    with np.load(f, allow_pickle=False) as z:
        t = {name: torch.from_numpy(np.ascontiguousarray(z[name])) for name in z.files}
    sae = SAE(t["W_enc"].T.contiguous(), t["b_enc"], t["W_dec"], t["b_dec"],
              _need_k(k, "a Gemma Scope JumpReLU SAE"), threshold=t["threshold"])
    return sae, {"hook_name": None, "neuronpedia_id": None, "architecture": "jumprelu", "cfg": {}}


def _load_pt(f):
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpicklable object is refused, not executed
        raise ValueError(f"{f}: not a plain state dict loadable with weights_only=True ({e})")


def _load_dictionary_learning(path, k):
    d = path if os.path.isdir(path) else os.path.dirname(path)
    f = os.path.join(path, "ae.pt") if os.path.isdir(path) else path
    w = _load_pt(f)
    cfg_path = os.path.join(d, "config.json")
    cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    trainer = cfg.get("trainer", {})
    info = {"hook_name": trainer.get("submodule_name"), "neuronpedia_id": None, "cfg": cfg}
    if "W_enc" in w:  # JumpReluAutoEncoder
        b_dec = w["b_dec"]
        apply_b = bool(trainer.get("apply_b_dec_to_input", False))
        sae = SAE(w["W_enc"].T.contiguous(), w["b_enc"], w["W_dec"], b_dec,
                  _need_k(k, "a dictionary_learning JumpReLU SAE"),
                  b_pre=b_dec if apply_b else None, threshold=w["threshold"])
        return sae, {**info, "architecture": "jumprelu"}
    W_enc, b_enc, W_dec = w["encoder.weight"], w["encoder.bias"], w["decoder.weight"].T
    if "b_dec" in w:  # AutoEncoderTopK
        own_k = w.get("k", trainer.get("k"))
        kk = int(k or (int(own_k) if own_k is not None else 0)) or None
        b_dec = w["b_dec"]
        sae = SAE(W_enc, b_enc, W_dec.contiguous(), b_dec, _need_k(kk, "this TopK SAE"),
                  b_pre=b_dec)
        return sae, {**info, "architecture": "topk", "own_k": own_k}
    b_dec = w["bias"]  # AutoEncoder (ReLU): relu(encoder(x - bias)), decoder(f) + bias
    sae = SAE(W_enc, b_enc, W_dec.contiguous(), b_dec,
              _need_k(k, "a dictionary_learning ReLU SAE"), b_pre=b_dec)
    return sae, {**info, "architecture": "relu"}


def _load_openai(path, k):
    w = _load_pt(path)
    act = w.get("activation", "ReLU")
    own_k = (w.get("activation_state_dict") or {}).get("k")
    kk = k or (int(own_k) if act == "TopK" and own_k is not None else None)
    pre_bias = w["pre_bias"]  # subtracted before encoding and added back after decoding
    sae = SAE(w["encoder.weight"], w["latent_bias"], w["decoder.weight"].T.contiguous(),
              pre_bias, _need_k(kk, f"this OpenAI {act} SAE"), b_pre=pre_bias)
    return sae, {"hook_name": None, "neuronpedia_id": None,
                 "architecture": "topk" if act == "TopK" else "relu", "cfg": {},
                 "own_k": own_k if act == "TopK" else None}


def _load_e2e(path, k, hook):
    """e2e_sae (PyPI ``e2e-sae``): ``final_config.yaml`` + ``samples_N.pt``, the state dict of
    its ``saes`` ModuleDict, one SAE per hook position (``blocks-6-hook_resid_pre``):
    ``encoder.0`` (Linear + ReLU, no input bias) and ``decoder`` (weight [D, S], used column-
    normalised, and bias)."""
    if os.path.isdir(path):
        pts = [f for f in os.listdir(path) if f.endswith(".pt")]

        def n_samples(f):
            tail = f[:-3].split("_")[-1]
            return int(tail) if tail.isdigit() else -1
        f = os.path.join(path, max(pts, key=n_samples))
    else:
        f = path
    w = _load_pt(f)
    positions = sorted({key.split(".encoder.0.weight")[0] for key in w
                        if key.endswith(".encoder.0.weight")})
    names = {p.replace("-", "."): p for p in positions}
    if hook is None:
        if len(positions) != 1:
            raise ValueError(f"{path} holds SAEs at {', '.join(names)}: pass hook=... (--sae "
                             "with one of them)")
        pos = positions[0]
    else:
        if hook not in names:
            raise ValueError(f"{path} has no SAE at {hook!r} (it has {', '.join(names)})")
        pos = names[hook]
    W_dec = w[f"{pos}.decoder.weight"]
    W_dec = (W_dec / W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)).T.contiguous()
    sae = SAE(w[f"{pos}.encoder.0.weight"], w[f"{pos}.encoder.0.bias"], W_dec,
              w[f"{pos}.decoder.bias"], _need_k(k, "an e2e_sae ReLU SAE"))
    cfg = {}
    cfg_path = os.path.join(os.path.dirname(f), "final_config.yaml")
    if os.path.exists(cfg_path):
        import yaml

        with open(cfg_path) as fh:
            cfg = yaml.safe_load(fh) or {}
    return sae, {"hook_name": pos.replace("-", "."), "neuronpedia_id": None,
                 "architecture": "relu", "cfg": cfg}


_LOADERS = {"saelens": _load_saelens, "sparsify": _load_sparsify,
            "gemmascope": _load_gemmascope, "dictionary_learning": _load_dictionary_learning,
            "openai": _load_openai}


def content_hash(path: str) -> str:
    """sha256 over the SAE's files (sorted names + bytes): identifies the exact weights."""
    import hashlib

    h = hashlib.sha256()
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path)
             else [path])
    for f in files:
        if os.path.isfile(f):
            h.update(os.path.basename(f).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def save_saelens(sae: SAE, path: str, *, hook_name: str | None = None, **cfg_extra) -> None:
    """Writes ``sae`` as a SAELens directory (cfg.json + sae_weights.safetensors).

    A b_pre tied to b_dec is saved as ``apply_b_dec_to_input``; an untied b_pre cannot be
    expressed in SAELens' format and raises.
    """
    from ._safetensors import Transposed, write_safetensors

    if sae.b_pre is not None and not sae.tied_b_pre:
        raise ValueError("SAELens has no separate input bias: b_pre must be tied to b_dec "
                         "(or None) to save in this format")
    os.makedirs(path, exist_ok=True)
    arch = "jumprelu" if sae.threshold is not None else "topk"
    # written from the weights' own memory (W_enc's transpose a block at a time): saving a
    # large dictionary needs no second copy of it
    t = {"W_enc": Transposed(sae.W_enc), "b_enc": sae.b_enc, "W_dec": sae.W_dec,
         "b_dec": sae.b_dec}
    if sae.threshold is not None:
        t["threshold"] = sae.threshold
    write_safetensors(os.path.join(path, "sae_weights.safetensors"), t)
    cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
           "apply_b_dec_to_input": sae.tied_b_pre, "dtype": str(sae.W_enc.dtype).split(".")[-1],
           "metadata": {"hook_name": hook_name}, **cfg_extra}
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def save_sparsify(sae: SAE, path: str, **cfg_extra) -> None:
    """Writes ``sae`` as a sparsify directory (cfg.json + sae.safetensors).

    sparsify encodes ``x - b_dec`` (or ``x`` with ``transcode``); an untied b_pre and JumpReLU
    thresholds cannot be expressed and raise.
    """
    from safetensors.torch import save_file

    if sae.b_pre is not None and not sae.tied_b_pre:
        raise ValueError("sparsify subtracts b_dec itself: b_pre must be tied to b_dec or None")
    if sae.threshold is not None:
        raise ValueError("sparsify SAEs are TopK: a JumpReLU threshold cannot be saved")
    os.makedirs(path, exist_ok=True)
    t = {"encoder.weight": sae.W_enc.detach(), "encoder.bias": sae.b_enc.detach(),
         "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    save_file({n: v.cpu().contiguous() for n, v in t.items()},
              os.path.join(path, "sae.safetensors"))
    cfg = {"num_latents": sae.d_sae, "k": sae.k, "d_in": sae.d_in,
           "transcode": sae.b_pre is None, "normalize_decoder": True, "multi_topk": False,
           "skip_connection": False, **cfg_extra}
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)
