"""The run folder: every file name a run writes, and the adapter / checkpoint I/O.

    <out>/
        run_state.json      {"state": "running"} while the run is written, {"state": "complete", ...} once it is
                            published (see tspeft.training.staging: runs are written into a staging folder)
        labels.json         kinds with labels: the label set (values and names in id order), part of the model
        metrics.json        task, model, method, seed, accuracy, kept_fraction (on the eval set; 1.0 dense; null
                            for none), per_module, train_seconds, trainable_params, target_kept, τ, sizes, ...
        train_log.jsonl     one line per logging step (see callback.py)
        token_masks.json    ts-* only: per-module keep masks of a few eval examples (real tokens only)
        token_stats.json    ts-* only: kept fraction by token kind / position / vocabulary item (token_stats.py)
        position_masks.json image ts-* runs instead of the two above: a few eval images and, per gated module,
                            which feature-map positions kept their update (tspeft.tasks.image_classification)
        the adapter         ts-*: TSPeftModel.save_pretrained (ts_config.json + weights, see tspeft.core.io);
                            lora/dora: peft's save_pretrained (adapter_config.json + weights);
                            adapter/none: trainable_weights.safetensors + run_manifest.json (none on a token
                            classification task: the frozen probe's Linear and its pooling, training/probe.py)
        checkpoints/        with save_steps: Trainer checkpoints checkpoint-N (the adapter as above, τ-rule state,
                            optimizer, scheduler, RNG)
        importance.json     written by `tspeft importance` (tspeft.analysis.importance)
        report.html, report/   written by `tspeft report` (tspeft.analysis.report)
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.adapter import BottleneckConfig, inject_bottleneck_adapters
from ..core.io import MANIFEST, atomic_write
from ..core.model import TSPeftModel
from ..tasks.image import POSITION_MASKS  # noqa: F401 - the image kind's extra record, named here with the rest
from ..tasks.labels import LabelSet
from .probe import PooledClassifier
from .wrappers import unwrap_ts_model

RUN_STATE = "run_state.json"
LABELS = "labels.json"
METRICS = "metrics.json"
TRAIN_LOG = "train_log.jsonl"
TOKEN_MASKS = "token_masks.json"
TOKEN_STATS = "token_stats.json"
PREDICTIONS = "predictions.json"  # generation: the first eval examples' prompts, references and predictions
TS_CONFIG = MANIFEST  # a token-selective adapter's manifest (tspeft.core.io)
PEFT_CONFIG = "adapter_config.json"  # a peft adapter (for a ts-* folder: the stub that stops plain peft)
PEFT_WEIGHTS = "adapter_model.safetensors"
RUN_MANIFEST = "run_manifest.json"
DENSE_WEIGHTS = "trainable_weights.safetensors"
CHECKPOINTS = "checkpoints"
IMPORTANCE = "importance.json"
REPORT = "report.html"
REPORT_FIGURES = "report"


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2, default=str)))


def write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def read_metrics(folder: Path) -> dict[str, Any]:
    """The run's metrics.json ({} when there is none)."""
    path = Path(folder) / METRICS
    return json.loads(path.read_text()) if path.is_file() else {}


def read_labels(folder: Path, run: dict[str, Any]) -> LabelSet | None:
    """A run's label set: labels.json, or (runs written before it existed) rebuilt from metrics.json."""
    path = Path(folder) / LABELS
    if not path.is_file():
        return LabelSet.from_run_metrics(run)
    try:
        return LabelSet.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt (not valid JSON: {error.msg})") from None


def is_token_selective(folder: Path) -> bool:
    return (Path(folder) / TS_CONFIG).is_file()


# ----- adapters
def save_adapter(model: nn.Module, method: str, out: Path) -> None:
    """Write `model`'s adapter into `out` in its method's format (see the module docstring)."""
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
                    "weights": DENSE_WEIGHTS,
                    "probe_pooling": model.pooling if isinstance(model, PooledClassifier) else None}
        atomic_write(out / RUN_MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))


def _readable_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ValueError naming it if it is missing, truncated or not safetensors."""
    if not path.is_file():
        raise ValueError(f"{path.parent}: the adapter weights {path.name} are missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is corrupt or truncated (not readable as safetensors: {error})") from None


@contextlib.contextmanager
def _fits(folder: Path):
    """torch's size-mismatch RuntimeError (a head or a rank of another size) as one ValueError line."""
    try:
        yield
    except RuntimeError as error:
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise ValueError(f"{folder}: the saved adapter weights do not fit the base model: "
                         f"{mismatches[0]}{more}") from None


def _load_trainable_weights(target: nn.Module, folder: Path, misfit: str) -> None:
    weights = _readable_weights(folder / json.loads((folder / RUN_MANIFEST).read_text())["weights"])
    missing = set(weights) - set(target.state_dict())
    if missing:
        raise ValueError(f"{folder}: {misfit}: {sorted(missing)[:3]}")
    with _fits(folder):
        target.load_state_dict(weights, strict=False)


def load_adapter(base: nn.Module, folder: Path, method: str) -> nn.Module:
    """`base` with the adapter saved in `folder` (for inference)."""
    if (folder / TS_CONFIG).is_file():
        return TSPeftModel.from_pretrained(base, folder, is_trainable=False)
    if (folder / PEFT_CONFIG).is_file():
        _readable_weights(folder / PEFT_WEIGHTS)
        with _fits(folder):
            return PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    if (folder / RUN_MANIFEST).is_file():
        manifest = json.loads((folder / RUN_MANIFEST).read_text())
        if manifest.get("bottleneck_config"):
            inject_bottleneck_adapters(base, BottleneckConfig.from_dict(manifest["bottleneck_config"]))
        if manifest.get("probe_pooling"):  # the frozen probe (training/probe.py): encoder, pooling, Linear
            weights = _readable_weights(folder / manifest["weights"])
            if "probe.weight" not in weights:
                raise ValueError(f"{folder}: {manifest['weights']} holds no probe.weight for the frozen probe")
            base = PooledClassifier(base, manifest["probe_pooling"], weights["probe.weight"].shape[0]).eval()
        _load_trainable_weights(base, folder, "saved weights do not fit the base model")
        return base
    if method == "none":
        return base  # zero-shot: nothing was saved
    raise ValueError(f"{folder} holds no adapter (no {TS_CONFIG}, {PEFT_CONFIG} or {RUN_MANIFEST})")


# ----- checkpoints
def load_checkpoint_into(target: nn.Module, folder: Path, method: str) -> bool:
    """Restore a tspeft checkpoint in place (adapter weights and, for ts-*, τ, the τ-rule state, `rule_step`);
    False if `folder` is not one of ours (a peft folder: the Trainer loads it)."""
    ts_model = unwrap_ts_model(target)
    if (folder / TS_CONFIG).is_file():
        if ts_model is None:
            raise ValueError(f"{folder} holds a token-selective checkpoint, but this run's method is {method}")
        ts_model.load_state_from(folder)
        return True
    if (folder / RUN_MANIFEST).is_file():  # adapter / none: the trainable weights by state-dict key
        _load_trainable_weights(target, folder, "checkpoint weights do not fit this model")
        return True
    return False


CHECKPOINT_STATE = ("optimizer.pt", "scheduler.pt")  # the Trainer writes them, rng_state*.pth and trainer_state.json


def _torn(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not a whole Trainer checkpoint (None if it is). The Trainer writes
    trainer_state.json last, so a save cut short (Ctrl-C, a full disk) lacks it or holds half of it."""
    from transformers.trainer import TRAINER_STATE_NAME

    state = checkpoint / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME}: its save was cut short"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_NAME} is cut short"
    return None


def _missing_state(checkpoint: Path) -> list[str]:
    """The optimizer / scheduler / RNG / adapter files a whole checkpoint has and `checkpoint` lacks."""
    missing = [name for name in CHECKPOINT_STATE if not (checkpoint / name).is_file()]
    if not any(checkpoint.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if not any((checkpoint / name).is_file() for name in (TS_CONFIG, PEFT_CONFIG, RUN_MANIFEST)):
        missing.append(f"the adapter ({TS_CONFIG}, {PEFT_CONFIG} or {RUN_MANIFEST})")
    return missing


def _checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    return int(name[len("checkpoint-"):]) if name.startswith("checkpoint-") and name[11:].isdigit() else None


def resolve_checkpoint(spec: str, checkpoints: Path, warn=None) -> str:
    """`--resume-from-checkpoint`: "last" (newest checkpoint-N in `checkpoints`), a checkpoint-N folder, or a folder
    holding checkpoint-N folders. A newest checkpoint whose save was cut short is passed over for the newest
    whole one, saying so through `warn`; a checkpoint without its optimizer, scheduler or RNG state is refused
    (resuming from it would silently restart the optimizer). ValueError if there is no usable checkpoint."""
    folder = checkpoints if spec == "last" else Path(spec)
    flag = f"--resume-from-checkpoint {spec}"
    if not folder.is_dir():
        raise ValueError(f"{flag}: no such folder {folder}" + (" (nothing was checkpointed: use --save-steps)"
                                                               if spec == "last" else ""))
    explicit = _checkpoint_step(folder) is not None or (folder / "trainer_state.json").is_file()
    candidates = [folder] if explicit else sorted(
        (p for p in folder.iterdir() if p.is_dir() and _checkpoint_step(p) is not None), key=_checkpoint_step,
        reverse=True)
    if not candidates:
        raise ValueError(f"{flag}: {folder} holds no Trainer checkpoint (no trainer_state.json, no checkpoint-N "
                         "folder)")
    skipped = []
    for checkpoint in candidates:
        torn = _torn(checkpoint)
        if torn is not None:
            skipped.append(f"{checkpoint.name} is incomplete ({torn})")
            continue
        missing = _missing_state(checkpoint)
        if missing:
            raise ValueError(f"{flag}: {checkpoint} lacks {', '.join(missing)}: resuming would continue with a "
                             "fresh optimizer / schedule / random state; restore the files or train again")
        if skipped:
            (warn or _warn)("; ".join(skipped) + f"; resuming from {checkpoint.name}")
        return str(checkpoint)
    raise ValueError(f"{flag}: no whole checkpoint in {folder}: " + "; ".join(skipped))


def _warn(message: str) -> None:
    print(f"[tspeft] warning: {message}", file=sys.stderr, flush=True)
