"""Measuring a model on the eval set: accuracy, the kept fraction, and which tokens the gates keep.

    evaluation = evaluate_model(model, tokenizer, task_data, max_length, batch_size, device)
    masks = record_token_masks(model, tokenizer, task_data, max_length, device)      # ts-* only, else None
    stats = token_stats_on_eval(model, tokenizer, task_data, max_length, batch_size, device)

`evaluate_model` all-reduces the gate statistics (`reduce_stats`), so under DDP every rank must call it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import TaskData
from .defaults import DEFAULTS
from .run_config import TrainPlan, precision
from .run_folder import TOKEN_MASKS, TOKEN_STATS, write_json
from .token_stats import token_statistics
from .wrappers import unwrap_ts_model


@torch.no_grad()
def evaluate_model(model: nn.Module, tokenizer, task_data: TaskData, max_length: int, batch_size: int,
                   device: torch.device) -> dict[str, Any]:
    """Accuracy on task_data.eval (and any further metrics of the kind, e.g. generation's eval_loss, perplexity
    and predictions) and (gated models) the kept fraction measured during this evaluation (for generation: over
    the tokens the decoding processed; the kind resets the counts after its loss pass)."""
    model.to(device).eval()
    ts_model = unwrap_ts_model(model)
    if ts_model is not None:
        ts_model.reset_stats()
    start = time.perf_counter()
    scores = task_data.kind.evaluate(model, tokenizer, task_data.eval, batch_size, max_length, device)
    result = {**scores, "eval_seconds": round(time.perf_counter() - start, 3)}
    if ts_model is not None:
        ts_model.reduce_stats()
        result["kept_fraction"] = ts_model.kept_fraction()
        result["per_module"] = ts_model.kept_fractions()
        ts_model.reset_stats()
    return result


@torch.no_grad()
def record_token_masks(model: nn.Module, tokenizer, task_data: TaskData, max_length: int, device: torch.device,
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
                             task_data.kind.gold_role: ex.get(task_data.kind.gold_role)})  # a chat has none
    finally:
        for gate in ts_model.gates.values():
            gate.record_keep_mask = False
            gate.last_keep_mask = None
        ts_model.reset_stats()
    return {"examples": examples}


def token_stats_on_eval(model: nn.Module, tokenizer, task_data: TaskData, max_length: int, batch_size: int,
                        device: torch.device, n_examples: int = 256) -> dict[str, Any]:
    """Which tokens the gates keep, by kind / position / vocabulary item, over the first eval examples."""
    ts_model = unwrap_ts_model(model)
    features = task_data.kind.features(tokenizer, task_data.eval[:n_examples], max_length)
    collate = task_data.kind.collator(tokenizer)
    batches = ({k: v.to(device) for k, v in collate(features[i:i + batch_size]).items()}
               for i in range(0, len(features), batch_size))
    stats = token_statistics(ts_model, tokenizer, batches)
    ts_model.reset_stats()
    return {**stats, "measured_on": f"first {len(features)} eval examples"}


def measure_run(model: nn.Module, tokenizer, task_data: TaskData, plan: TrainPlan, device: torch.device,
                bf16: bool | None, write_to: Path | None) -> dict[str, Any]:
    """`evaluate_model` on every rank (it all-reduces); with `write_to` (the main process's run folder) also the
    token masks and token statistics of a gated model (for kinds without tokens: the kind's own records, e.g.
    an image run's kept positions), written there."""
    with precision(device, bf16):
        evaluation = evaluate_model(model, tokenizer, task_data, plan.max_length, plan.eval_batch_size, device)
        ts_model = unwrap_ts_model(model)
        if write_to is not None and not task_data.kind.has_tokens:
            if ts_model is not None and task_data.eval:
                for name, record in task_data.kind.extra_records(model, ts_model, tokenizer, task_data.eval,
                                                                 device).items():
                    write_json(write_to / name, record)
        elif write_to is not None:
            masks = record_token_masks(model, tokenizer, task_data, plan.max_length, device)
            if masks is not None:
                write_json(write_to / TOKEN_MASKS, masks)
                write_json(write_to / TOKEN_STATS, token_stats_on_eval(model, tokenizer, task_data, plan.max_length,
                                                                       plan.eval_batch_size, device))
    return evaluation
