"""A run's configuration as given (`TrainConfig`, `EvalConfig`) and as resolved, once (`TrainPlan`).

    cfg = TrainConfig(task="rotten_tomatoes", method="ts-lora", out="runs/rt")     # what the user said
    plan = resolve_train(cfg, task_data)                                             # every default filled in

Every default is taken in `resolve_train` and nowhere else: the task kind's (model, batch size, max length),
`tspeft.training.defaults.DEFAULTS` (learning rate, epochs, warm-up, kept target, ramp) and the run's
optimizer step count (the ramp's length). The plan is frozen: nothing changes it afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from ..tasks.kind import TaskKind
from .data import TaskData
from .defaults import DEFAULTS, METHODS, base_method, default_lr
from .targets import top_k_modules


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
    prompt_column: str | None = None  # generation: None = the role's own name
    response_column: str | None = None
    messages_column: str | None = None  # generation from chats (rendered with the tokenizer's chat template)
    answer_pattern: str | None = None  # generation: regex extracting the answer (default: the task's, else none)
    max_new_tokens: int | None = None  # generation: greedy decoding length (default: the kind's)
    model: str | None = None
    seed: int = 0
    task_kind: str | None = None  # a user's data kind by name; None: from the data's form and columns
    max_length: int | None = None
    image_size: int | None = None  # image runs: side of the square input in pixels (None: the model's own)
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
    target_kept: float | None = DEFAULTS.target_kept  # ts-*: overall kept fraction; None: the loss-driven rule
    warmup_steps: int | None = None
    ramp_steps: int | None = None  # None: DEFAULTS.ramp_fraction of the run's optimizer steps
    allocation: str = "learned"  # ts-*: "uniform" pins every module's kept fraction at the target (control)
    selection: str = "magnitude"  # ts-*: "random" keeps each token with the module's kept probability (control)
    logging_steps: int | None = None
    modules_from: str | None = None  # an importance.json written by `tspeft importance`
    top_k: int | None = None
    criterion: str = "kept_fraction"
    save_steps: int | None = None  # Trainer checkpoint every N optimizer steps into <out>/checkpoints
    resume_from_checkpoint: str | None = None  # a checkpoint folder, a folder of checkpoint-N folders, or "last"
    overwrite: bool = False  # replace a finished run at `out` (whole); without it such a run is refused
    few_shot: int | None = None  # generation, method none: prefix eval prompts with this many training examples
    # As in peft / transformers' TrainingArguments (None: tspeft's default, see training/defaults.py):
    target_modules: list[str] | None = None  # layer names or name endings (peft's matching)
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    warmup_ratio: float | None = None  # learning-rate warm-up (τ's warm-up is `warmup_steps`)
    lr_scheduler: str = "linear"
    weight_decay: float | None = None
    max_grad_norm: float = 1.0


@dataclass(kw_only=True)
class EvalConfig(RunInputs):
    adapter: str
    n_train: int | None = 1  # only the eval split is needed


@dataclass(frozen=True)
class TrainPlan:
    """A training run with every default resolved (see `resolve_train`)."""

    method: str
    kind: TaskKind
    model_name: str
    max_length: int | None  # None for kinds whose inputs are not token sequences (images)
    batch_size: int  # per process
    eval_batch_size: int
    lr: float
    epochs: float
    max_steps: int | None
    rank: int  # reported rank: LoRA/DoRA rank or bottleneck size
    target_modules: list[str] | None  # None: the kind's or the architecture's defaults (see `build_model`)
    lora_alpha: float  # LoRA / DoRA scaling numerator (scaling = alpha / rank)
    lora_dropout: float
    target_kept: float | None  # ts-* only; None also for the loss-driven rule
    warmup_steps: int | None  # ts-* only: as fitted to the run (`fit_gate_schedule`)
    ramp_steps: int | None  # ts-* only: as fitted to the run
    allocation: str | None  # ts-* only: "learned" or "uniform"
    selection: str | None  # ts-* only: "magnitude" or "random"
    zero_shot: bool  # method none on a kind without a head: nothing is trained
    linear_probe: bool  # method none on a kind with a head: a probe on the frozen model (see frozen_probe)
    warmup_steps_requested: int | None = None  # ts-* only: the warm-up asked for (or the default)
    target_reached: bool | None = None  # target mode: the gate has DEFAULTS.gate_settle_steps at its target
    schedule_note: str | None = None  # what fitting the schedule changed, or why the target is out of reach

    @property
    def gated(self) -> bool:
        return self.method.startswith("ts-")

    @property
    def trains(self) -> bool:
        return not self.zero_shot

    @property
    def frozen_probe(self) -> bool:
        """`none` on a token classification task: a probe fitted to convergence on the frozen encoder's pooled
        features (training/probe.py) instead of a head trained by SGD steps (images keep the latter)."""
        return self.linear_probe and self.kind.has_tokens


# `tspeft compare --methods ts-lora,ts-lora:random`: a ts-* method with one of the controls of issue 13, run
# through the same code path (docs/method.md, "Controls"); the settings each control name stands for.
CONTROLS = {"uniform": {"allocation": "uniform"},  # every module at the target, tokens by r
            "random": {"allocation": "uniform", "selection": "random"}}  # random tokens at the target, every module
METHOD_SPECS = METHODS + tuple(f"{m}:{c}" for m in METHODS if m.startswith("ts-") for c in CONTROLS)


def split_method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'ts-lora:random' -> ('ts-lora', {'allocation': 'uniform', 'selection': 'random'}); 'lora' -> ('lora', {})."""
    if spec not in METHOD_SPECS:
        raise ValueError(f"unknown method {spec!r}; choose one of {', '.join(METHOD_SPECS)}")
    method, _, control = spec.partition(":")
    return method, dict(CONTROLS[control]) if control else {}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def planned_steps(n_train: int, batch_size: int, world_size: int, epochs: float, max_steps: int | None) -> int:
    """The optimizer steps `Trainer` will take (max_steps, else epochs × batches per process per epoch)."""
    if max_steps:
        return max_steps
    batches_per_process = math.ceil(math.ceil(n_train / batch_size) / world_size)
    return math.ceil(epochs * max(batches_per_process, 1))


def fit_gate_schedule(warmup: int, ramp: int, total_steps: int) -> tuple[int, int, bool]:
    """(warm-up, ramp, reaches the target): the warm-up and then the ramp cut so that the gate spends its last
    `DEFAULTS.gate_settle_steps` optimizer steps at the full target; a run shorter than that gets neither and
    cannot reach its target (False). A warm-up as long as the run would leave a dense run labelled ts-*."""
    settle = DEFAULTS.gate_settle_steps
    if total_steps < settle:
        return 0, 0, False
    ramp = min(ramp, total_steps - settle)
    return min(warmup, total_steps - settle - ramp), ramp, True


def _gate_schedule(cfg: TrainConfig, steps: int) -> dict:
    """The TrainPlan fields of a ts-* run's warm-up and ramp, fitted to its `steps` optimizer steps."""
    warmup = DEFAULTS.warmup_steps if cfg.warmup_steps is None else cfg.warmup_steps
    ramp = round(DEFAULTS.ramp_fraction * steps) if cfg.ramp_steps is None else cfg.ramp_steps
    fitted_warmup, fitted_ramp, reached = fit_gate_schedule(warmup, ramp, steps)
    note = None
    if not reached:
        note = (f"warning: this {steps}-step run is too short for the gate to reach its target (it needs "
                f"{DEFAULTS.gate_settle_steps} steps after the warm-up): the kept fraction will stay above it; "
                "recorded as target_reached = false")
    elif (fitted_warmup, fitted_ramp) != (warmup, ramp):
        note = (f"warm-up capped at {fitted_warmup} of {steps} steps (asked {warmup})"
                + (f", ramp at {fitted_ramp} (asked {ramp})" if fitted_ramp != ramp else "")
                + f" so the gate has {DEFAULTS.gate_settle_steps} steps at its target")
    return {"warmup_steps": fitted_warmup, "ramp_steps": fitted_ramp, "warmup_steps_requested": warmup,
            "target_reached": reached if cfg.target_kept is not None else None, "schedule_note": note}


def resolve_train(cfg: TrainConfig, task_data: TaskData) -> TrainPlan:
    """Fill in every default of a training run, once."""
    check_method(cfg.method)
    kind = task_data.kind
    gated = cfg.method.startswith("ts-")
    batch_size = cfg.batch_size or kind.default_batch_size
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULTS.epochs
    schedule = {}
    if gated:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
        per_step = batch_size * cfg.gradient_accumulation_steps  # examples per optimizer step and process
        schedule = _gate_schedule(cfg, planned_steps(len(task_data.train), per_step, world_size, epochs,
                                                     cfg.max_steps))
    if cfg.modules_from and cfg.target_modules:
        raise ValueError("--target-modules and --modules-from both choose the modules to adapt: give one")
    if cfg.few_shot and cfg.method != "none":
        raise ValueError(f"--few-shot: a frozen few-shot baseline is --method none, not {cfg.method}")
    targets = top_k_modules(cfg.modules_from, cfg.criterion, cfg.top_k) if cfg.modules_from else cfg.target_modules
    default_rank = DEFAULTS.bottleneck_size if base_method(cfg.method) == "adapter" else DEFAULTS.rank
    return TrainPlan(
        method=cfg.method, kind=kind, model_name=cfg.model or kind.default_model,
        max_length=cfg.max_length or kind.default_max_length, batch_size=batch_size,
        eval_batch_size=batch_size * DEFAULTS.eval_batch_factor, lr=cfg.lr or default_lr(cfg.method), epochs=epochs,
        max_steps=cfg.max_steps, rank=cfg.rank or default_rank, target_modules=targets,
        lora_alpha=(DEFAULTS.alpha_per_rank * (cfg.rank or DEFAULTS.rank) if cfg.lora_alpha is None
                    else cfg.lora_alpha),
        lora_dropout=DEFAULTS.lora_dropout if cfg.lora_dropout is None else cfg.lora_dropout,
        target_kept=cfg.target_kept if gated else None,
        warmup_steps=schedule.get("warmup_steps"), ramp_steps=schedule.get("ramp_steps"),
        warmup_steps_requested=schedule.get("warmup_steps_requested"), target_reached=schedule.get("target_reached"),
        schedule_note=schedule.get("schedule_note"),
        allocation=cfg.allocation if gated else None, selection=cfg.selection if gated else None,
        zero_shot=cfg.method == "none" and not kind.has_head, linear_probe=cfg.method == "none" and kind.has_head)


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

