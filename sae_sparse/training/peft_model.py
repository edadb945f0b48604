"""A PEFT model (e.g. ``get_peft_model(model, LoraConfig(...))``) trained by the same trainer
as the sparse edits -- the same data order, loss, teacher, warmup, evaluation, checkpoints and
resume -- so a comparison with PEFT's LoRA differs in the adapter alone:

    train_adapter(peft_model, tokenizer, {}, data, "runs/lora", TrainConfig(loss="kl"))

Its trainable parameters are the ones that require a gradient when training starts; the
teacher (``loss="kl"`` without a separate teacher) is the model with the adapter disabled, as
the sparse edits' teacher is the model with the edits off. The run directory holds PEFT's own
``save_pretrained`` files (``PeftModel.from_pretrained`` loads them) and ``metrics.json``.
"""
from __future__ import annotations

import contextlib

NAME = "peft"


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class PeftTrainable:
    """The PEFT model's trainable parameters, where the trainer expects an adapter."""

    def __init__(self, model):
        self.model = model
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self._named:
            raise ValueError("the PEFT model has no parameter that requires a gradient")

    def named_parameters(self):
        return iter(self._named)

    def parameters(self):
        return (p for _, p in self._named)

    def requires_grad_(self):
        for _, p in self._named:
            p.requires_grad_(True)


class PeftEdits:
    """What the trainer asks of attached edits, for a PEFT model: ``disabled()`` turns the
    adapter off (the teacher, the unedited evaluation); token masks and overflow counts do
    not apply."""

    overflow: dict = {}

    def __init__(self, model):
        self.model = model
        self.overflow = {}

    def disabled(self):
        return self.model.disable_adapter()

    def token_mask(self, mask):
        if mask is not None:
            raise ValueError("edit_positions other than 'all' needs sparse edits, not PEFT")
        return contextlib.nullcontext()

    def counting_overflow(self, attn):
        return contextlib.nullcontext()

    def remove(self):
        pass
