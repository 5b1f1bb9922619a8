"""Module importance: learned token sparsity against weight criteria.

Criteria (higher score = more important module):
    kept_fraction         share of real training tokens whose update the gate keeps (measured on data)
    learned_kept_target   the τ rule's per-module kept fraction u (no data needed)
    relative_magnitude    mean r = ‖M(x)‖ / ‖W0 x‖ over real training tokens
    delta_weight_norm     ‖s·B A‖_F (LoRA/DoRA), ‖up‖_F·‖down‖_F (bottleneck adapter)
    factor_norm           ‖A‖_F · ‖B‖_F
    dora_magnitude_change ‖m − ‖W0‖_c‖₂ (DoRA only)
    random                seeded uniform scores: the floor any criterion should beat
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

import torch

from ..core.adapter import BottleneckLayer
from ..core.io import atomic_write
from ..core.model import TSPeftModel
from ..tasks.resources import quiet_load_report
from ..training.build import load_base
from ..training.data import load_data
from ..training.run_config import TrainConfig
from ..training.run_folder import IMPORTANCE, METRICS, TS_CONFIG, load_adapter, read_labels
from ..training.staging import require_complete
from ..training.targets import rank_modules
from . import plots

DATA_CRITERIA = ("kept_fraction", "relative_magnitude")


@torch.no_grad()
def measure_on_data(model: TSPeftModel, batches: Iterable[dict]) -> None:
    """Run batches (dicts of model inputs with attention_mask) through the model to fill the gate statistics."""
    model.reset_stats()
    was_training = model.training
    model.eval()
    for batch in batches:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    model.train(was_training)


@torch.no_grad()
def module_importance(model: TSPeftModel, batches: Iterable[dict] | None = None,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """{criterion: {module: score}}; the data criteria need `batches` of real (training) data."""
    scores: dict[str, dict[str, float]] = {}
    if batches is not None:
        measure_on_data(model, batches)
        scores["kept_fraction"] = {n: g.kept_fraction() for n, g in model.gates.items()}
        scores["relative_magnitude"] = {n: g.mean_relative_magnitude() for n, g in model.gates.items()}
    scores["learned_kept_target"] = model.allocated_kept()
    base = model.get_base_model()
    delta, factor, magnitude = {}, {}, {}
    for name in model.gates:
        layer = base.get_submodule(name)
        if isinstance(layer, BottleneckLayer):
            up, down = layer.adapter_up.weight.float(), layer.adapter_down.weight.float()
            delta[name] = factor[name] = float(up.norm() * down.norm())
            continue
        adapter = layer.active_adapters[0]
        a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
        delta[name] = float((b @ a).norm() * abs(float(layer.scaling[adapter])))
        factor[name] = float(a.norm() * b.norm())
        if adapter in getattr(layer, "lora_magnitude_vector", {}):
            m = layer.lora_magnitude_vector[adapter].weight.float()
            w_norm = layer.get_base_layer().weight.float().norm(dim=1)
            magnitude[name] = float((m - w_norm).norm())
    scores["delta_weight_norm"], scores["factor_norm"] = delta, factor
    if magnitude:
        scores["dora_magnitude_change"] = magnitude
    rng = random.Random(seed)
    scores["random"] = {name: rng.random() for name in model.gates}
    return scores


def importance_for_run(run_dir: Path, n_batches: int = 20, seed: int = 0, out: Path | None = None) -> dict:
    """Rank the modules of a `tspeft train` run folder of a ts-* method; writes JSON and a plot."""
    run_dir = Path(run_dir)
    require_complete(run_dir, "--adapter")
    if not (run_dir / TS_CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a token-selective adapter folder (no ts_config.json): importance "
                         "needs the learned token sparsity of a ts-* run")
    if not (run_dir / METRICS).is_file():
        raise ValueError(f"{run_dir}: metrics.json is missing, so the base model and training data are unknown")
    run = json.loads((run_dir / METRICS).read_text())
    saved = run.get("data") or {}
    cfg = TrainConfig(out=str(run_dir), task=saved.get("task"), data=saved.get("data"),
                      eval_data=saved.get("eval_data"),
                      n_train=run.get("n_train") or None, n_eval=run.get("n_eval"), seed=run.get("seed", 0),
                      **{f"{k}_column": v for k, v in (saved.get("columns") or {}).items()})
    task_data = load_data(cfg, labels=read_labels(run_dir, run), kind=run.get("task_kind"))
    with quiet_load_report():  # the head comes from the adapter
        base, tokenizer = load_base(run["model"], task_data.kind, run.get("num_labels") or task_data.num_labels,
                                    run.get("image_size"))
    model = load_adapter(base, run_dir, run["method"])
    if model.gates and all(tau == 0 for tau in model.thresholds().values()):
        raise ValueError(f"{run_dir}: every module's τ is 0: the gate of this run never bit (its warm-up covered "
                         f"all {run.get('train_steps')} steps?), so every module keeps every token and nothing "
                         "ranks them; train it longer")
    features = task_data.kind.features(tokenizer, task_data.train, run.get("max_length") or 64)
    collate = task_data.kind.collator(tokenizer)
    size = run.get("batch_size") or 32
    batches = [collate(features[i:i + size]) for i in range(0, min(len(features), n_batches * size), size)]
    scores = module_importance(model, batches, seed=seed)
    rankings = {criterion: rank_modules(values) for criterion, values in scores.items()}
    out = Path(out) if out else run_dir / IMPORTANCE
    result = {"adapter": str(run_dir), "model": run["model"], "task": task_data.name, "method": run["method"],
              "measured_tokens": int(sum(g.token_counts().real for g in model.gates.values())
                                     / max(len(model.gates), 1)),
              "measured_on": f"{len(batches)} training batches of {size}", "scores": scores, "ranking": rankings,
              "rank_of": {c: {name: i + 1 for i, name in enumerate(r)} for c, r in rankings.items()}}
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    plot = plots.plot_importance(scores, out.with_suffix(".png"), title=f"Module importance: {run_dir.name}")
    return {**result, "path": str(out), "plot": str(plot)}
