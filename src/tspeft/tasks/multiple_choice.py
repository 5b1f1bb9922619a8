"""Multiple choice with causal LMs: prompt format, answer-only training features, and log-likelihood scoring.

Examples are ``{"question": str, "options": list[str], "answer": int}`` (answer: a 0-based index); users'
files name the columns of the roles ``question``, ``options`` (a list, a JSON list string or lettered lines
"A. ...") and ``answer`` (an index, a letter or "B. option text"). ``MULTIPLE_CHOICE`` is the task kind.

Prompt (``show_options=True``; the default, ``SHOW_OPTIONS``, is False)::

    <question>
    A. <option 0>
    B. <option 1>
    Answer:

followed by `` <option text>`` — the option's own words, not its letter. With ``show_options=False`` the
lettered lines are left out. Training sequences are prompt + answer + eos with labels -100 on the prompt and
on padding, so only the answer tokens (and eos) are learned. Scoring ranks each option by the mean
log-probability of its tokens given the prompt (length-normalised log-likelihood).

Truncation never cuts an answer: when prompt + answer exceed ``max_length``, tokens are dropped from the
*start* of the prompt (the beginning of a long passage), keeping the question's end, the options and
"Answer:" next to the answer; a leading BOS token is kept. An answer that cannot fit raises ValueError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from . import files
from .kind import Example, TaskKind

IGNORE_INDEX = -100
SHOW_OPTIONS = False  # plain "question\nAnswer: option" scored best zero-shot with SmolLM2 on PIQA
_OPTION_LINE = re.compile(r"^\s*([A-Z])[.)]\s?(.*)$")


def format_prompt(question: str, options: list[str], show_options: bool = SHOW_OPTIONS) -> str:
    """The text the model sees before the answer."""
    lines = [question.strip()]
    if show_options:
        lines += [f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options)]
    lines.append("Answer:")
    return "\n".join(lines)


def answer_text(option: str) -> str:
    """How an option is written after "Answer:"."""
    return " " + option.strip()


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad


def _fit(prompt_ids: list[int], answer_ids: list[int], max_length: int, tokenizer) -> list[int]:
    """Prompt ids shortened from the left (after any BOS) so that prompt + answer fit in max_length."""
    bos = tokenizer.bos_token_id
    keep_first = int(bool(prompt_ids) and bos is not None and prompt_ids[0] == bos)
    budget = max_length - len(answer_ids)
    if budget < keep_first + 1:
        raise ValueError(f"an answer of {len(answer_ids)} tokens leaves no room for the prompt within max_length="
                         f"{max_length}; raise max_length")
    if len(prompt_ids) <= budget:
        return prompt_ids
    return prompt_ids[:keep_first] + prompt_ids[len(prompt_ids) - (budget - keep_first):]


def _prompt_and_answers(tokenizer, example: dict, show_options: bool) -> tuple[list[int], list[list[int]]]:
    prompt_ids = tokenizer(format_prompt(example["question"], example["options"], show_options))["input_ids"]
    answers = [tokenizer(answer_text(option), add_special_tokens=False)["input_ids"] for option in example["options"]]
    return prompt_ids, answers


def training_features(tokenizer, examples: list[dict], max_length: int = 256,
                      show_options: bool = SHOW_OPTIONS) -> list[dict[str, list[int]]]:
    """Per example: input_ids = prompt + correct answer + eos, labels = -100 on the prompt, the answer + eos after."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to end answers with")
    features = []
    for example in examples:
        prompt_ids, answers = _prompt_and_answers(tokenizer, example, show_options)
        target = answers[example["answer"]] + [eos]
        prompt_ids = _fit(prompt_ids, target, max_length, tokenizer)
        features.append({"input_ids": prompt_ids + target, "attention_mask": [1] * (len(prompt_ids) + len(target)),
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + target})
    return features


class MultipleChoiceDataset(Dataset):
    """Answer-only causal-LM training features for ``transformers.Trainer`` (pair with ``MultipleChoiceCollator``)."""

    def __init__(self, examples: list[dict], tokenizer, max_length: int = 256, show_options: bool = SHOW_OPTIONS):
        self.features = training_features(tokenizer, examples, max_length, show_options)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


@dataclass
class MultipleChoiceCollator:
    """Right-pads features to the longest in the batch: pad id in input_ids, 0 in attention_mask, -100 in labels."""

    pad_token_id: int

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "MultipleChoiceCollator":
        return cls(_pad_id(tokenizer))

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, value in fill.items():
            if key in features[0]:
                batch[key] = torch.tensor([list(f[key]) + [value] * (length - len(f[key])) for f in features])
        return batch


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def option_log_likelihoods(model, tokenizer, examples: list[dict], batch_size: int = 8, max_length: int = 256,
                           device: str | torch.device | None = None,
                           show_options: bool = SHOW_OPTIONS) -> list[list[float]]:
    """For each example, each option's mean log-probability per token given the prompt."""
    device = torch.device(device) if device is not None else _model_device(model)
    pad = _pad_id(tokenizer)
    sequences = []  # (example index, option index, token ids, number of answer tokens)
    for e_index, example in enumerate(examples):
        prompt_ids, answers = _prompt_and_answers(tokenizer, example, show_options)
        for o_index, answer_ids in enumerate(answers):
            if not answer_ids:
                raise ValueError(f"example {e_index}: option {o_index} tokenises to nothing")
            ids = _fit(prompt_ids, answer_ids, max_length, tokenizer) + answer_ids
            sequences.append((e_index, o_index, ids, len(answer_ids)))
    scores = [[0.0] * len(example["options"]) for example in examples]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][2]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = [sequences[i] for i in order[start:start + batch_size]]
            length = max(len(ids) for _, _, ids, _ in chunk)
            input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for _, _, ids, _ in chunk], device=device)
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for _, _, ids, _ in chunk],
                                          device=device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            for row, (e_index, o_index, ids, n_answer) in enumerate(chunk):
                end = len(ids)
                # logits at position t predict token t + 1
                step_logits = logits[row, end - n_answer - 1:end - 1].float()
                targets = input_ids[row, end - n_answer:end]
                token_log_probs = F.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
                scores[e_index][o_index] = token_log_probs.mean().item()
    finally:
        model.train(was_training)
    return scores


def score_choices(model, tokenizer, examples: list[dict], batch_size: int = 8, max_length: int = 256,
                  device: str | torch.device | None = None, show_options: bool = SHOW_OPTIONS) -> list[int]:
    """The chosen option per example: highest mean log-probability of its tokens (ties: the first)."""
    scores = option_log_likelihoods(model, tokenizer, examples, batch_size, max_length, device, show_options)
    return [max(range(len(row)), key=lambda i: row[i]) for row in scores]


def evaluate_multiple_choice(model, tokenizer, examples: list[dict], batch_size: int = 8, max_length: int = 256,
                             device: str | torch.device | None = None,
                             show_options: bool = SHOW_OPTIONS) -> dict[str, float]:
    """``{"accuracy": fraction of examples whose chosen option is the answer}``."""
    if not examples:
        raise ValueError("no examples to evaluate")
    choices = score_choices(model, tokenizer, examples, batch_size, max_length, device, show_options)
    return {"accuracy": sum(int(c == e["answer"]) for c, e in zip(choices, examples)) / len(examples)}


# ----- users' files
def parse_options(value: Any) -> list[str]:
    """Options from a list, a JSON list string, or lettered lines "A. first\\nB. second" (lines without a
    letter continue the option above). Raises ValueError if fewer than two options are found."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"options look like a JSON list but do not parse: {value[:60]!r}") from None
    if isinstance(value, list):
        options = [str(option).strip() for option in value]
    elif isinstance(value, str):
        options = []
        for line in value.splitlines():
            match = _OPTION_LINE.match(line)
            if match and match.group(1) == chr(ord("A") + len(options)):
                options.append(match.group(2).strip())
            elif options:
                options[-1] = f"{options[-1]}\n{line.strip()}".strip()
            elif line.strip():
                raise ValueError(f"options must start with 'A. ', got {line[:60]!r}")
    else:
        raise ValueError(f"options must be a list or 'A. ...\\nB. ...' text, got {type(value).__name__}")
    if len(options) < 2:
        raise ValueError(f"need at least two options, found {len(options)}")
    if any(not option for option in options):
        raise ValueError("an option is empty")
    return options


def parse_answer(value: Any, options: list[str]) -> int:
    """Answer index from a 0-based int (or digit string), a letter ("B"), or a lettered option ("B. text")."""
    if isinstance(value, bool):
        raise ValueError(f"answer must be an index, a letter or 'B. option text', got {value!r}")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        index = value
    elif isinstance(value, str):
        text = value.strip()
        match = _OPTION_LINE.match(text.splitlines()[0]) if text else None
        if len(text) == 1 and text.isalpha() and text.isupper():
            index = ord(text) - ord("A")
        elif match:
            index = ord(match.group(1)) - ord("A")
            stated = " ".join(text[match.start(2):].split())
            if index < len(options) and stated and stated != " ".join(options[index].split()):
                raise ValueError(f"answer {text[:60]!r} does not match option {match.group(1)} "
                                 f"({options[index][:60]!r})")
        else:
            raise ValueError(f"answer must be an index, a letter or 'B. option text', got {text[:60]!r}")
    else:
        raise ValueError(f"answer must be an index, a letter or 'B. option text', got {type(value).__name__}")
    if not 0 <= index < len(options):
        raise ValueError(f"answer {value!r} is out of range for {len(options)} options")
    return index


def example_from_row(row: dict, mapping: dict[str, str], path: Path, where: str) -> Example:
    question = files.text_field(row, mapping["question"], path, where)
    try:
        options = parse_options(row.get(mapping["options"]))
        answer = parse_answer(row.get(mapping["answer"]), options)
    except ValueError as error:
        raise ValueError(f"{path}: {where}: {error}") from None
    return {"question": question, "options": options, "answer": answer}


class MultipleChoiceKind(TaskKind):
    """Multiple choice with a causal LM: answer-only training, options ranked by their mean log-likelihood."""

    name = "multiple_choice"
    roles = ("question", "options", "answer")
    gold_role = "answer"
    marker_role = "options"
    model_kind = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    default_model = "smollm2"
    default_batch_size = 8
    default_max_length = 192

    def example_from_row(self, row: dict, mapping: dict[str, str], path: Path, where: str) -> Example:
        return example_from_row(row, mapping, path, where)

    def features(self, tokenizer, examples: list[Example], max_length: int) -> list[dict[str, Any]]:
        return training_features(tokenizer, examples, max_length)

    def collator(self, tokenizer) -> MultipleChoiceCollator:
        return MultipleChoiceCollator.for_tokenizer(tokenizer)

    def evaluate(self, model, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                 device=None) -> dict[str, float]:
        return evaluate_multiple_choice(model, tokenizer, examples, batch_size, max_length, device)


MULTIPLE_CHOICE = MultipleChoiceKind()
