"""The training side's view of a task: its examples and the features/collator/evaluation for its kind.

Examples come from `tspeft.tasks.data` (shipped tasks and users' files); tokenisation, collators and scoring
from `tspeft.tasks.classification` and `tspeft.tasks.multiple_choice`:

    classification:   {"text": str, "text_pair": str | None, "label": int}
    multiple choice:  {"question": str, "options": [str, ...], "answer": int}   (causal LM, answer-only loss,
                                                                                  length-normalised log-likelihood)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tasks import classification as C
from ..tasks import multiple_choice as MC

CLASSIFICATION, MULTIPLE_CHOICE = "classification", "multiple_choice"


@dataclass
class TaskData:
    name: str
    kind: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] | None = None  # classification: label id -> name
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int | None:
        if self.kind != CLASSIFICATION:
            return None
        if self.label_names:
            return len(self.label_names)
        labels = [ex["label"] for ex in self.train + self.eval]
        return max(labels) + 1 if labels else 2


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def train_features(kind: str, tokenizer, examples: list[dict], max_length: int):
    """(features, collator) for the Trainer."""
    if kind == CLASSIFICATION:
        return C.tokenize_classification(tokenizer, examples, max_length), C.classification_collator(tokenizer)
    return MC.training_features(tokenizer, examples, max_length), MC.MultipleChoiceCollator.for_tokenizer(tokenizer)


def accuracy(kind: str, model, tokenizer, examples: list[dict], batch_size: int, max_length: int,
             device: torch.device) -> float:
    if kind == CLASSIFICATION:
        return C.evaluate_classification(model, tokenizer, examples, batch_size, max_length, device)["accuracy"]
    return MC.evaluate_multiple_choice(model, tokenizer, examples, batch_size, max_length, device)["accuracy"]


def majority_accuracy(kind: str, examples: list[dict]) -> float | None:
    """Accuracy of always giving the eval set's most common label (or answer position): the floor a trained
    model must beat to have learned more than the class balance."""
    if not examples:
        return None
    counts = Counter(ex["label"] if kind == CLASSIFICATION else ex["answer"] for ex in examples)
    return max(counts.values()) / len(examples)


def example_ids(kind: str, tokenizer, example: dict, max_length: int) -> list[int]:
    """Token ids of one example as the model sees it (multiple choice: prompt + correct answer + eos)."""
    if kind == CLASSIFICATION:
        return list(C.tokenize_classification(tokenizer, [example], max_length)[0]["input_ids"])
    return list(MC.training_features(tokenizer, [example], max_length)[0]["input_ids"])
