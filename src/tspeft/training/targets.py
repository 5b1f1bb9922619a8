"""Which modules a run adapts: the architecture's defaults, or the top k of an importance ranking.

    target_modules_for(model)                   # tspeft's defaults by config.model_type, else peft's (core/targets.py)
    target_modules_for(model, ["q_proj", "v_proj"])            # the user's (--target-modules)
    top_k_modules("runs/rt/importance.json", "kept_fraction", 8)   # written by `tspeft importance`

An importance file is ``{"scores": {criterion: {module: score}}, ...}``; modules rank by descending score, ties
by name (`rank_modules`), so a ranking read back is the one that was written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..core.targets import target_module_names
from .defaults import DEFAULTS


def target_modules_for(model: nn.Module, given: list[str] | None = None) -> list[str]:
    """Full names of the Linear/Conv1D layers to adapt: `given` (peft's matching: full names or name endings),
    else tspeft's defaults for the model type, else peft's; by default outside the heads and the pooler (it
    sees one token per sequence: gating it would select examples). A type with neither raises ValueError."""
    return target_module_names(model, DEFAULTS.target_modules, set(DEFAULTS.head_modules) | {"lm_head", "pooler"},
                               given)


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
