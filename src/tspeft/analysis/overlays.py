"""Kept positions drawn over the image: one figure per eval image, one panel per gated module.

A convolution's gate decides per position of its feature map (H_l × W_l, coarser in deeper layers). The
mask is upsampled to the image (nearest: each feature-map cell covers a block of pixels) and drawn over it:
kept positions in colour, dropped ones greyed out, so one sees where in the image each layer applied its
update. Input: ``position_masks.json`` as written by training (tasks/image_classification.py).
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..training.run_folder import POSITION_MASKS
from . import plots
from .plots import plt

COLUMNS = 6
KEPT_COLOUR = np.array([1.0, 0.35, 0.0])  # orange tint over kept positions


def decode_png(text: str) -> np.ndarray:
    """A base64 PNG (as stored in position_masks.json) as a float (H, W, 3) array in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image.convert("RGB"), dtype=float) / 255.0


def upsample_mask(mask: Sequence[Sequence[int]], height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of an h × w 0/1 mask to height × width (cell (i, j) covers its pixel block)."""
    grid = np.asarray(mask, dtype=float)
    rows = np.minimum((np.arange(height) * grid.shape[0]) // height, grid.shape[0] - 1)
    cols = np.minimum((np.arange(width) * grid.shape[1]) // width, grid.shape[1] - 1)
    return grid[rows][:, cols]


def overlay(image: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Kept pixels: the image tinted orange; dropped pixels: the image in faded grey."""
    grey = image.mean(axis=2, keepdims=True).repeat(3, axis=2)
    tinted = 0.55 * image + 0.45 * KEPT_COLOUR
    faded = 0.35 + 0.3 * grey
    return np.where(kept[..., None] > 0, tinted, faded).clip(0, 1)


def short_name(module: str) -> str:
    """'base_model.model.backbone._blocks.3._expand_conv' -> 'blocks.3.expand_conv'."""
    parts = [p.lstrip("_") for p in module.split(".") if p not in ("base_model", "model", "backbone")]
    return ".".join(parts[-3:])


def plot_position_overlay(example: dict[str, Any], path: Path, title: str,
                          label_names: Sequence[str] | None = None) -> Path:
    """One figure: the input image, then each gated module's kept positions over it."""
    image = decode_png(example["image_png"])
    masks = example["masks"]
    panels = 1 + len(masks)
    rows = math.ceil(panels / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(2.1 * COLUMNS, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    name = lambda i: label_names[i] if label_names and 0 <= i < len(label_names) else str(i)  # noqa: E731
    axes.flat[0].imshow(image)
    axes.flat[0].set_title(f"label {name(example['label'])}\npredicted {name(example['prediction'])}", fontsize=8)
    for ax, (module, mask) in zip(axes.flat[1:], masks.items()):
        grid = np.asarray(mask)
        ax.imshow(overlay(image, upsample_mask(mask, *image.shape[:2])), interpolation="nearest")
        ax.set_title(f"{short_name(module)}\n{grid.shape[0]}×{grid.shape[1]}, kept {grid.mean():.2f}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def position_overlay_figures(run_dir: Path, fig_dir: Path, label_names: Sequence[str] | None,
                             notes: list[str]) -> list[tuple[Path, str]] | None:
    """(figure, caption) per recorded eval image of an image run; None when the run has no position_masks.json."""
    import json

    path = Path(run_dir) / POSITION_MASKS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        examples = [e for e in record["examples"] if isinstance(e, dict) and isinstance(e.get("masks"), dict)]
    except (ValueError, KeyError, TypeError) as error:
        notes.append(f"{POSITION_MASKS} could not be used ({error}); no position overlays.")
        return []
    figures = []
    for k, example in enumerate(examples):
        try:
            png = plot_position_overlay(example, fig_dir / f"positions_{k}.png",
                                        f"Eval image {k + 1}: positions whose update each module applied",
                                        label_names)
        except (ValueError, KeyError, TypeError, OSError) as error:
            notes.append(f"{POSITION_MASKS}: example {k + 1} could not be drawn ({error}).")
            continue
        figures.append((png, f"Eval image {k + 1} ({record.get('image_size')}×{record.get('image_size')} as the "
                             f"model sees it) and, per gated module ({len(example['masks'])}), the feature-map "
                             "positions whose adapter update was applied (r ≥ τ), upsampled to the image: orange = "
                             "kept, grey = dropped. Panel titles give the feature-map size and the kept share."))
    return figures


def position_section(run_dir: Path, fig_dir: Path, label_names: Sequence[str] | None, notes: list[str],
                     figure) -> list[str]:
    """The report's HTML section of an image run (none for other runs); `figure(png, caption)` makes the tag."""
    figures = position_overlay_figures(run_dir, fig_dir, label_names, notes)
    if figures is None:
        return []
    return ["<h2>Which positions each layer updated</h2>" + ("".join(figure(*f) for f in figures) or
            f'<p class="note">{POSITION_MASKS} holds no usable examples.</p>')]
