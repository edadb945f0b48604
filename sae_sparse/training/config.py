"""What a training run is asked to do: the edit spec (``parse_edit``) and ``TrainConfig``,
whose fields' comments are their documentation.
"""
from __future__ import annotations

import dataclasses

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
    edit: str = "gain,bias,ffn:16"
    mode: str = "delta"
    baseline: str | None = None  # None (sparse SAE adapter), "dense", or "lora:R"
    latents: list | None = None  # restrict the edit to these latent ids (masked-sparse variant)
    edit_positions: str = "all"  # "all" | "prompt" | "completion"
    # leave each sequence's first positions unedited: 1 for the attention sink of most
    # pretrained LMs (a residual ~100x the others', where the SAE's code is meaningless)
    skip_first: int = 0
    # "ce": next-token cross-entropy on the completion tokens. "kl": distillation,
    # KL(teacher ‖ student) per completion token, the teacher being the frozen model with its
    # edits off reading each record's ``teacher_prompt`` (e.g. the prompt with a system
    # prompt) + the same completion, or a separate ``teacher`` model (train_adapter)
    loss: str = "ce"
    l1: float = 1e-3  # L1 on gain, bias and W_out (scaled by decoder norms): keeps edits sparse
    lr: float = 1e-2
    # the learning rate rises linearly from lr/warmup_steps to lr over the first warmup_steps
    # steps (a function of the step alone: a resumed run follows the same schedule). Adam's
    # first steps move every weight with a gradient by about lr, which for an FFN's dense
    # W_out [H, S] is a large edit at once
    warmup_steps: int = 0
    weight_decay: float = 0.0
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 128
    eval_frac: float = 0.1
    eval_every: int = 50
    # the loss is read back from the device (a host sync) every this many steps, not every
    # micro-step; also at evals, checkpoints and the end
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    backend: str | None = None
    bf16: bool | None = None  # autocast to bf16; None = on CUDA only

    def validate(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.edit_positions not in POSITIONS:
            raise ValueError(f"edit_positions must be one of {POSITIONS}")
        if not isinstance(self.skip_first, int) or self.skip_first < 0:
            raise ValueError(f"skip_first must be an int >= 0, got {self.skip_first!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.baseline is not None and self.baseline != "dense" and not (
                self.baseline.startswith("lora:") and self.baseline[5:].isdigit()):
            raise ValueError(f"baseline must be None, 'dense' or 'lora:R', got {self.baseline!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.latents is not None and (not self.latents or any(
                not isinstance(i, int) or i < 0 for i in self.latents)):
            raise ValueError("latents must be a non-empty list of non-negative latent ids")
        if not 0 <= self.eval_frac < 1:
            raise ValueError("eval_frac must be in [0, 1)")
        parse_edit(self.edit)
