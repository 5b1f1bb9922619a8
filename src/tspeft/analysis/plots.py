"""Matplotlib figures for the run report (Agg backend, files written atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)  # never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..core.io import atomic_write  # noqa: E402
from .tokens import layer_index, module_type, to_float  # noqa: E402

DPI = 110
MAX_TOKENS = 64  # columns shown in one token heatmap
MAX_LABEL_CHARS = 12


def save_figure(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG atomically."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return Path(path)


def _layer_colors(layers: Sequence[int]):
    cmap = plt.get_cmap("viridis")
    lo, hi = (min(layers), max(layers)) if layers else (0, 1)
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=max(hi, lo + 1))
    return cmap, norm


def _series(steps: Sequence[float], values: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(steps, dtype=float)
    y = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return x, y


def plot_kept_fraction(
    steps: Sequence[float],
    overall: Sequence[float | None],
    per_layer: Mapping[int, Sequence[float | None]],
    target_per_layer: Mapping[int, Sequence[float | None]] | None,
    path: Path,
) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    layers = sorted(per_layer)
    cmap, norm = _layer_colors(layers)
    for layer in layers:
        x, y = _series(steps, per_layer[layer])
        ax.plot(x, y, lw=1.2, color=cmap(norm(layer)), alpha=0.9)
    if target_per_layer:
        for layer in sorted(target_per_layer):
            x, y = _series(steps, target_per_layer[layer])
            ax.plot(x, y, lw=0.8, ls=":", color=cmap(norm(layer)), alpha=0.8)
    x, y = _series(steps, overall)
    if np.isfinite(y).any():
        ax.plot(x, y, lw=2.5, color="crimson", label="overall")
    if layers:
        sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=norm)
        fig.colorbar(sm, ax=ax, label="layer (thin lines: per-layer mean)")
    if target_per_layer:
        ax.plot([], [], ls=":", color="gray", label="target (per-layer mean)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of tokens kept")
    ax.set_title("Kept fraction during training")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def plot_tau(
    steps: Sequence[float],
    tau_per_module: Mapping[str, Sequence[float | None]],
    mean_tau: Sequence[float | None] | None,
    path: Path,
) -> Path:
    """Small multiples, one panel per module type; one thin line per module colored by layer."""
    types = sorted({module_type(m) for m in tau_per_module})
    n = max(len(types), 1)
    ncols = min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 1.2, 3.2 * nrows), squeeze=False, sharex=True,
                             layout="constrained")
    layers = sorted({layer_index(m) for m in tau_per_module}) or [0]
    cmap, norm = _layer_colors(layers)
    mean_x, mean_y = _series(steps, mean_tau) if mean_tau is not None else (None, None)
    for k, t in enumerate(types):
        ax = axes[k // ncols][k % ncols]
        for name in sorted(tau_per_module, key=lambda m: (layer_index(m), m)):
            if module_type(name) != t:
                continue
            x, y = _series(steps, tau_per_module[name])
            ax.plot(x, y, lw=0.9, color=cmap(norm(layer_index(name))), alpha=0.85)
        if mean_y is not None and np.isfinite(mean_y).any():
            ax.plot(mean_x, mean_y, lw=1.6, ls="--", color="crimson", label="mean τ (all modules)")
            if k == 0:
                ax.legend(fontsize=7, loc="best")
        ax.set_title(f"τ — {t}", fontsize=10)
        if k % ncols == 0:
            ax.set_ylabel("τ")
        ax.grid(alpha=0.3)
    for k in range(len(types), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=norm)
    fig.colorbar(sm, ax=axes.ravel().tolist(), label="layer", shrink=0.8)
    fig.suptitle("Threshold τ per module during training")
    return save_figure(fig, path)


def plot_module_heatmap(per_module: Mapping[str, float | None], path: Path, title: str) -> Path:
    """Layers × module types heatmap of final kept fraction (gray = not adapted / no value)."""
    layers = sorted({layer_index(m) for m in per_module})
    types = sorted({module_type(m) for m in per_module})
    mat = np.full((len(layers), len(types)), np.nan)
    cnt = np.zeros_like(mat)
    for name, v in per_module.items():
        f = to_float(v)
        if f is None:
            continue
        i, j = layers.index(layer_index(name)), types.index(module_type(name))
        mat[i, j] = f if np.isnan(mat[i, j]) else mat[i, j] + f
        cnt[i, j] += 1
    with np.errstate(invalid="ignore"):
        mat = np.where(cnt > 0, mat / np.maximum(cnt, 1), np.nan)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(types) + 2.5), max(3.0, 0.38 * len(layers) + 1.6)))
    cmap = plt.get_cmap("magma").with_extremes(bad="lightgray")
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(types)), [t[:MAX_LABEL_CHARS] for t in types], rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) if layer >= 0 else "—" for layer in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    if mat.size <= 200:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if mat[i, j] < 0.55 else "black")
    fig.colorbar(im, ax=ax, label="kept fraction")
    ax.set_title(title)
    return save_figure(fig, path)


def _short(tok: str) -> str:
    tok = str(tok).replace("\n", "\\n").replace("$", r"\$")
    return tok if len(tok) <= MAX_LABEL_CHARS else tok[: MAX_LABEL_CHARS - 1] + "…"


def plot_token_heatmap(
    tokens: Sequence[str], layers: Sequence[int], matrix: np.ndarray, path: Path, title: str
) -> Path:
    """Rows = layers, columns = tokens, cell = fraction of that layer's modules that kept the token."""
    tokens = list(tokens)[:MAX_TOKENS]
    matrix = np.asarray(matrix)[:, : len(tokens)]
    width = min(max(5.0, 0.3 * len(tokens) + 2.2), 22.0)
    height = max(2.4, 0.3 * len(layers) + 1.8)
    fig, ax = plt.subplots(figsize=(width, height))
    cmap = plt.get_cmap("Blues").with_extremes(bad="lightgray")
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(tokens)), [_short(t) for t in tokens], rotation=70, ha="right",
                  rotation_mode="anchor", fontsize=7)
    step = max(1, int(np.ceil(len(layers) / 24)))
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) if layers[i] >= 0 else "—"
                                                for i in range(0, len(layers), step)], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="share of layer's modules\nthat kept the token", fraction=0.04, pad=0.01)
    return save_figure(fig, path)


def plot_loss(steps: Sequence[float], loss: Sequence[float | None], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x, y = _series(steps, loss)
    ax.plot(x, y, lw=1.0, color="steelblue", alpha=0.6, label="loss (logged)")
    ok = np.isfinite(y)
    if ok.sum() >= 8:
        w = max(2, ok.sum() // 20)
        ys = np.convolve(y[ok], np.ones(w) / w, mode="valid")
        ax.plot(x[ok][w - 1:], ys, lw=2.0, color="navy", label=f"moving mean ({w} logs)")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_importance(scores: Mapping[str, Mapping[str, float | None]], path: Path, title: str) -> Path:
    """Per criterion, module scores scaled to [0, 1], averaged per layer (left) and per module type (right)."""
    fig, (by_layer, by_type) = plt.subplots(1, 2, figsize=(11, 3.8))
    types = sorted({module_type(m) for values in scores.values() for m in values})
    for criterion, values in scores.items():
        finite = {m: to_float(v) for m, v in values.items() if to_float(v) is not None}
        if not finite:
            continue
        lo, hi = min(finite.values()), max(finite.values())
        scaled = {m: (v - lo) / (hi - lo) if hi > lo else 0.5 for m, v in finite.items()}
        layers = sorted({layer_index(m) for m in scaled})
        by_layer.plot(layers, [np.mean([v for m, v in scaled.items() if layer_index(m) == layer]) for layer in layers],
                      marker="o", label=criterion)
        by_type.plot(range(len(types)), [np.mean([v for m, v in scaled.items() if module_type(m) == t] or [np.nan])
                                         for t in types], marker="o", label=criterion)
    by_layer.set_xlabel("layer")
    by_layer.set_ylabel("importance (scaled to [0, 1] per criterion)")
    by_type.set_xticks(range(len(types)), types, rotation=30, ha="right")
    by_type.set_xlabel("module type")
    by_type.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_token_kinds(by_kind: Mapping[str, Mapping[str, Mapping]], by_position: Mapping[str, Mapping[str, Mapping]],
                     path: Path, title: str) -> Path:
    """Kept fraction per layer, one line per token kind (left) and per position bucket (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, table, what in ((axes[0], by_kind, "token kind"), (axes[1], by_position, "position")):
        layers = sorted(table, key=int)
        keys = sorted({k for layer in layers for k in table[layer]},
                      key=lambda k: (int(k.split("-")[0].rstrip("+")) if k[0].isdigit() else 0, k))
        for key in keys:
            ax.plot([int(layer) for layer in layers],
                    [table[layer].get(key, {}).get("kept_fraction", np.nan) for layer in layers],
                    marker="o", label=key)
        ax.set_xlabel("layer")
        ax.set_title(f"by {what}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("kept fraction")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
