"""Helpers for module names and per-token keep masks (no matplotlib needed)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from ..training.token_stats import layer_index


def module_type(name: str) -> str:
    """Last name component, used to group modules of the same kind.

    Purely numeric trailing components (tiny ``nn.Sequential`` models whose modules are
    called ``0``, ``2``) carry no type information, so the last non-numeric component is
    used instead, or ``"module"`` when every component is numeric.
    """
    parts = [p for p in str(name).split(".") if p]
    for part in reversed(parts):
        if not part.isdigit():
            return part
    return "module"


def group_by_layer(values: Mapping[str, float]) -> dict[int, float]:
    """Mean of finite values per layer index."""
    acc: dict[int, list[float]] = defaultdict(list)
    for name, v in values.items():
        f = to_float(v)
        if f is not None:
            acc[layer_index(name)].append(f)
    return {layer: float(np.mean(vs)) for layer, vs in sorted(acc.items())}


def to_float(v: Any) -> float | None:
    """Finite float or None (for null / NaN / non-numeric entries)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def layer_token_matrix(
    tokens: Sequence[str], masks: Mapping[str, Sequence[Any]]
) -> tuple[list[int], np.ndarray]:
    """Aggregate per-module token masks to layers.

    Returns ``(layers, matrix)`` with ``matrix[i, j]`` = fraction of layer ``layers[i]``'s
    modules that kept token ``j`` (NaN where no module of that layer recorded token ``j``,
    e.g. when a mask is shorter than the token list).
    """
    n = len(tokens)
    by_layer: dict[int, list[np.ndarray]] = defaultdict(list)
    for name, mask in masks.items():
        row = np.full(n, np.nan)
        vals = [to_float(x) for x in list(mask)[:n]]
        row[: len(vals)] = [np.nan if x is None else (1.0 if x > 0 else 0.0) for x in vals]
        by_layer[layer_index(name)].append(row)
    layers = sorted(by_layer)
    if not layers:
        return [], np.zeros((0, n))
    mat = np.full((len(layers), n), np.nan)
    for i, layer in enumerate(layers):
        stack = np.vstack(by_layer[layer])
        counts = np.sum(~np.isnan(stack), axis=0)
        sums = np.nansum(stack, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mat[i] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return layers, mat
