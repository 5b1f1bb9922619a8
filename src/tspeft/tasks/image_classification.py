"""Image classification: batches of pixels for the Trainer, accuracy, and the kept positions of a few images.

Examples are ``{"image": path or uint8 tensor, "label": int}`` (see ``tspeft.tasks.image_data``). A batch is
``{"pixel_values": (B, 3, S, S) float, "labels": (B,) long}``: each image resized to S × S (bilinear, with
antialiasing; the aspect ratio is not kept), scaled to [0, 1] and normalised with the model's mean and std.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from torch.nn import functional as F

from .image_data import load_pixels
from .image_models import ImagePreprocessing


def resized_pixels(examples: list[dict], size: int) -> torch.Tensor:
    """uint8 (B, 3, size, size) images; equal-sized sources are resized in one call."""
    images = [load_pixels(example["image"]) for example in examples]
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    batch = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    for shape, indices in groups.items():
        stacked = torch.stack([images[i] for i in indices]).float()
        if shape[1:] != (size, size):
            stacked = F.interpolate(stacked, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch[indices] = stacked.round_().clamp_(0, 255).to(torch.uint8)
    return batch


def normalise(pixels: torch.Tensor, preprocessing: ImagePreprocessing) -> torch.Tensor:
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


class ImageCollator:
    """Trainer collator: example dicts -> {"pixel_values", "labels"}."""

    def __init__(self, preprocessing: ImagePreprocessing):
        self.preprocessing = preprocessing

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pixels = resized_pixels(examples, self.preprocessing.size)
        return {"pixel_values": normalise(pixels, self.preprocessing),
                "labels": torch.tensor([int(example["label"]) for example in examples])}


@torch.no_grad()
def predict_images(model, examples: list[dict], preprocessing: ImagePreprocessing, batch_size: int,
                   device: torch.device) -> list[int]:
    """Predicted class ids (argmax of the logits), batched."""
    collate = ImageCollator(preprocessing)
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    try:
        for start in range(0, len(examples), batch_size):
            pixel_values = collate(examples[start:start + batch_size])["pixel_values"].to(device)
            predictions += model(pixel_values=pixel_values).logits.argmax(dim=-1).tolist()
    finally:
        model.train(was_training)
    return predictions


def evaluate_images(model, examples: list[dict], preprocessing: ImagePreprocessing, batch_size: int,
                    device: torch.device) -> dict[str, float]:
    """``{"accuracy": fraction of images whose predicted class is their label}``."""
    if not examples:
        raise ValueError("no images to evaluate")
    predictions = predict_images(model, examples, preprocessing, batch_size, device)
    return {"accuracy": sum(int(p == e["label"]) for p, e in zip(predictions, examples)) / len(examples)}


def png_base64(pixels: torch.Tensor) -> str:
    """A uint8 (3, H, W) image as base64 PNG text (kept inside a JSON file)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@torch.no_grad()
def record_position_masks(model, ts_model, examples: list[dict], preprocessing: ImagePreprocessing,
                          device: torch.device) -> dict[str, Any]:
    """For each example: the image as the model sees it (base64 PNG, size × size), its label and prediction, and
    per gated module the keep mask over that module's feature-map positions (H_l × W_l lists of 0/1)."""
    model.eval()
    records = []
    for gate in ts_model.gates.values():
        gate.record_keep_mask = True
    try:
        for example in examples:
            for gate in ts_model.gates.values():
                gate.last_keep_mask = None
            pixels = resized_pixels([example], preprocessing.size)
            logits = model(pixel_values=normalise(pixels, preprocessing).to(device)).logits
            masks = {name: gate.last_keep_mask[0].int().tolist() for name, gate in ts_model.gates.items()
                     if gate.last_keep_mask is not None and gate.last_keep_mask.dim() == 3}
            records.append({"label": int(example["label"]), "prediction": int(logits.argmax(-1)[0]),
                            "image_png": png_base64(pixels[0]), "masks": masks})
    finally:
        for gate in ts_model.gates.values():
            gate.record_keep_mask = False
            gate.last_keep_mask = None
        ts_model.reset_stats()
    return {"image_size": preprocessing.size, "examples": records}
