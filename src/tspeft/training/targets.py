"""Which modules a run adapts: the architecture's defaults, or the top k of an importance ranking.

    target_modules_for(model)                                  # DEFAULTS.target_modules by config.model_type
    top_k_modules("runs/rt/importance.json", "kept_fraction", 8)   # written by `tspeft importance`

An importance file is ``{"scores": {criterion: {module: score}}, ...}``; modules rank by descending score, ties
by name (`rank_modules`), so a ranking read back is the one that was written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .defaults import DEFAULTS


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
    """The classification heads `model` has (trained in full, not adapted)."""
    return [h for h in DEFAULTS.head_modules if isinstance(getattr(model, h, None), nn.Module)]


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
