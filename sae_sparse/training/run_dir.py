"""A run directory's safety: the fingerprint of a run's inputs, what changed since a
checkpoint, the resume / overwrite decision, checkpoints and Ctrl-C's exception.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .config import CONFIG_NAME, WEIGHTS_NAME


def trainable_state(trainables):
    return {f"{h}.{n}": p.detach().cpu().contiguous() for h, t in trainables.items()
            for n, p in t.named_parameters()}


def load_trainable_state(trainables, tensors):
    for h, t in trainables.items():
        for n, p in t.named_parameters():
            with torch.no_grad():
                p.copy_(tensors[f"{h}.{n}"])


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train_adapter`: the step in flight was finished and a checkpoint
    saved; rerunning the same call resumes from it."""

    def __init__(self, step, checkpoint):
        super().__init__(f"interrupted after step {step}; checkpoint saved in {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class RunMismatch(ValueError):
    """The run directory holds a run of other data, model, SAEs or configuration."""


RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, "metrics.json", "eval.jsonl", "train.jsonl",
             "student_answers.jsonl", "report.md", "report.json")


def _sha256_bytes(chunks) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _file_sha256(path):
    with open(path, "rb") as f:
        return _sha256_bytes(iter(lambda: f.read(1 << 20), b""))


def _tensor_sha256(tensors):
    return _sha256_bytes(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                         for t in tensors)


def run_fingerprint(model, saes, data, *, sae_sources=None, model_source=None) -> dict:
    """What a checkpoint must have been trained on to be resumed: the data (sha256 of the
    JSONL file, or of the records), the model (its source, type and parameter count; not a
    hash of its weights, which would read gigabytes on every start) and each SAE (the sha256
    of its files when they are known, else of its weights). A model built on the meta device
    from the same config has the same fingerprint (the CLI checks a run directory before
    loading any weight)."""
    if isinstance(data, str):
        d = _file_sha256(data)
    else:
        d = _sha256_bytes([json.dumps(list(data), sort_keys=True).encode()])
    m = model_summary(model, model_source)
    sa = {}
    for h, sae in saes.items():
        src = (sae_sources or {}).get(h) or {}
        sa[h] = src.get("sha256") or _tensor_sha256(
            [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec] + (
                [sae.threshold] if sae.threshold is not None else []))
    return {"data_sha256": d, "model": m, "sae_sha256": sa}


def model_summary(model, source):
    conf = getattr(model, "config", None)
    return {"source": source or getattr(conf, "_name_or_path", None) or None,
            "model_type": getattr(conf, "model_type", None),
            "n_params": sum(p.numel() for p in model.parameters())}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    out = []
    if old.get("data_sha256") != new["data_sha256"]:
        out.append("the data (sha256 %s… now %s…)" % (str(old.get("data_sha256"))[:8],
                                                      new["data_sha256"][:8]))
    om, nm = old.get("model") or {}, new["model"]
    if om != nm:
        out.append(f"the model ({om.get('source')}, {om.get('model_type')}, "
                   f"{om.get('n_params')} parameters -> {nm['source']}, {nm['model_type']}, "
                   f"{nm['n_params']} parameters)")
    if old.get("teacher") != new.get("teacher"):
        out.append(f"the teacher model ({old.get('teacher')} -> {new.get('teacher')})")
    osa, nsa = old.get("sae_sha256") or {}, new["sae_sha256"]
    if set(osa) != set(nsa):
        out.append(f"the hooks ({sorted(osa)} -> {sorted(nsa)})")
    else:
        out += [f"the SAE at {h} (sha256 {osa[h][:8]}… now {nsa[h][:8]}…)"
                for h in sorted(nsa) if osa[h] != nsa[h]]
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    # settings added since a checkpoint was written count as their defaults
    added = {"loss": "ce", "warmup_steps": 0}
    a, b = {**added, **_resumable(old)}, {**added, **_resumable(new)}
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def clear_run(out_dir, everything):
    import shutil

    shutil.rmtree(os.path.join(out_dir, "checkpoint"), ignore_errors=True)
    if everything:
        for f in os.listdir(out_dir):
            if f in RUN_FILES or (f.endswith(".png") and os.path.isfile(os.path.join(out_dir, f))):
                os.remove(os.path.join(out_dir, f))


def check_run_dir(out_dir, cfg, fingerprint, *, resume, overwrite):
    """-> the checkpoint state to resume from, or None; RunMismatch when ``out_dir`` holds
    another run and neither ``overwrite`` nor ``resume=False`` allows replacing it."""
    ckpt = os.path.join(out_dir, "checkpoint", "state.pt")
    if overwrite:
        return None
    if os.path.exists(ckpt):
        if not resume:
            return None
        state = torch.load(ckpt, weights_only=True)
        changes = config_changes(state["config"], dataclasses.asdict(cfg))
        if state.get("fingerprint"):
            changes = fingerprint_changes(state["fingerprint"], fingerprint) + changes
        if changes:
            raise RunMismatch(f"{out_dir} holds a run trained with other settings: "
                              f"{'; '.join(changes)}. Use a new --out, or --overwrite to "
                              "replace that run")
        return state
    if resume and os.path.exists(os.path.join(out_dir, CONFIG_NAME)):
        raise RunMismatch(f"{out_dir} holds a finished run without a checkpoint to check it "
                          "against; use a new --out, or --overwrite to replace it")
    return None


def _resumable(conf: dict) -> dict:
    # Everything but the step budget and logging cadence must match to resume a run.
    return {k: v for k, v in conf.items()
            if k not in ("steps", "eval_every", "checkpoint_every", "log_every")}


def save_checkpoint(ckpt, trainables, opt, history, step, cfg, fingerprint):
    from safetensors.torch import save_file

    os.makedirs(ckpt, exist_ok=True)
    tmp = os.path.join(ckpt, "trainable.safetensors.tmp")
    save_file(trainable_state(trainables), tmp)
    os.replace(tmp, os.path.join(ckpt, "trainable.safetensors"))
    tmp = os.path.join(ckpt, "state.pt.tmp")
    torch.save({"optimizer": opt.state_dict(), "history": history, "step": step,
                "config": dataclasses.asdict(cfg), "fingerprint": fingerprint}, tmp)
    os.replace(tmp, os.path.join(ckpt, "state.pt"))
