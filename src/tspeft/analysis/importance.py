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
import os
import random
from pathlib import Path
from typing import Iterable

import torch

from ..core.adapter import BottleneckLayer
from ..core.model import TSPeftModel

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
def module_importance(model: TSPeftModel, batches: Iterable[dict] | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """{criterion: {module: score}}; the data criteria need `batches` of real (training) data."""
    scores: dict[str, dict[str, float]] = {}
    if batches is not None:
        measure_on_data(model, batches)
        scores["kept_fraction"] = {n: g.kept_fraction() for n, g in model.gates.items()}
        scores["relative_magnitude"] = {n: g.mean_relative_magnitude() for n, g in model.gates.items()}
    scores["learned_kept_target"] = model.kept_targets()
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


def rank_modules(scores: dict[str, float | None]) -> list[str]:
    """Module names from most to least important (ties broken by name, so rankings are deterministic)."""
    return sorted(scores, key=lambda name: (-(scores[name] if scores[name] is not None else float("-inf")), name))


def top_k_modules(importance_file: str | os.PathLike, criterion: str, k: int) -> list[str]:
    """The k most important module names by `criterion` from an importance JSON file."""
    data = json.loads(Path(importance_file).read_text())
    if criterion not in data["scores"]:
        raise ValueError(f"{importance_file}: no criterion {criterion!r}; available: {sorted(data['scores'])}")
    ranking = rank_modules(data["scores"][criterion])
    if not 1 <= k <= len(ranking):
        raise ValueError(f"--top-k {k}: must lie in [1, {len(ranking)}] (modules ranked in {importance_file})")
    return ranking[:k]
