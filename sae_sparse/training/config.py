"""What a training run is asked to do: the edit spec (``parse_edit``) and ``TrainConfig``,
whose fields carry their documentation, which is also their command-line help (``option``).
"""
from __future__ import annotations

import argparse
import dataclasses

from .. import argtypes
from ..argtypes import option
from ..reference import ACTIVATIONS, MODES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
POSITIONS = ("all", "prompt", "completion")
LOSSES = ("ce", "kl")


def parse_edit(spec: str) -> dict:
    """``"gain,bias,ffn:16"`` -> LatentAdapter kwargs. ``ffn:H[:act]``; ``lowrank:R`` is
    ``ffn:R:identity`` (a rank-R linear map in latent space)."""
    out = dict(gain=False, bias=False, ffn=False, hidden=16, activation="relu")
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, *args = part.split(":")
        if name in ("gain", "bias") and not args:
            out[name] = True
        elif name in ("ffn", "lowrank") and len(args) <= 2:
            out["ffn"] = True
            if args:
                if not args[0].isdigit() or int(args[0]) < 1:
                    raise ValueError(f"edit {part!r}: the width must be a positive integer")
                out["hidden"] = int(args[0])
            act = args[1] if len(args) == 2 else ("identity" if name == "lowrank" else "relu")
            if act not in ACTIVATIONS:
                raise ValueError(f"edit {part!r}: activation must be one of {ACTIVATIONS}")
            out["activation"] = act
        else:
            raise ValueError(f"unknown edit {part!r}: use gain, bias, ffn:H[:relu|gelu|identity] "
                             "or lowrank:R, comma-separated")
    if not (out["gain"] or out["bias"] or out["ffn"]):
        raise ValueError("edit spec names no edit")
    return out


@dataclasses.dataclass
class TrainConfig:
    """How ``train_adapter`` trains; each field's ``help`` is its ``sae-sparse train`` flag's."""

    edit: str = option("gain,bias,ffn:16", "adapter kinds: gain, bias, "
                       "ffn:H[:relu|gelu|identity], lowrank:R")
    mode: str = option("delta", "delta: y = x + (z' - z) W_dec; replace: y = z' W_dec + b_dec",
                       choices=MODES)
    baseline: str | None = option(None, "train a baseline instead: lora:R (residual LoRA) or "
                                  "dense (the same adapter on dense latents)")
    latents: list | dict | None = option(None, "restrict the edit to these latent ids (the "
                                  "masked-sparse variant)", flag=False)
    edit_positions: str = option("all", "which tokens the edit applies to", choices=POSITIONS)
    skip_first: int | str = option(
        "auto", "leave each sequence's first N positions unedited. auto: the leading "
        "positions whose residual norm at the hook is an outlier on the training data (the "
        "attention sink of most pretrained LMs, whose SAE code is meaningless; "
        "sinks.sink_positions), 0 where there is none", type=argtypes.auto_nonneg_int,
        metavar="N|auto")
    loss: str = option("ce", "ce: cross-entropy on the completions; kl: distil a teacher, the "
                       "model itself with the edits off reading each record's "
                       "'teacher_prompt' (e.g. with a system prompt), or a separate teacher "
                       "model (train_adapter's teacher=): KL(teacher || student) per "
                       "completion token", choices=LOSSES)
    l1: float = option(1e-3, "L1 penalty on gain, bias and W_out, scaled by decoder norms "
                       "(keeps the edit sparse)", type=argtypes.nonneg_float)
    l1_group: float = option(0.0, "group lasso over latents, applied after each AdamW step "
                             "as a decoupled shrinkage (as AdamW's weight decay is): each "
                             "latent's parameters (gain, bias and W_out scaled by decoder "
                             "norms, its W_in row) shrink together by lr x this in norm, and a "
                             "latent below it becomes exactly zero: the edit concentrates on "
                             "few latents (W_in then starts at 1/100 of its usual scale, so "
                             "that no latent's group starts large)",
                             type=argtypes.nonneg_float)
    lr: float = option(1e-2, "AdamW learning rate", type=argtypes.nonneg_float)
    warmup_steps: int | str = option(
        "auto", "linear learning-rate warmup over the first N steps, a function of the step "
        "alone (a resumed run follows it). auto: a tenth of --steps when the edit has an FFN "
        "(whose first Adam steps are otherwise a large dense edit), else 0",
        type=argtypes.auto_nonneg_int, metavar="N|auto")
    weight_decay: float = option(0.0, "AdamW weight decay", type=argtypes.nonneg_float)
    steps: int = option(200, "optimizer steps", type=argtypes.positive)
    batch_size: int = option(8, "records per micro-batch (the global batch under torchrun)",
                             type=argtypes.positive)
    grad_accum: int = option(1, "micro-batches per optimizer step", type=argtypes.positive)
    max_len: int = option(128, "tokens kept per record (longer records are truncated, with a "
                          "warning)", type=argtypes.positive)
    eval_frac: float | str = option(
        "auto", "fraction of the records held out for evaluation. auto: a tenth, but at least "
        "min(32, a fifth of the records) and at most 256 (a KL or loss on 4 records says "
        "little)", type=argtypes.auto_fraction, metavar="F|auto")
    eval_every: int = option(50, "evaluate every N steps", type=argtypes.positive)
    log_every: int = option(10, "read the training loss back from the device (a host sync) "
                            "every N steps, and at evals, checkpoints and the end (a "
                            "non-finite loss stops the run then)", type=argtypes.positive)
    checkpoint_every: int = option(50, "save a resumable checkpoint every N steps (and on "
                                   "Ctrl-C)", type=argtypes.positive)
    seed: int = option(0, "seed of the data split, order and initialisation", type=int)
    backend: str | None = option(None, "kernel backend (default: the best available)",
                                 choices=("torch", "cpp", "triton"))
    bf16: bool | None = option(None, "bf16 autocast (default: on CUDA only)",
                               action=argparse.BooleanOptionalAction)

    def validate(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.edit_positions not in POSITIONS:
            raise ValueError(f"edit_positions must be one of {POSITIONS}")
        for name in ("skip_first", "warmup_steps"):
            v = getattr(self, name)
            if v != "auto" and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be an int >= 0 or 'auto', got {v!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.baseline is not None and self.baseline != "dense" and not (
                self.baseline.startswith("lora:") and self.baseline[5:].isdigit()):
            raise ValueError(f"baseline must be None, 'dense' or 'lora:R', got {self.baseline!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.latents is not None:
            lists = self.latents.values() if isinstance(self.latents, dict) else [self.latents]
            if not lists or any(not ids or any(not isinstance(i, int) or i < 0 for i in ids)
                                for ids in lists):
                raise ValueError("latents must be a non-empty list of non-negative latent ids "
                                 "(or {hook: such a list})")
        if self.eval_frac != "auto" and not (isinstance(self.eval_frac, (int, float))
                                             and 0 <= self.eval_frac < 1):
            raise ValueError(f"eval_frac must be in [0, 1) or 'auto', got {self.eval_frac!r}")
        parse_edit(self.edit)

    def warmup(self) -> int:
        """The warmup in steps (``warmup_steps``, resolved)."""
        if self.warmup_steps != "auto":
            return self.warmup_steps
        return max(1, self.steps // 10) if self.baseline is None and parse_edit(
            self.edit)["ffn"] else 0

    def eval_count(self, n: int) -> int:
        """How many of ``n`` records are held out for evaluation (``eval_frac``, resolved)."""
        if n < 2:
            return 0
        if self.eval_frac != "auto":
            return int(round(self.eval_frac * n))
        return min(max(round(0.1 * n), min(32, n // 5)), 256)
