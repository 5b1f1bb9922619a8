"""Train and evaluate one run with transformers' `Trainer`: dense PEFT, token-selective PEFT or no adapter.

    metrics = train(TrainConfig(task="rotten_tomatoes", method="ts-lora", out="runs/rt"))
    metrics = evaluate(EvalConfig(adapter="runs/rt", task="rotten_tomatoes"))

Methods: `lora`, `dora`, `adapter` (dense: plain peft / the ungated bottleneck adapter), `ts-lora`, `ts-dora`,
`ts-adapter` (the same, token-gated by tspeft), and `none` (no adapter: for classification the head alone is
trained, i.e. a linear probe on the frozen encoder; for a causal LM on multiple choice, zero-shot scoring).

Defaults (learning rates, rank, target modules per architecture, batch size, max length, epochs, target
kept fraction 0.5 with 20 warm-up steps) live in ONE place, `tspeft.training.defaults.DEFAULTS`; see the
table in that module's docstring.

The run folder `out` receives:
    metrics.json        task, model, method, seed, accuracy, kept_fraction (on the eval set; 1.0 dense; null
                        for none), per_module, train_seconds, trainable_params, target_kept, τ, sizes, ...
    train_log.jsonl     one line per logging step (see callback.py)
    token_masks.json    ts-* only: per-module keep masks of a few eval examples (real tokens only)
    the adapter         TSPeftModel.save_pretrained (ts-*), peft save_pretrained (lora/dora),
                        trainable_weights.safetensors + run_manifest.json (adapter, none)
    checkpoints/        with save_steps: Trainer checkpoints checkpoint-N (the adapter as above, τ-rule state,
                        optimizer, scheduler, RNG); resume_from_checkpoint="last" continues from the newest
Under torchrun / accelerate launch every process runs `train()` and only the main one writes (see `train`).
The causal-LM multiple-choice task trains on prompt + correct answer (loss on the answer tokens only) and
is scored by the length-normalised log-likelihood of each option.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed

from .. import BottleneckConfig, TokenSelectiveConfig, TSPeftModel, get_ts_peft_model
from ..core.adapter import inject_bottleneck_adapters
from ..core.io import atomic_write
from ..tasks.kind import TaskKind
from ..tasks.kinds import get_kind
from . import data as D
from .data import column_names, load_data
from .callback import ThresholdCallback, unwrap_ts_model
from .defaults import DEFAULTS, METHODS, base_method, default_lr

RUN_MANIFEST = "run_manifest.json"
DENSE_WEIGHTS = "trainable_weights.safetensors"
_UNSET = "default"  # target_kept not given: DEFAULTS.target_kept for ts-* methods


# ----- configuration ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RunInputs:
    """What a run reads (shared by training and evaluation): data, columns, base model, sizes, device."""

    task: str | None = None
    data: str | None = None
    eval_data: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    question_column: str = "question"
    options_column: str = "options"
    answer_column: str = "answer"
    model: str | None = None
    seed: int = 0
    max_length: int | None = None
    batch_size: int | None = None
    n_train: int | None = None
    n_eval: int | None = None
    device: str = "auto"
    bf16: bool | None = None  # bfloat16 autocast; None: off for training, the run's own precision for `eval`

    @classmethod
    def from_namespace(cls, args):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


@dataclass(kw_only=True)
class TrainConfig(RunInputs):
    out: str
    method: str = "ts-lora"
    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    rank: int | None = None
    target_kept: Any = _UNSET  # float in (0, 1], None (loss-driven rule) or "default"
    warmup_steps: int | None = None
    ramp_steps: int | None = None  # None: DEFAULTS.ramp_fraction of the run's optimizer steps
    logging_steps: int | None = None
    modules_from: str | None = None  # an importance.json written by `tspeft importance`
    top_k: int | None = None
    criterion: str = "kept_fraction"
    save_steps: int | None = None  # Trainer checkpoint every N optimizer steps into <out>/checkpoints
    resume_from_checkpoint: str | None = None  # a checkpoint folder, a folder of checkpoint-N folders, or "last"


def resolve_target_kept(method: str, target_kept: Any) -> float | None:
    if not method.startswith("ts-"):
        return None
    return DEFAULTS.target_kept if target_kept == _UNSET else target_kept


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def precision(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 autocast on `device` when `bf16` (a no-op context otherwise); refuses a GPU without bfloat16."""
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--bf16: the GPU {torch.cuda.get_device_name(device)} does not support bfloat16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16))


# ----- models ----------------------------------------------------------------------------------------------------
def target_modules_for(model: nn.Module) -> list[str]:
    """Full names of the Linear layers to adapt: the model type's default suffixes (any Linear for an unknown
    type), outside the heads and the pooler (it sees one token per sequence: gating it would select examples)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    suffixes = DEFAULTS.target_modules.get(model_type)
    skip = set(DEFAULTS.head_modules) | {"lm_head", "pooler"}
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not (set(name.split(".")) & skip)
             and (suffixes is None or name.rsplit(".", 1)[-1] in suffixes)]
    if not names:
        raise ValueError(f"no nn.Linear layers to adapt in {type(model).__name__}")
    return names


def head_names(model: nn.Module) -> list[str]:
    return [h for h in DEFAULTS.head_modules if isinstance(getattr(model, h, None), nn.Module)]


def build_model(method: str, base: nn.Module, task_kind: str | TaskKind, *, rank: int | None = None,
                target_modules: list[str] | None = None, target_kept: Any = _UNSET,
                warmup_steps: int | None = None, ramp_steps: int = 0) -> nn.Module:
    """Attach `method`'s adapter to `base` (a loaded transformers model); returns the model to train.

    ts-*: a TSPeftModel; lora/dora: a peft PeftModel; adapter: `base` with ungated bottleneck adapters;
    none: `base` with everything frozen except a classification head (if any).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    kind = base_method(method)
    task_kind = get_kind(task_kind)
    targets = target_modules or target_modules_for(base)
    heads = head_names(base) if task_kind.has_head else []
    if kind == "none":
        for name, parameter in base.named_parameters():
            parameter.requires_grad_(name.split(".")[0] in heads)
        return base
    if kind == "adapter":
        peft_config = BottleneckConfig(target_modules=targets, bottleneck_size=rank or DEFAULTS.bottleneck_size,
                                       modules_to_save=heads or None)
    else:
        rank = rank or DEFAULTS.rank
        peft_config = LoraConfig(r=rank, lora_alpha=int(DEFAULTS.alpha_per_rank * rank), lora_dropout=DEFAULTS.lora_dropout,
                                 target_modules=targets, use_dora=(kind == "dora"),
                                 task_type=task_kind.peft_task_type,
                                 modules_to_save=heads or None)
    if method.startswith("ts-"):
        ts_config = TokenSelectiveConfig(target_kept=resolve_target_kept(method, target_kept),
                                         warmup_steps=DEFAULTS.warmup_steps if warmup_steps is None else warmup_steps,
                                         ramp_steps=ramp_steps)
        return get_ts_peft_model(base, peft_config, ts_config)
    if kind == "adapter":
        inject_bottleneck_adapters(base, peft_config)
        base._tspeft_bottleneck_config = peft_config
        return base
    return get_peft_model(base, peft_config)


def load_base(model_name_or_path: str, task_kind: str | TaskKind, num_labels: int | None):
    return get_kind(task_kind).load_model(model_name_or_path, num_labels)


# ----- saving and loading adapters -------------------------------------------------------------------------------
def save_adapter(model: nn.Module, method: str, out: Path) -> None:
    ts_model = unwrap_ts_model(model)
    if ts_model is not None:
        ts_model.save_pretrained(out)
    elif isinstance(model, PeftModel):
        model.save_pretrained(str(out))
    else:  # adapter / none: the trainable weights (bottleneck layers, head) by state-dict key
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if k in names}
        bottleneck = getattr(model, "_tspeft_bottleneck_config", None)
        atomic_write(out / DENSE_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        manifest = {"method": method, "bottleneck_config": bottleneck.to_dict() if bottleneck else None,
                    "weights": DENSE_WEIGHTS}
        atomic_write(out / RUN_MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))


def load_adapter(base: nn.Module, folder: Path, method: str) -> nn.Module:
    if (folder / "ts_config.json").is_file():
        return TSPeftModel.from_pretrained(base, folder, is_trainable=False)
    if (folder / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    if (folder / RUN_MANIFEST).is_file():
        manifest = json.loads((folder / RUN_MANIFEST).read_text())
        if manifest.get("bottleneck_config"):
            inject_bottleneck_adapters(base, BottleneckConfig.from_dict(manifest["bottleneck_config"]))
        weights = load_file(folder / manifest["weights"])
        missing = set(weights) - set(base.state_dict())
        if missing:
            raise ValueError(f"{folder}: saved weights do not fit the base model: {sorted(missing)[:3]}")
        base.load_state_dict(weights, strict=False)
        return base
    if method == "none":
        return base  # zero-shot: nothing was saved
    raise ValueError(f"{folder} holds no adapter (no ts_config.json, adapter_config.json or {RUN_MANIFEST})")


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
        folder = Path(resume_from_checkpoint)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        ts_model = unwrap_ts_model(target)
        if (folder / "ts_config.json").is_file():
            if ts_model is None:
                raise ValueError(f"{folder} holds a token-selective checkpoint, but this run's method is {self.method}")
            ts_model.load_state_from(folder)
        elif (folder / RUN_MANIFEST).is_file():  # adapter / none: the trainable weights by state-dict key
            weights = load_file(folder / json.loads((folder / RUN_MANIFEST).read_text())["weights"])
            missing = set(weights) - set(target.state_dict())
            if missing:
                raise ValueError(f"{folder}: checkpoint weights do not fit this model: {sorted(missing)[:3]}")
            target.load_state_dict(weights, strict=False)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def resolve_checkpoint(spec: str, checkpoints: Path) -> str:
    """`--resume-from-checkpoint`: "last" (newest checkpoint-N in `checkpoints`), a checkpoint-N folder, or a folder
    holding checkpoint-N folders (the newest is taken). ValueError if there is no such checkpoint."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import get_last_checkpoint

    folder = checkpoints if spec == "last" else Path(spec)
    flag = f"--resume-from-checkpoint {spec}"
    if not folder.is_dir():
        raise ValueError(f"{flag}: no such folder {folder}" + (" (nothing was checkpointed: use --save-steps)"
                                                               if spec == "last" else ""))
    if (folder / TRAINER_STATE_NAME).is_file():
        return str(folder)
    last = get_last_checkpoint(str(folder))
    if last is None or not (Path(last) / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"{flag}: {folder} holds no Trainer checkpoint (no {TRAINER_STATE_NAME}, no checkpoint-N folder)")
    return last


# ----- evaluation ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_model(model: nn.Module, tokenizer, task_data: D.TaskData, max_length: int, batch_size: int,
                   device: torch.device) -> dict[str, Any]:
    """Accuracy on task_data.eval and (gated models) the kept fraction measured during this evaluation."""
    model.to(device).eval()
    ts_model = unwrap_ts_model(model)
    if ts_model is not None:
        ts_model.reset_stats()
    start = time.perf_counter()
    accuracy = task_data.kind.evaluate(model, tokenizer, task_data.eval, batch_size, max_length, device)["accuracy"]
    result = {"accuracy": accuracy, "eval_seconds": round(time.perf_counter() - start, 3)}
    if ts_model is not None:
        ts_model.reduce_stats()
        result["kept_fraction"] = ts_model.kept_fraction()
        result["per_module"] = ts_model.sparsity()
        ts_model.reset_stats()
    return result


@torch.no_grad()
def record_token_masks(model: nn.Module, tokenizer, task_data: D.TaskData, max_length: int, device: torch.device,
                       n: int = DEFAULTS.token_mask_examples) -> dict[str, Any] | None:
    """Per-module keep masks of the first `n` eval examples (one at a time, so only real tokens)."""
    ts_model = unwrap_ts_model(model)
    if ts_model is None or not task_data.eval:
        return None
    model.eval()
    examples = []
    for gate in ts_model.gates.values():
        gate.record_keep_mask = True
    try:
        for ex in task_data.eval[:n]:
            ids = task_data.kind.example_ids(tokenizer, ex, max_length)
            for gate in ts_model.gates.values():
                gate.last_keep_mask = None
            input_ids = torch.tensor([ids], device=device)
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            masks = {}
            for name, gate in ts_model.gates.items():
                mask = gate.last_keep_mask
                if mask is not None and mask.dim() == 2 and mask.shape[1] == len(ids):
                    masks[name] = [int(v) for v in mask[0].tolist()]
            examples.append({"tokens": tokenizer.convert_ids_to_tokens(ids), "masks": masks,
                             task_data.kind.gold_role: ex[task_data.kind.gold_role]})
    finally:
        for gate in ts_model.gates.values():
            gate.record_keep_mask = False
            gate.last_keep_mask = None
        ts_model.reset_stats()
    return {"examples": examples}


def token_stats_on_eval(model: nn.Module, tokenizer, task_data: D.TaskData, max_length: int, batch_size: int,
                        device: torch.device, n_examples: int = 256) -> dict[str, Any]:
    """Which tokens the gates keep, by kind / position / vocabulary item, over the first eval examples."""
    from ..analysis.token_stats import token_statistics

    ts_model = unwrap_ts_model(model)
    features = task_data.kind.features(tokenizer, task_data.eval[:n_examples], max_length)
    collate = task_data.kind.collator(tokenizer)
    batches = ({k: v.to(device) for k, v in collate(features[i:i + batch_size]).items()}
               for i in range(0, len(features), batch_size))
    stats = token_statistics(ts_model, tokenizer, batches)
    ts_model.reset_stats()
    return {**stats, "measured_on": f"first {len(features)} eval examples"}


# ----- training --------------------------------------------------------------------------------------------------
def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2, default=str)))


def train(args) -> dict[str, Any]:
    """One run (see the module docstring); `args` is a TrainConfig or an argparse Namespace with its fields.

    Under a launcher (`torchrun`, `accelerate launch`) every process calls this: the Trainer trains with DDP
    (global batch = processes × batch_size), then every rank evaluates the whole eval set (identical numbers on
    every rank; `reduce_stats()` all-reduces, so every rank must take part), and only the main process
    (`TrainingArguments.process_index == 0`) writes metrics.json, the adapter, token masks/statistics and the
    training log. Every rank returns the same metrics.
    """
    cfg = args if isinstance(args, TrainConfig) else TrainConfig.from_namespace(args)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    out = Path(cfg.out)
    checkpoints = out / "checkpoints"
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, checkpoints) if cfg.resume_from_checkpoint else None
    device = resolve_device(cfg.device)
    precision(device, cfg.bf16)  # refuses --bf16 on a GPU without bfloat16 before anything is loaded
    set_seed(cfg.seed)
    task_data = load_data(cfg)
    kind = task_data.kind
    model_name = cfg.model or kind.default_model
    max_length = cfg.max_length or kind.default_max_length
    batch_size = cfg.batch_size or kind.default_batch_size
    lr = cfg.lr or default_lr(cfg.method)
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULTS.epochs
    target_kept = resolve_target_kept(cfg.method, cfg.target_kept)
    warmup = DEFAULTS.warmup_steps if cfg.warmup_steps is None else cfg.warmup_steps
    zero_shot = cfg.method == "none" and not kind.has_head
    if resume and (zero_shot or not task_data.train):
        raise ValueError(f"--resume-from-checkpoint: this run trains nothing ({cfg.method} on {task_data.name})")

    # Built first, also when nothing is trained: under a launcher it sets up torch.distributed (accelerate's
    # PartialState) and names the main process, the only one that writes files.
    training_args = TrainingArguments(
        output_dir=str(checkpoints), seed=cfg.seed, learning_rate=lr, num_train_epochs=epochs,
        max_steps=cfg.max_steps if cfg.max_steps else -1, per_device_train_batch_size=batch_size,
        weight_decay=DEFAULTS.weight_decay, logging_steps=cfg.logging_steps or DEFAULTS.logging_steps,
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
    is_main = training_args.process_index == 0
    if training_args.world_size > 1:
        device = training_args.device  # this process's own device (cuda:LOCAL_RANK, or cpu)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    set_seed(cfg.seed)
    base, tokenizer = load_base(model_name, kind, task_data.num_labels)
    set_seed(cfg.seed)
    targets = None
    if cfg.modules_from:
        from ..analysis.importance import top_k_modules

        targets = top_k_modules(cfg.modules_from, cfg.criterion, cfg.top_k)
    model = build_model(cfg.method, base, kind, rank=cfg.rank, target_modules=targets, target_kept=target_kept,
                        warmup_steps=warmup, ramp_steps=cfg.ramp_steps or 0)
    ts_model = unwrap_ts_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    train_seconds, train_steps, final_loss = 0.0, 0, None
    if not zero_shot and task_data.train:
        features, collator = kind.features(tokenizer, task_data.train, max_length), kind.collator(tokenizer)
        # Trainer reads model.is_gradient_checkpointing through TSPeftModel's attribute forwarding: not our warning
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer = TSTrainer(model=model, args=training_args, train_dataset=D.ListDataset(features),
                            data_collator=collator, callbacks=[ThresholdCallback(
                                model, out_dir=out, ramp_fraction=DEFAULTS.ramp_fraction if cfg.ramp_steps is None else None)])
        trainer.method = cfg.method
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.perf_counter() - start
        train_steps, final_loss = trainer.state.global_step, result.training_loss
        model = trainer.model
        if is_main and checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()

    eval_batch = batch_size * DEFAULTS.eval_batch_factor
    with precision(device, cfg.bf16):
        evaluation = evaluate_model(model, tokenizer, task_data, max_length, eval_batch, device)  # every rank: it reduces
        if is_main:
            masks = record_token_masks(model, tokenizer, task_data, max_length, device)
            if masks is not None:
                _write_json(out / "token_masks.json", masks)
                _write_json(out / "token_stats.json",
                            token_stats_on_eval(model, tokenizer, task_data, max_length, eval_batch, device))
    if is_main:
        save_adapter(model, cfg.method, out)

    metrics = {
        "task": task_data.name, "task_kind": kind.name, "model": model_name, "method": cfg.method, "seed": cfg.seed,
        "accuracy": evaluation["accuracy"], "majority_accuracy": kind.majority_accuracy(task_data.eval),
        "kept_fraction": evaluation.get("kept_fraction") if ts_model is not None else (None if cfg.method == "none" else 1.0),
        "per_module": evaluation.get("per_module"),
        "target_kept": target_kept, "tau_rule": None if ts_model is None else ("target" if target_kept is not None else "loss-driven"),
        "warmup_steps": warmup if ts_model is not None else None,
        "ramp_steps": ts_model.ts_config.ramp_steps if ts_model is not None else None,
        "tau_per_module": ts_model.thresholds() if ts_model is not None else None,
        "mean_tau": (sum(ts_model.thresholds().values()) / len(ts_model.gates)) if ts_model is not None and ts_model.gates else None,
        "train_seconds": round(train_seconds, 3), "train_steps": train_steps, "final_train_loss": final_loss,
        "eval_seconds": evaluation["eval_seconds"],
        "trainable_params": trainable, "total_params": total,
        "n_train": len(task_data.train) if not zero_shot else 0, "n_eval": len(task_data.eval),
        "num_labels": task_data.num_labels, "label_names": task_data.label_names,
        "lr": lr, "rank": cfg.rank or (DEFAULTS.bottleneck_size if base_method(cfg.method) == "adapter" else DEFAULTS.rank),
        "epochs": epochs, "max_steps": cfg.max_steps, "batch_size": batch_size, "max_length": max_length,
        "world_size": training_args.world_size, "global_batch_size": batch_size * training_args.world_size,
        "resumed_from": resume,
        "device": device.type, "bf16": bool(cfg.bf16), "linear_probe": cfg.method == "none" and kind.has_head,
        "zero_shot": zero_shot,
        "data": {"task": cfg.task, "data": cfg.data, "eval_data": cfg.eval_data, "columns": column_names(cfg)},
        "target_modules": targets, "modules_from": cfg.modules_from, "top_k": cfg.top_k,
        "criterion": cfg.criterion if cfg.modules_from else None,
    }
    metrics = _clean(metrics)
    if is_main:
        _write_json(out / "metrics.json", metrics)
    _debug_rank_dump(training_args, ts_model, metrics, is_main)
    return metrics


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
        record.update(tau=ts_model.thresholds(), kept_targets=ts_model.kept_targets(),
                      loss_slopes=ts_model.loss_slopes(), rule_step=int(ts_model.rule_step))
    Path(folder).mkdir(parents=True, exist_ok=True)
    _write_json(Path(folder) / f"rank{training_args.process_index}.json", _clean(record))


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# ----- evaluation of a saved run ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class EvalConfig(RunInputs):
    adapter: str
    n_train: int | None = 1  # only the eval split is needed


def evaluate(args) -> dict[str, Any]:
    """Load the adapter in `args.adapter` onto its base model and evaluate it (accuracy, kept fraction)."""
    cfg = args if isinstance(args, EvalConfig) else EvalConfig.from_namespace(args)
    folder = Path(cfg.adapter)
    if not folder.is_dir():
        raise ValueError(f"--adapter {folder}: no such folder")
    run = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    method = run.get("method") or ("ts-lora" if (folder / "ts_config.json").is_file() else "lora")
    model_name = cfg.model or run.get("model")
    if model_name is None and (folder / "ts_config.json").is_file():
        model_name = json.loads((folder / "ts_config.json").read_text()).get("base_model_name_or_path")
    if model_name is None:
        raise ValueError(f"--adapter {folder}: cannot tell the base model (no metrics.json); pass --model")
    if not (cfg.task or cfg.data or cfg.eval_data):  # the run's own eval set
        saved = run.get("data") or {}
        cfg.task, cfg.data, cfg.eval_data = saved.get("task"), saved.get("data"), saved.get("eval_data")
        for key, value in (saved.get("columns") or {}).items():
            setattr(cfg, f"{key}_column", value)
        if not (cfg.task or cfg.data or cfg.eval_data):
            raise ValueError("give --task or --data: the run folder does not say what it was trained on")
        if cfg.eval_data:
            cfg.data = None
        if cfg.n_eval is None:
            cfg.n_eval = run.get("n_eval")  # one-file sets are split by n_eval: the same split as in training
    elif cfg.data and not cfg.task:
        cfg.eval_data, cfg.data = cfg.eval_data or cfg.data, None  # `eval --data FILE` evaluates on all of FILE
    if cfg.task and cfg.n_eval is None and run.get("data", {}).get("task") == cfg.task:
        cfg.n_eval = run.get("n_eval")
    kind = run.get("task_kind")
    task_data = load_data(cfg, label_names=run.get("label_names"), kind=kind)
    if kind and task_data.kind.name != kind:
        raise ValueError(f"the adapter was trained for {kind}, but the data is {task_data.kind.name}")
    kind = task_data.kind
    device = resolve_device(cfg.device)
    base, tokenizer = load_base(model_name, kind, run.get("num_labels") or task_data.num_labels)
    model = load_adapter(base, folder, method)
    max_length = cfg.max_length or run.get("max_length") or kind.default_max_length
    batch_size = cfg.batch_size or (run.get("batch_size") or kind.default_batch_size) * DEFAULTS.eval_batch_factor
    bf16 = run.get("bf16", False) if cfg.bf16 is None else cfg.bf16
    with precision(device, bf16):
        evaluation = evaluate_model(model, tokenizer, task_data, max_length, batch_size, device)
    ts = unwrap_ts_model(model) is not None
    return _clean({"task": task_data.name, "model": model_name, "method": method, "adapter": str(folder),
                   "accuracy": evaluation["accuracy"],
                   "kept_fraction": evaluation.get("kept_fraction") if ts else (None if method == "none" else 1.0),
                   "per_module": evaluation.get("per_module"), "n_eval": len(task_data.eval),
                   "eval_seconds": evaluation["eval_seconds"], "bf16": bool(bf16)})
