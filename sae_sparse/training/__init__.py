"""Training sparse latent adapters (or baselines) on a frozen causal LM, one concern per module:

* ``config``   -- the edit spec (``parse_edit``) and ``TrainConfig``
* ``data``     -- JSONL records, tokenizing, collation, the resumable order and warmup
* ``losses``   -- cross-entropy, KL to a teacher, the L1 penalty
* ``parallel`` -- data-parallel helpers over torch.distributed
* ``run_dir``  -- fingerprints, checkpoints and the resume decision
* ``trainer``  -- ``train_adapter`` and ``evaluate``
* ``adapters`` -- save, load, ``attach_run`` and ``merge_bias_edit`` of a finished run

    result = train_adapter(model, tokenizer, {"transformer.h.1": sae}, "data.jsonl", "runs/x",
                           TrainConfig(edit="gain,bias,ffn:16", steps=300))

A run directory holds ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT-like: the
SAE's format, path, content hash and hook point are recorded), ``metrics.json``, the eval split
``eval.jsonl`` and, while training, ``checkpoint/`` from which a rerun resumes exactly.
"""
from .adapters import attach_run, load_adapter, load_run_saes, merge_bias_edit, save_adapter
from .config import CONFIG_NAME, LOSSES, POSITIONS, WEIGHTS_NAME, TrainConfig, parse_edit
from .data import Example, Schedule, collate, collate_teacher, load_jsonl, tokenize, warmup_lr
from .losses import (kl_loss, l1_penalty, latent_group_norms, lm_loss, shrink_latents,
                     teacher_logprobs)
from .run_dir import RunMismatch, TrainingInterrupted, check_run_dir, run_fingerprint
from .few_latents import rank_latents, train_few_latents
from .trainer import build_trainables, evaluate, train_adapter

__all__ = ["rank_latents", "train_few_latents", "CONFIG_NAME", "LOSSES", "POSITIONS", "WEIGHTS_NAME", "Example", "RunMismatch",
           "Schedule", "TrainConfig", "TrainingInterrupted", "attach_run", "build_trainables",
           "check_run_dir", "collate", "collate_teacher", "evaluate", "kl_loss",
           "l1_penalty", "latent_group_norms", "shrink_latents",
           "lm_loss", "load_adapter", "load_jsonl", "load_run_saes", "merge_bias_edit",
           "parse_edit", "run_fingerprint", "save_adapter", "teacher_logprobs", "tokenize",
           "train_adapter", "warmup_lr"]
