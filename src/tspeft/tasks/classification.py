"""Sequence classification: users' files, tokenisation, a Trainer-ready dataset and collator, and accuracy.

Examples are ``{"text": str, "text_pair": str | None, "label": int}``. Users' files name the columns of the
roles ``text``, ``text_pair`` (optional) and ``label``; labels may be integers (class ids) or strings (ids by
the sorted distinct strings, or by given ``label_names``). ``CLASSIFICATION`` is the task kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding

from . import files
from .kind import Example, TaskKind


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
    """Label names in id order: ``0..max`` if every label is an integer, else the distinct strings sorted."""
    kinds = {isinstance(label, int) for label in labels}
    if len(kinds) > 1:
        example_int = next(label for label in labels if isinstance(label, int))
        example_str = next(label for label in labels if not isinstance(label, int))
        raise ValueError(f"labels mix integers ({example_int!r}) and strings ({example_str!r}); use one or the other")
    if kinds == {True}:
        negative = [label for label in labels if label < 0]
        if negative:
            raise ValueError(f"integer labels must be >= 0, found {negative[0]}")
        return [str(i) for i in range(max(labels) + 1)]
    return sorted({str(label) for label in labels})


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


def _classification_example(record: tuple, names: list[str], path: Path) -> Example:
    text, text_pair, label, where = record
    if isinstance(label, int):  # integer labels are class ids
        if label >= len(names):
            raise ValueError(f"{path}: {where}: label {label} is out of range for {len(names)} classes")
        label_id = label
    elif str(label) in names:
        label_id = names.index(str(label))
    else:
        raise ValueError(f"{path}: {where}: label {label!r} is not one of the known labels {names}")
    return {"text": text, "text_pair": text_pair, "label": label_id}


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
                  label_names: list[str] | None = None) -> tuple[list[Example], list[str] | None]:
        path = Path(path)
        records = _read_classification(path, self.column_map(columns))
        names = label_names if label_names is not None else label_vocabulary([r[2] for r in records])
        return [_classification_example(record, names, path) for record in records], list(names)

    def read_files(self, train_path: str | Path, eval_path: str | Path | None, columns: dict[str, str] | None = None
                   ) -> tuple[list[Example], list[Example] | None, list[str] | None]:
        """Label ids come from the labels of both files together, so train and eval share one mapping."""
        mapping = self.column_map(columns)
        train_records = _read_classification(Path(train_path), mapping)
        eval_records = _read_classification(Path(eval_path), mapping) if eval_path else []
        names = label_vocabulary([r[2] for r in train_records + eval_records])
        train = [_classification_example(r, names, Path(train_path)) for r in train_records]
        evaluation = [_classification_example(r, names, Path(eval_path)) for r in eval_records] if eval_path else None
        return train, evaluation, names

    def num_labels(self, label_names: list[str] | None, examples: list[Example]) -> int | None:
        if label_names:
            return len(label_names)
        labels = [example["label"] for example in examples]
        return max(labels) + 1 if labels else 2

    def features(self, tokenizer, examples: list[Example], max_length: int) -> list[dict[str, Any]]:
        return tokenize_classification(tokenizer, examples, max_length)

    def collator(self, tokenizer) -> DataCollatorWithPadding:
        return classification_collator(tokenizer)

    def evaluate(self, model, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                 device=None) -> dict[str, float]:
        return evaluate_classification(model, tokenizer, examples, batch_size, max_length, device)


CLASSIFICATION = ClassificationKind()
