"""Sequence classification: users' files, tokenisation, a Trainer-ready dataset and collator, and accuracy.

Examples are ``{"text": str, "text_pair": str | None, "label": int}``. Users' files name the columns of the
roles ``text``, ``text_pair`` (optional) and ``label``; labels may be integers or strings, and their ids come
from a `LabelSet` (by value: the sorted distinct labels of the training file, or a saved model's set).
``CLASSIFICATION`` is the task kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding

from . import files
from .kind import Example, TaskKind
from .labels import LabelSet


def tokenize_classification(tokenizer, examples: list[dict], max_length: int) -> list[dict[str, Any]]:
    """Token features per example (input_ids, attention_mask, token_type_ids where the tokenizer makes them,
    labels), truncated to ``max_length`` tokens (pairs: the longer of text and text_pair is cut first)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    features: list[dict[str, Any] | None] = [None] * len(examples)
    with_pair = [i for i, e in enumerate(examples) if e.get("text_pair")]
    without_pair = [i for i, e in enumerate(examples) if not e.get("text_pair")]
    for indices, use_pair in ((with_pair, True), (without_pair, False)):
        if not indices:
            continue
        texts = [examples[i]["text"] for i in indices]
        pairs = [examples[i]["text_pair"] for i in indices] if use_pair else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
        for row, i in enumerate(indices):
            feature = {key: values[row] for key, values in encoded.items()}
            feature["labels"] = int(examples[i]["label"])
            features[i] = feature
    return features  # type: ignore[return-value]


class ClassificationDataset(Dataset):
    """Tokenised classification examples for ``transformers.Trainer`` (pair with ``classification_collator``)."""

    def __init__(self, examples: list[dict], tokenizer, max_length: int = 128):
        self.features = tokenize_classification(tokenizer, examples, max_length)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def classification_collator(tokenizer) -> DataCollatorWithPadding:
    """Pads a list of features to the longest in the batch (dynamic padding), with attention_mask, as tensors."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating batches")
    return DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_classification(model, tokenizer, examples: list[dict], batch_size: int = 32, max_length: int = 128,
                           device: str | torch.device | None = None) -> list[int]:
    """Predicted class ids (argmax of the logits), batched; examples are grouped by length to pad little."""
    device = torch.device(device) if device is not None else _model_device(model)
    features = tokenize_classification(tokenizer, examples, max_length)
    collate = classification_collator(tokenizer)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    predictions = [0] * len(features)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([{k: v for k, v in features[i].items() if k != "labels"} for i in chunk])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            for i, label in zip(chunk, logits.argmax(dim=-1).tolist()):
                predictions[i] = label
    finally:
        model.train(was_training)
    return predictions


def evaluate_classification(model, tokenizer, examples: list[dict], batch_size: int = 32, max_length: int = 128,
                            device: str | torch.device | None = None) -> dict[str, float]:
    """``{"accuracy": fraction of examples whose predicted class is their label}``."""
    if not examples:
        raise ValueError("no examples to evaluate")
    predictions = predict_classification(model, tokenizer, examples, batch_size, max_length, device)
    correct = sum(int(p == e["label"]) for p, e in zip(predictions, examples))
    return {"accuracy": correct / len(examples)}


# ----- users' files
def _label_value(row: dict, column: str, path: Path, where: str) -> int | str:
    value = row.get(column)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        stripped = value.strip()
        return int(stripped) if stripped.lstrip("-").isdigit() else stripped
    raise ValueError(f"{path}: {where}: label column {column!r} must hold an integer or a non-empty string, "
                     f"got {value!r}")


def label_vocabulary(labels: list[int | str]) -> list[str]:
    """Label names in id order: the distinct labels sorted (numbers numerically), see `LabelSet.of`."""
    return list(LabelSet.of(labels).names)


def _read_classification(path: Path, mapping: dict[str, str]) -> list[tuple[str, str | None, int | str, str]]:
    rows = files.read_rows(path)
    files.check_columns(path, rows, mapping, optional=("text_pair",))
    records = []
    for row in rows:
        where = row["_where"]
        records.append((files.text_field(row, mapping["text"], path, where),
                        files.text_field(row, mapping["text_pair"], path, where, required=False),
                        _label_value(row, mapping["label"], path, where), where))
    return records


def _classification_example(record: tuple, labels: LabelSet, path: Path) -> Example:
    text, text_pair, label, where = record
    return {"text": text, "text_pair": text_pair, "label": labels.id_of(label, f"{path}: {where}")}


class ClassificationKind(TaskKind):
    """Sequence classification with a trained head (encoders; `AutoModelForSequenceClassification`)."""

    name = "classification"
    roles = ("text", "text_pair", "label")
    optional_roles = ("text_pair",)
    gold_role = "label"
    model_kind = "classification"
    peft_task_type = "SEQ_CLS"
    has_head = True
    default_model = "minilm"
    default_batch_size = 32
    default_max_length = 64

    def read_file(self, path: str | Path, columns: dict[str, str] | None = None,
                  labels: LabelSet | None = None) -> tuple[list[Example], LabelSet | None]:
        path = Path(path)
        records = _read_classification(path, self.column_map(columns))
        labels = labels if labels is not None else LabelSet.of(r[2] for r in records)
        return [_classification_example(record, labels, path) for record in records], labels

    def read_files(self, train_path: str | Path, eval_path: str | Path | None, columns: dict[str, str] | None = None
                   ) -> tuple[list[Example], list[Example] | None, LabelSet | None]:
        """The train file's labels are the model's (by value, `tspeft.tasks.labels`); an eval label the train
        file lacks is an error (the model could never predict it), as is a number where they are names."""
        mapping = self.column_map(columns)
        train, labels = self.read_file(train_path, mapping)
        evaluation = self.read_file(eval_path, mapping, labels)[0] if eval_path else None
        return train, evaluation, labels

    def num_labels(self, labels: LabelSet | None, examples: list[Example]) -> int | None:
        if labels is not None:
            return len(labels)
        ids = [example["label"] for example in examples]
        return max(ids) + 1 if ids else 2

    def features(self, tokenizer, examples: list[Example], max_length: int) -> list[dict[str, Any]]:
        return tokenize_classification(tokenizer, examples, max_length)

    def collator(self, tokenizer) -> DataCollatorWithPadding:
        return classification_collator(tokenizer)

    def evaluate(self, model, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                 device=None) -> dict[str, float]:
        return evaluate_classification(model, tokenizer, examples, batch_size, max_length, device)


CLASSIFICATION = ClassificationKind()
