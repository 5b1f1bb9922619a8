"""Train and evaluate one run: resolve the configuration, build the model, fit, measure, write the run folder.

    metrics = train(TrainConfig(task="rotten_tomatoes", method="ts-lora", out="runs/rt"))

The pieces: `run_config` (the configuration and its resolution, once, into a `TrainPlan`), `build` (the base
model and the method's adapter), `fit` (transformers' Trainer with the τ-rule callback), `measure` (accuracy,
kept fraction, token masks / statistics on the eval set), `run_folder` (every file a run writes, adapter and
checkpoint I/O). Defaults live in `tspeft.training.defaults` and in the task kinds (`tspeft.tasks.kinds`).
Evaluating a saved run: `tspeft.training.evaluate.evaluate`.

Under torchrun / accelerate launch every process runs `train()` and only the main one writes (see `train`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from torch import nn
from transformers import set_seed

from ..core.model import TSPeftModel
from . import staging
from .build import build_for_plan, load_base
from .data import TaskData, column_names, load_data
from .fit import Fitted, fit, training_arguments
from .measure import measure_run
from .run_config import TrainConfig, TrainPlan, check_method, precision, resolve_device, resolve_train
from .run_folder import (
    CHECKPOINTS,
    LABELS,
    METRICS,
    PREDICTIONS,
    json_safe,
    resolve_checkpoint,
    save_adapter,
    write_json,
)
from .wrappers import unwrap_ts_model


def train(args) -> dict[str, Any]:
    """One run; `args` is a TrainConfig or an argparse Namespace with its fields. Returns its metrics.

    The run is written into a staging folder and published at `cfg.out` by one rename when it is complete
    (`tspeft.training.staging`): a finished run there is refused unless `cfg.overwrite`, and a run killed
    after a checkpoint resumes from the staging folder (`resume_from_checkpoint="last"`).

    Under a launcher (`torchrun`, `accelerate launch`) every process calls this: the Trainer trains with DDP
    (global batch = processes × batch_size), then every rank evaluates the whole eval set (identical numbers on
    every rank; `reduce_stats()` all-reduces, so every rank must take part), and only the main process
    (`TrainingArguments.process_index == 0`) writes metrics.json, the adapter, token masks/statistics and the
    training log. Every rank returns the same metrics.
    """
    cfg = args if isinstance(args, TrainConfig) else TrainConfig.from_namespace(args)
    check_method(cfg.method)
    out = Path(cfg.out)
    if int(os.environ.get("RANK", "0")) == 0:  # the main process (before torch.distributed is set up)
        staging.check_out(out, overwrite=cfg.overwrite, resume=bool(cfg.resume_from_checkpoint))
    checkpoints = staging.staging_folder(out) / CHECKPOINTS
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, checkpoints) if cfg.resume_from_checkpoint else None
    device = resolve_device(cfg.device)
    precision(device, cfg.bf16)  # refuses --bf16 on a GPU without bfloat16 before anything is loaded
    set_seed(cfg.seed)
    task_data = load_data(cfg, kind=cfg.task_kind)
    if task_data.labels is not None and task_data.train:
        task_data.labels.require_classes((ex[task_data.kind.gold_role] for ex in task_data.train), task_data.name)
    plan = resolve_train(cfg, task_data)
    if resume and (plan.zero_shot or not task_data.train):
        raise ValueError(f"--resume-from-checkpoint: this run trains nothing ({cfg.method} on {task_data.name})")
    training_args = training_arguments(cfg, plan, checkpoints, device)
    is_main = training_args.process_index == 0
    if training_args.world_size > 1:
        device = training_args.device  # this process's own device (cuda:LOCAL_RANK, or cpu)
    if not is_main:
        return _run(cfg, plan, task_data, training_args, None, resume, device)
    if plan.schedule_note:
        print(f"[tspeft] {plan.schedule_note}", file=sys.stderr, flush=True)
    folder = staging.begin(out, resume=bool(resume))
    try:
        metrics = _run(cfg, plan, task_data, training_args, folder, resume, device)
    except BaseException as error:
        staging.abandon(folder, out, interrupted=isinstance(error, KeyboardInterrupt))
        raise
    staging.publish(folder, out, {"method": cfg.method, "task": task_data.name})
    return metrics


def _run(cfg: TrainConfig, plan: TrainPlan, task_data: TaskData, training_args, folder: Path | None,
         resume: str | None, device) -> dict[str, Any]:
    """Build, fit, measure; the main process (`folder` not None) writes the run into `folder`."""
    is_main = folder is not None
    set_seed(cfg.seed)
    base, tokenizer = load_base(plan.model_name, plan.kind, task_data.num_labels, cfg.image_size)
    set_seed(cfg.seed)
    model = build_for_plan(plan, base)
    parameters = _parameter_counts(model)
    fitted = fit(model, tokenizer, task_data, plan, training_args, folder, resume)
    evaluation = measure_run(fitted.model, tokenizer, task_data, plan, device, cfg.bf16, folder)
    if is_main:
        save_adapter(fitted.model, cfg.method, folder)
        if task_data.labels is not None:
            write_json(folder / LABELS, task_data.labels.to_json())
    ts_model = unwrap_ts_model(fitted.model)
    metrics = json_safe({**run_metrics(cfg, plan, task_data, fitted, evaluation, ts_model, parameters,
                                       training_args.world_size, staging.as_published(resume, Path(cfg.out)),
                                       device.type),
                         **plan.kind.run_settings(tokenizer)})
    if is_main:
        if "predictions" in evaluation:
            write_json(folder / PREDICTIONS, evaluation["predictions"])
        write_json(folder / METRICS, metrics)
    _debug_rank_dump(training_args, ts_model, metrics, is_main)
    return metrics


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def run_metrics(cfg: TrainConfig, plan: TrainPlan, task_data: TaskData, fitted: Fitted, evaluation: dict[str, Any],
                ts_model: TSPeftModel | None, parameters: tuple[int, int], world_size: int, resume: str | None,
                device: str) -> dict[str, Any]:
    """metrics.json of a run (its keys are read by the report, `tspeft eval` and the benchmark scripts)."""
    gated = ts_model is not None
    taus = ts_model.thresholds() if gated else None
    return {
        "task": task_data.name, "task_kind": plan.kind.name, "model": plan.model_name, "method": cfg.method,
        "seed": cfg.seed, "accuracy": evaluation["accuracy"],
        "majority_accuracy": plan.kind.majority_accuracy(task_data.eval),
        "kept_fraction": evaluation.get("kept_fraction") if gated else (None if cfg.method == "none" else 1.0),
        "per_module": evaluation.get("per_module"),
        "target_kept": plan.target_kept,
        "tau_rule": None if not gated else ("target" if plan.target_kept is not None else "loss-driven"),
        "warmup_steps": plan.warmup_steps if gated else None,
        "warmup_steps_requested": plan.warmup_steps_requested if gated else None,
        "target_reached": plan.target_reached if gated else None,
        "ramp_steps": ts_model.ts_config.ramp_steps if gated else None,
        # τ calibrated at train end on this many examples not trained on (0: on training batches)
        "calibration_examples": len(task_data.calibration) if gated else None,
        "allocation": plan.allocation, "selection": plan.selection,
        "tau_per_module": taus,
        "mean_tau": (sum(taus.values()) / len(ts_model.gates)) if gated and ts_model.gates else None,
        "train_seconds": round(fitted.train_seconds, 3), "train_steps": fitted.train_steps,
        "final_train_loss": fitted.final_loss, "eval_seconds": evaluation["eval_seconds"],
        **{key: evaluation[key] for key in ("eval_loss", "perplexity") if key in evaluation},
        "generation": plan.kind.settings(),
        "trainable_params": parameters[0], "total_params": parameters[1],
        "n_train": len(task_data.train) if not plan.zero_shot else 0, "n_eval": len(task_data.eval),
        "num_labels": task_data.num_labels, "label_names": task_data.label_names,
        "lr": plan.lr, "rank": plan.rank, "epochs": plan.epochs, "max_steps": plan.max_steps,
        "batch_size": plan.batch_size, "max_length": plan.max_length,
        "world_size": world_size, "global_batch_size": plan.batch_size * world_size, "resumed_from": resume,
        "device": device, "bf16": bool(cfg.bf16), "linear_probe": plan.linear_probe, "zero_shot": plan.zero_shot,
        "data": {"task": cfg.task, "data": cfg.data, "eval_data": cfg.eval_data, "columns": column_names(cfg)},
        "target_modules": plan.target_modules, "modules_from": cfg.modules_from, "top_k": cfg.top_k,
        "criterion": cfg.criterion if cfg.modules_from else None,
        **(fitted.details or {}),
    }


DEBUG_DUMP_ENV = "TSPEFT_DEBUG_RANK_DUMP"


def _debug_rank_dump(training_args, ts_model: TSPeftModel | None, metrics: dict[str, Any], is_main: bool) -> None:
    """With $TSPEFT_DEBUG_RANK_DUMP=DIR, every rank writes DIR/rank<k>.json: its own τ, τ-rule state and metrics
    (tests compare the ranks; nothing is written without the variable)."""
    folder = os.environ.get(DEBUG_DUMP_ENV)
    if not folder:
        return
    record = {"process_index": training_args.process_index, "world_size": training_args.world_size,
              "is_main": is_main, "metrics": metrics}
    if ts_model is not None:
        record.update(tau=ts_model.thresholds(), kept_targets=ts_model.allocated_kept(),
                      loss_slopes=ts_model.loss_slopes(), rule_step=int(ts_model.rule_step))
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(Path(folder) / f"rank{training_args.process_index}.json", json_safe(record))

