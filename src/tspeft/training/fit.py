"""Fitting: transformers' `Trainer` with the τ-rule callback and checkpoints that hold the adapter.

    training_args = training_arguments(cfg, plan, checkpoints, device)
    fitted = fit(model, tokenizer, task_data, plan, training_args, out, resume)

Under torchrun / accelerate launch every process fits (DDP: global batch = processes × batch_size); the
`TrainingArguments` set up torch.distributed and say which process is the main one.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .callback import ThresholdCallback
from .data import ListDataset, TaskData
from .defaults import DEFAULTS
from .probe import fit_frozen_probe
from .run_config import TrainConfig, TrainPlan
from .run_folder import TRAIN_LOG, load_checkpoint_into, save_adapter, write_json_lines


class TSTrainer(Trainer):
    """Trainer whose checkpoints/`save_model` store the adapter (TSPeftModel is not a PreTrainedModel).

    `_save` writes the run folder's adapter format (only where `args.should_save`, i.e. the main process);
    `_load_from_checkpoint` reads it back in place for `train(resume_from_checkpoint=...)`: adapter weights
    and, for ts-*, τ, the τ-rule state and `rule_step`. The optimizer, scheduler, RNG and TrainerState are
    saved and restored by the Trainer itself. lora/dora checkpoints are peft folders: the Trainer loads them.
    """

    method: str = "ts-lora"

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        save_adapter(self.accelerator.unwrap_model(self.model), self.method, output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not load_checkpoint_into(target, Path(resume_from_checkpoint), self.method):
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def training_arguments(cfg: TrainConfig, plan: TrainPlan, checkpoints: Path,
                       device: torch.device) -> TrainingArguments:
    """The run's `TrainingArguments`. Build them first, also when nothing is trained: under a launcher they set
    up torch.distributed (accelerate's PartialState) and name the main process, the only one that writes."""
    return TrainingArguments(
        output_dir=str(checkpoints), seed=cfg.seed, learning_rate=plan.lr, num_train_epochs=plan.epochs,
        max_steps=plan.max_steps if plan.max_steps else -1, per_device_train_batch_size=plan.batch_size,
        weight_decay=DEFAULTS.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        # transformers 5 names: a warm-up ratio is a warmup_steps value below 1; gradient = activation checkpointing
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        activation_checkpointing=cfg.gradient_checkpointing,
        warmup_steps=cfg.warmup_ratio or 0.0, lr_scheduler_type=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps or DEFAULTS.logging_steps,
        logging_first_step=True, remove_unused_columns=False, report_to=[],
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        disable_tqdm=False, use_cpu=device.type == "cpu", label_names=["labels"], dataloader_num_workers=0,
        bf16=bool(cfg.bf16),
        # DDP would otherwise copy rank 0's buffers into every rank before each forward, overwriting the other
        # ranks' token counts and r histograms before they are all-reduced. τ and the τ-rule state need no
        # broadcast: every rank computes them from the same all-reduced statistics.
        ddp_broadcast_buffers=False,
        # Each rank's loss is its own batch mean and DDP averages the gradients (the τ rule averages its band sums
        # the same way). The default (True) multiplies the loss by the number of processes for models whose
        # forward takes **kwargs, expecting them to divide by the global token count; BERT's classification loss
        # does not, so the loss and every gradient came out N times too large.
        average_tokens_across_devices=False)


@dataclass(frozen=True)
class Fitted:
    """What fitting returns: the trained model (as the Trainer left it) and how the training went."""

    model: nn.Module
    train_seconds: float = 0.0
    train_steps: int = 0
    final_loss: float | None = None
    details: dict | None = None  # metrics.json entries of the fit (the frozen probe: {"probe": ...})


def _count_tokens(values, mask: bool = True) -> int:
    """Real tokens of a feature: the ones of its attention mask (`mask`), else every id (a list, or one list per
    choice)."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if values and isinstance(values[0], (list, tuple, torch.Tensor)):
        return sum(_count_tokens(v, mask) for v in values)
    return sum(1 for v in values if v) if mask else len(values)


def calibration_features(features: list[dict], token_budget: int = DEFAULTS.calibration_tokens) -> list[dict]:
    """The calibration examples' inputs (no labels: τ needs none), the first ones up to `token_budget` real tokens.
    On a decoder 640 prompts made calibration cost twice the training itself (trec_gen, docs/method.md); a kept
    share estimated from 16k tokens has a binomial error of at most 0.004, well inside the ±0.02 target."""
    chosen, tokens = [], 0
    for feature in features:
        if tokens >= token_budget:
            break
        chosen.append({k: v for k, v in feature.items() if k != "labels"})
        if "attention_mask" in feature:
            tokens += _count_tokens(feature["attention_mask"])
        else:  # no mask: every id is real (id 0 included)
            tokens += _count_tokens(feature.get("input_ids", []), mask=False)
    return chosen


def fit(model: nn.Module, tokenizer, task_data: TaskData, plan: TrainPlan, training_args: TrainingArguments,
        out: Path, resume: str | None) -> Fitted:
    """Train `model` on `task_data.train` (nothing to do for zero-shot runs or an empty train set)."""
    if not plan.trains or not task_data.train:
        return Fitted(model)
    if plan.frozen_probe:  # `none` on an encoder classification task: the fitted probe, no Trainer
        start = time.perf_counter()
        classifier, probe = fit_frozen_probe(model.to(training_args.device), tokenizer, task_data, plan.max_length,
                                             plan.eval_batch_size)
        if out is not None and training_args.process_index == 0:  # every run has a training log: the fit's loss
            write_json_lines(out / TRAIN_LOG, [{"step": 0, "loss": probe.final_loss, "probe_l2": probe.l2}])
        return Fitted(classifier, time.perf_counter() - start, 0, probe.final_loss, {"probe": probe.to_json()})
    kind = task_data.kind
    features = kind.features(tokenizer, task_data.train, plan.max_length)
    # Trainer reads model.is_gradient_checkpointing through TSPeftModel's attribute forwarding: not our warning
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    collate = kind.collator(tokenizer)
    calibration, held_out = None, []
    if plan.gated and task_data.calibration:  # examples of the pool the run does not train on (data.py)
        held_out = calibration_features(kind.features(tokenizer, task_data.calibration, plan.max_length))
        calibration = [collate(held_out[i:i + plan.batch_size]) for i in range(0, len(held_out), plan.batch_size)]
    trainer = TSTrainer(model=model, args=training_args, train_dataset=ListDataset(features), data_collator=collate,
                        callbacks=[ThresholdCallback(model, out_dir=out, calibration_data=calibration)])
    trainer.method = plan.method
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    checkpoints = Path(training_args.output_dir)
    if training_args.process_index == 0 and checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    return Fitted(trainer.model, seconds, trainer.state.global_step, result.training_loss,
                  {"calibration_examples": len(held_out)} if plan.gated else None)
