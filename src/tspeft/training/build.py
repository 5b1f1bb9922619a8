"""Building the model of a run: the base model for the task kind, with the method's adapter attached.

    base, tokenizer = load_base("minilm", "classification", num_labels=2)
    model = build_model("ts-lora", base, "classification")         # a TSPeftModel

Methods: `lora`, `dora`, `adapter` (dense: plain peft / the ungated bottleneck adapter), `ts-lora`, `ts-dora`,
`ts-adapter` (the same, token-gated by tspeft), and `none` (no adapter: for a kind with a head the head alone
is trained on the frozen model: for text, `fit` replaces it by a probe fitted to convergence, training/probe.py;
without a head, zero-shot scoring).
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

from ..core.adapter import BottleneckConfig, inject_bottleneck_adapters
from ..core.config import TokenSelectiveConfig
from ..core.model import get_ts_peft_model
from ..core.targets import uses_conv1d
from ..tasks.kind import TaskKind
from ..tasks.kinds import get_kind
from .defaults import DEFAULTS, base_method
from .run_config import TrainPlan, check_method
from .targets import head_names, target_modules_for


def load_base(model_name_or_path: str, task_kind: str | TaskKind, num_labels: int | None,
              input_size: int | None = None):
    """``(model, tokenizer)`` of the base model for `task_kind` (an embedded name or a local folder);
    `input_size`: an image run's input side in pixels."""
    return get_kind(task_kind).load_model(model_name_or_path, num_labels, input_size)


def build_model(method: str, base: nn.Module, task_kind: str | TaskKind, *, rank: int | None = None,
                target_modules: list[str] | None = None, target_kept: float | None = DEFAULTS.target_kept,
                warmup_steps: int | None = None, ramp_steps: int = 0, lora_alpha: float | None = None,
                lora_dropout: float | None = None, allocation: str = "learned",
                selection: str = "magnitude") -> nn.Module:
    """Attach `method`'s adapter to `base` (a loaded transformers model); returns the model to train.

    ts-*: a TSPeftModel; lora/dora: a peft PeftModel; adapter: `base` with ungated bottleneck adapters;
    none: `base` with everything frozen except a classification head (if any). `target_kept` (None: the
    loss-driven rule), `warmup_steps`, `ramp_steps`, `allocation` and `selection` (the controls, see
    docs/method.md) apply to the ts-* methods only.
    """
    check_method(method)
    kind = base_method(method)
    task_kind = get_kind(task_kind)
    kind_targets = None if target_modules else task_kind.target_modules(base)  # e.g. an image model's 1×1 convs
    targets = kind_targets or target_modules_for(base, target_modules)
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
        alpha = DEFAULTS.alpha_per_rank * rank if lora_alpha is None else lora_alpha
        peft_config = LoraConfig(r=rank, lora_alpha=alpha,
                                 lora_dropout=DEFAULTS.lora_dropout if lora_dropout is None else lora_dropout,
                                 target_modules=targets, use_dora=(kind == "dora"), task_type=task_kind.peft_task_type,
                                 fan_in_fan_out=uses_conv1d(base, targets),  # GPT-2's Conv1D stores W transposed
                                 modules_to_save=heads or None)
    if method.startswith("ts-"):
        ts_config = TokenSelectiveConfig(target_kept=target_kept,
                                         warmup_steps=DEFAULTS.warmup_steps if warmup_steps is None else warmup_steps,
                                         ramp_steps=ramp_steps, allocation=allocation, selection=selection)
        return get_ts_peft_model(base, peft_config, ts_config)
    if kind == "adapter":
        inject_bottleneck_adapters(base, peft_config)
        base._tspeft_bottleneck_config = peft_config
        return base
    return get_peft_model(base, peft_config)


def build_for_plan(plan: TrainPlan, base: nn.Module) -> nn.Module:
    """`build_model` with the plan's resolved settings."""
    return build_model(plan.method, base, plan.kind, rank=plan.rank, target_modules=plan.target_modules,
                       target_kept=plan.target_kept, warmup_steps=plan.warmup_steps, ramp_steps=plan.ramp_steps or 0,
                       lora_alpha=plan.lora_alpha, lora_dropout=plan.lora_dropout,
                       allocation=plan.allocation or "learned", selection=plan.selection or "magnitude")
