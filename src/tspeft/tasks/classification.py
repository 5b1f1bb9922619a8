"""Sequence classification: tokenisation, a Trainer-ready dataset and collator, and accuracy.

Examples are ``{"text": str, "text_pair": str | None, "label": int}`` (see ``tspeft.tasks.data``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding


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
