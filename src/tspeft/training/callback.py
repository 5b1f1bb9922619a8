"""Trainer integration: the τ-rule step after every optimizer step, and per-logging-step statistics.

    trainer = Trainer(model=ts_model, ..., callbacks=[ThresholdCallback(ts_model, out_dir="runs/x")])

`ThresholdCallback`
  * on_train_begin: starts a fresh `train_log.jsonl` (resumed at step k: keeps its lines of steps <= k); the
    τ rule's config (ramp included) is the model's own and is not changed here;
  * on_step_end (after each optimizer step, so once per step also under gradient accumulation):
    `model.update_thresholds()`;
  * on_train_end: τ calibrated (`TSPeftModel.calibrate`, fixed-point rounds) on eval-mode passes over
    `calibration_data` (examples not trained on) or else `calibration_batches` training batches, so the eval
    kept fraction matches the rule's allocation u;
  * on every training log (the Trainer's `logging_steps`): adds `kept_fraction` (overall, real tokens,
    since the previous log) and `mean_tau` to the logs, so they show in the console/progress bar and in
    `trainer.state.log_history` (where the per-module dicts `kept_per_module`, `tau_per_module`,
    `kept_target_per_module` are added as well); appends one JSON line to `<out_dir>/train_log.jsonl`:
        {"step", "epoch", "loss", "learning_rate", "kept_fraction", "mean_tau",
         "kept_per_module": {...}, "tau_per_module": {...}, "kept_target_per_module": {...}}
    and then calls `model.reset_stats()`.

For a dense (ungated) model the same callback only writes step/loss lines, so every run has a training log.

Under DDP every rank runs the callback (so every rank takes part in the all-reduces of `update_thresholds()`
and `reduce_stats()`); only the world process zero writes the log file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..core.model import TSPeftModel
from .defaults import DEFAULTS
from .run_folder import TRAIN_LOG
from .wrappers import unwrap_ts_model


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class ThresholdCallback(TrainerCallback):
    """Steps the τ rule after each optimizer step and logs kept fraction / τ at each logging step."""

    def __init__(self, model: nn.Module | None = None, out_dir: str | os.PathLike | None = None,
                 calibration_batches: int = DEFAULTS.calibration_batches, calibration_data: list | None = None):
        # `model`: the TSPeftModel (or a wrapper of it). None: taken from the Trainer's callback arguments.
        # `calibration_batches`: training batches run in eval mode at train end to set τ exactly (0: none).
        # `calibration_data`: collated batches of examples not trained on, used instead when given (their r is
        # what unseen inputs give; a fitted training example's runs higher).
        self.model = model
        self.calibration_batches = calibration_batches
        self.calibration_data = calibration_data
        self.log_path = Path(out_dir) / TRAIN_LOG if out_dir is not None else None
        self._started = False

    def _ts_model(self, kwargs: dict[str, Any]) -> TSPeftModel | None:
        return unwrap_ts_model(self.model if self.model is not None else kwargs.get("model"))

    def on_train_begin(self, args, state, control, **kwargs):
        ts_model = self._ts_model(kwargs)
        if ts_model is not None:
            ts_model.reset_stats()
        if self.log_path is not None and state.is_world_process_zero and not self._started:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # a fresh log per training run; resumed from a checkpoint at step k: keep the lines of steps <= k
            kept = []
            if state.global_step > 0 and self.log_path.is_file():
                for line in self.log_path.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line)["step"] <= state.global_step:
                            kept.append(line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue
            self.log_path.write_text("".join(kept), encoding="utf-8")
        self._started = True

    def on_step_end(self, args, state, control, **kwargs):
        ts_model = self._ts_model(kwargs)
        if ts_model is not None:
            ts_model.update_thresholds()

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        """Calibrate τ so evaluation keeps u: eval-mode passes with the final weights over `calibration_data`
        (examples not trained on), else over `calibration_batches` training batches, in fixed-point rounds
        (`TSPeftModel.calibrate`; docs/method.md, "Hitting the target in evaluation"). Every rank takes part."""
        ts_model = self._ts_model(kwargs)
        if ts_model is None or not self.calibration_batches:
            return
        if self.calibration_data:
            batches = self.calibration_data
        elif train_dataloader is not None:
            batches = list(itertools.islice(train_dataloader, self.calibration_batches))
        else:
            return
        model = kwargs.get("model") or ts_model
        device = next(ts_model.parameters()).device
        was_training = model.training
        model.eval()

        def run_passes():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16)):
                for batch in batches:
                    model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})

        ts_model.calibrate(run_passes)
        model.train(was_training)
        ts_model.reset_stats()

    def statistics(self, ts_model: TSPeftModel | None) -> dict[str, Any]:
        """Kept fraction / τ since the last reset: overall and per module (dense model: kept 1.0, no τ)."""
        if ts_model is None:
            return {"kept_fraction": 1.0, "mean_tau": None}
        ts_model.reduce_stats()  # no-op unless torch.distributed is initialised (then every rank must call it)
        taus = ts_model.thresholds()
        return {
            "kept_fraction": _finite(ts_model.kept_fraction()),
            "mean_tau": _finite(sum(taus.values()) / len(taus)) if taus else None,
            "kept_per_module": {k: _finite(v) for k, v in ts_model.kept_fractions().items()},
            "tau_per_module": {k: _finite(v) for k, v in taus.items()},
            "kept_target_per_module": {k: _finite(v) for k, v in ts_model.allocated_kept().items()},
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # evaluation logs and the final train summary (train_loss, train_runtime, ...)
        ts_model = self._ts_model(kwargs)
        stats = self.statistics(ts_model)
        if ts_model is not None:
            # scalars go to the console/progress bar; the per-module dicts only to log_history and the file
            logs["kept_fraction"] = stats["kept_fraction"]
            logs["mean_tau"] = stats["mean_tau"]
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)
            ts_model.reset_stats()
        if self.log_path is not None and state.is_world_process_zero:
            record = {"step": state.global_step, "epoch": _finite(state.epoch), "loss": _finite(logs.get("loss")),
                      "learning_rate": _finite(logs.get("learning_rate")), **stats}
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
