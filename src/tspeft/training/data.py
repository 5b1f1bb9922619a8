"""The training side's view of a task: examples, tokenised features, collators, scoring.

Examples (shipped tasks and users' files) are loaded by `tspeft.tasks.data`; this module turns them into
model features. The multiple-choice prompt format and scoring used for training and evaluation are here
(`mc_prompt`, `mc_pair_ids`, `mc_option_scores`) unless `tspeft.tasks.multiple_choice` provides them.

Examples, whatever their source:
    classification:   {"text": str, "text_pair": str | None, "label": int}
    multiple choice:  {"question": str, "options": [str, ...], "answer": int}
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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


def tasks_module(name: str):
    """tspeft.tasks.<name>, or None while it does not exist."""
    try:
        return importlib.import_module(f"tspeft.tasks.{name}")
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("tspeft.tasks"):
            return None
        raise


# ----- tokenisation ----------------------------------------------------------------------------------------------
class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def classification_features(tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    features = []
    for ex in examples:
        args = (ex["text"],) if not ex.get("text_pair") else (ex["text"], ex["text_pair"])
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        features.append({**{k: list(v) for k, v in enc.items()}, "labels": int(ex["label"])})
    return features


def mc_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def mc_pair_ids(tokenizer, question: str, option: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer continuation (truncated from the left of the prompt)."""
    prompt = tokenizer(mc_prompt(question), add_special_tokens=True)["input_ids"]
    answer = tokenizer(" " + option.strip(), add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    answer = answer[: max_length - 1]
    prompt = prompt[-(max_length - len(answer)):]
    return list(prompt), list(answer)


def mc_train_features(tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    """Prompt + correct answer; the loss is on the answer tokens only (labels -100 elsewhere)."""
    features = []
    for ex in examples:
        prompt, answer = mc_pair_ids(tokenizer, ex["question"], ex["options"][ex["answer"]], max_length)
        ids = prompt + answer
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [-100] * len(prompt) + answer})
    return features


class PadCollator:
    """Right-pads input_ids / attention_mask / labels (labels with -100)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pad = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}
        batch = {}
        for key in features[0]:
            if isinstance(features[0][key], list):
                batch[key] = torch.tensor([f[key] + [pad.get(key, 0)] * (width - len(f[key])) for f in features])
            else:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


@torch.no_grad()
def mc_option_scores(model, tokenizer, examples: list[dict], max_length: int, batch_size: int,
                     device: torch.device) -> list[list[float]]:
    """Length-normalised log-likelihood of each option's answer tokens given the prompt."""
    pairs = []
    for i, ex in enumerate(examples):
        for j, option in enumerate(ex["options"]):
            prompt, answer = mc_pair_ids(tokenizer, ex["question"], option, max_length)
            pairs.append((i, j, prompt, answer))
    scores = [[0.0] * len(ex["options"]) for ex in examples]
    collate = PadCollator(tokenizer.pad_token_id)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        feats = [{"input_ids": p + a, "attention_mask": [1] * (len(p) + len(a)), "labels": [-100] * len(p) + a}
                 for _, _, p, a in chunk]
        batch = {k: v.to(device) for k, v in collate(feats).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != -100
        token_logp = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        mean = token_logp.sum(-1) / mask.sum(-1).clamp_min(1)
        for (i, j, _, _), value in zip(chunk, mean.tolist()):
            scores[i][j] = value
    return scores
