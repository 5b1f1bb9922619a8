"""Image classification as a task kind: image folders or Fashion-MNIST, a convolutional (or any transformers
image) classifier, spatial positions as the gate's tokens.

Examples are ``{"image": path or uint8 tensor, "label": int}`` (tasks/image_data.py); the "tokenizer" slot of
the task-kind interface holds the model's `ImagePreprocessing` (input size, mean, std), so features are the
examples themselves and the collator decodes, resizes and normalises each batch. A ``--data`` folder (the
ImageFolder layout: one sub-folder per class) makes a run an image run. Method ``none`` trains the new head
alone: a linear probe on the pooled features of the frozen backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import image_classification as IC
from . import image_data
from .image_models import EFFICIENTNET_LITE0, image_target_modules, load_image_model
from .kind import Example, TaskKind
from .labels import LabelSet

MASK_EXAMPLES = 4  # eval images whose kept positions are recorded for the report
POSITION_MASKS = "position_masks.json"


class ImageKind(TaskKind):
    """Image classification with a new, fully trained head (EfficientNet-lite0 or a transformers image model)."""

    name = "image"
    roles = ("image", "label")
    gold_role = "label"
    model_kind = "image_classification"
    peft_task_type = None  # peft has no image-classification task type: the generic PeftModel
    has_head = True
    has_tokens = False  # spatial positions, not token ids: no token masks or vocabulary statistics
    default_model = EFFICIENTNET_LITE0
    default_batch_size = 32
    default_max_length = None  # inputs are sized by the image size, not a token count

    def claims_path(self, path: str | Path | None) -> bool:
        return image_data.is_image_folder(path)

    def read_file(self, path: str | Path, columns: dict[str, str] | None = None,
                  labels: LabelSet | None = None) -> tuple[list[Example], LabelSet]:
        """A folder's images; the class folder names, sorted, are the labels. With ``labels`` (the train
        folder's, or a saved model's) the folder must hold exactly those classes (`read_files` reads the eval
        folder so)."""
        flag = "--data" if labels is None else "--eval-data"
        examples, names = image_data.read_image_folder(path, list(labels.names) if labels else None, flag=flag)
        image_data.verify_images(examples)
        return examples, labels or LabelSet.of(names)

    def num_labels(self, labels: LabelSet | None, examples: list[Example]) -> int | None:
        if labels is not None:
            return len(labels)
        return max(example["label"] for example in examples) + 1 if examples else 2

    def load_model(self, name_or_path: str, num_labels: int | None, input_size: int | None = None):
        return load_image_model(name_or_path, num_labels or 2, input_size)

    def target_modules(self, model) -> list[str]:
        return image_target_modules(model)

    def features(self, tokenizer, examples: list[Example], max_length: int | None) -> list[dict[str, Any]]:
        return examples  # decoded and resized per batch by the collator

    def collator(self, tokenizer) -> IC.ImageCollator:
        return IC.ImageCollator(tokenizer)

    def evaluate(self, model, tokenizer, examples: list[Example], batch_size: int, max_length: int | None,
                 device=None) -> dict[str, float]:
        return IC.evaluate_images(model, examples, tokenizer, batch_size, device or next(model.parameters()).device)

    def example_ids(self, tokenizer, example: Example, max_length: int | None) -> list[int]:
        raise ValueError("image examples have no token ids; their kept positions are recorded by extra_records")

    def extra_records(self, model, ts_model, tokenizer, examples: list[Example], device) -> dict[str, Any]:
        """position_masks.json: a few eval images and, per gated module, which positions kept their update."""
        return {POSITION_MASKS: IC.record_position_masks(model, ts_model, examples[:MASK_EXAMPLES],
                                                                tokenizer, device)}

    def run_settings(self, tokenizer) -> dict[str, Any]:
        """What metrics.json records about the inputs (so `tspeft eval` preprocesses as in training)."""
        return {"image_size": tokenizer.size, "image_mean": list(tokenizer.mean), "image_std": list(tokenizer.std)}


IMAGE = ImageKind()
