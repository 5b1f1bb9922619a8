"""Evaluating a saved run folder: its adapter on its base model, on the run's own eval set or on other data.

    result = evaluate(EvalConfig(adapter="runs/rt"))                       # the run's own eval set
    result = evaluate(EvalConfig(adapter="runs/rt", data="other.jsonl"))   # all of another file
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..tasks.resources import quiet_load_report
from .build import load_base
from .data import load_data
from .defaults import DEFAULTS
from .measure import evaluate_model
from .run_config import EvalConfig, precision, resolve_device
from .run_folder import TS_CONFIG, is_token_selective, json_safe, load_adapter, read_labels, read_metrics
from .staging import require_complete
from .wrappers import unwrap_ts_model


def _base_model_name(cfg: EvalConfig, folder: Path, run: dict[str, Any]) -> str:
    model_name = cfg.model or run.get("model")
    if model_name is None and is_token_selective(folder):
        model_name = json.loads((folder / TS_CONFIG).read_text()).get("base_model_name_or_path")
    if model_name is None:
        raise ValueError(f"--adapter {folder}: cannot tell the base model (no metrics.json); pass --model")
    return model_name


def _data_inputs(cfg: EvalConfig, run: dict[str, Any]) -> EvalConfig:
    """`cfg` with the data to evaluate on filled in: the run's own eval set when none is given (the same split
    as in training), or all of a given `--data` file."""
    saved = run.get("data") or {}
    if not (cfg.task or cfg.data or cfg.eval_data):
        fields = {field.name for field in dataclasses.fields(cfg)}
        columns = {f"{key}_column": value for key, value in (saved.get("columns") or {}).items()
                   if f"{key}_column" in fields}
        cfg = dataclasses.replace(cfg, task=saved.get("task"), data=saved.get("data"),
                                  eval_data=saved.get("eval_data"), **columns)
        if not (cfg.task or cfg.data or cfg.eval_data):
            raise ValueError("give --task or --data: the run folder does not say what it was trained on")
        if cfg.eval_data:
            cfg = dataclasses.replace(cfg, data=None)
        if cfg.n_eval is None:
            cfg = dataclasses.replace(cfg, n_eval=run.get("n_eval"))  # one-file sets are split by n_eval
    elif cfg.data and not cfg.task:
        cfg = dataclasses.replace(cfg, eval_data=cfg.eval_data or cfg.data, data=None)  # all of FILE
    if cfg.task and cfg.n_eval is None and saved.get("task") == cfg.task:
        cfg = dataclasses.replace(cfg, n_eval=run.get("n_eval"))
    return cfg


def evaluate(args) -> dict[str, Any]:
    """Load the adapter in `args.adapter` onto its base model and evaluate it (accuracy, kept fraction)."""
    cfg = args if isinstance(args, EvalConfig) else EvalConfig.from_namespace(args)
    folder = Path(cfg.adapter)
    require_complete(folder, "--adapter")
    if not folder.is_dir():
        raise ValueError(f"--adapter {folder}: no such folder")
    run = read_metrics(folder)
    method = run.get("method") or ("ts-lora" if is_token_selective(folder) else "lora")
    model_name = _base_model_name(cfg, folder, run)
    cfg = _data_inputs(cfg, run)
    kind = run.get("task_kind")
    task_data = load_data(cfg, labels=read_labels(folder, run), kind=kind or cfg.task_kind,
                          saved_settings=run.get("generation"))
    if kind and task_data.kind.name != kind:
        raise ValueError(f"the adapter was trained for {kind}, but the data is {task_data.kind.name}")
    task_kind = task_data.kind
    device = resolve_device(cfg.device)
    with quiet_load_report():  # the head comes from the adapter: no "newly initialized" report
        base, tokenizer = load_base(model_name, task_kind, run.get("num_labels") or task_data.num_labels,
                                    cfg.image_size or run.get("image_size"))
    model = load_adapter(base, folder, method)
    max_length = cfg.max_length or run.get("max_length") or task_kind.default_max_length
    batch_size = cfg.batch_size or (run.get("batch_size") or task_kind.default_batch_size) * DEFAULTS.eval_batch_factor
    bf16 = run.get("bf16", False) if cfg.bf16 is None else cfg.bf16
    with precision(device, bf16):
        evaluation = evaluate_model(model, tokenizer, task_data, max_length, batch_size, device)
    gated = unwrap_ts_model(model) is not None
    return json_safe({"task": task_data.name, "model": model_name, "method": method, "adapter": str(folder),
                   "accuracy": evaluation["accuracy"],
                   "kept_fraction": evaluation.get("kept_fraction") if gated else (None if method == "none" else 1.0),
                   "per_module": evaluation.get("per_module"), "n_eval": len(task_data.eval),
                   **{key: evaluation[key] for key in ("eval_loss", "perplexity") if key in evaluation},
                   "eval_seconds": evaluation["eval_seconds"], "bf16": bool(bf16)})
