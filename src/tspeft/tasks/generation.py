"""Generation: prompt/response or chat data, response-only training features, and exact-match scoring.

Examples are ``{"prompt": str, "response": str, "_where": "FILE: line N"}`` or
``{"messages": [{"role": ..., "content": ...}, ...], "_where": ...}`` (chat turns, the last one the
assistant's). What the model sees and what it learns::

    prompt/response:  <bos?> prompt response <eos>         labels: -100 … -100 | response ids, eos
                      (concatenated as given: put the separator, e.g. "\\nAnswer:", in the prompt)
    messages:         chat_template(turns)                 labels: the assistant turns' tokens (their content
                      and end-of-turn marker), -100 elsewhere (system/user turns, template headers)

Padding gets label -100 too (the collator), so the loss is the mean over response tokens only. A sequence
longer than ``max_length`` is an error naming the file and row (nothing is cut silently: cutting the
prompt would drop the question, cutting the response would teach a truncated answer).

Scoring: greedy generation (decoding.py) from the prompt (messages: the turns before the last assistant
turn, with the template's generation prompt), then exact match of ``normalise(extract(text))`` against the
reference normalised the same way. ``normalise``: lower case, punctuation and the articles a/an/the
dropped, whitespace collapsed (SQuAD's rule). ``extract`` with an ``answer_pattern`` (a regex): its first
match in the text — group 1 if the pattern has a group, else the whole match; no match scores as wrong.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files
from .kind import Example, TaskKind

IGNORE_INDEX = -100
ROLES = ("prompt", "response", "messages")
DEFAULT_COLUMNS = {"prompt": "prompt", "response": "response", "messages": None}
ASSISTANT = "assistant"
DEFAULT_MAX_NEW_TOKENS = 32  # greedy decoding stops at eos or after this many tokens


# ----- reading users' files ---------------------------------------------------------------------------------------
def generation_examples(rows: list[dict], path: str | Path, columns: dict[str, str | None]) -> list[dict[str, Any]]:
    """Examples from rows read by ``tasks.data.read_rows``; ``columns`` maps prompt/response/messages to columns.

    With a ``messages`` column (given, or a file with a "messages" but no response column) the rows are chats;
    otherwise prompt and response columns are required.
    Raises ValueError naming the file and row for a missing/empty response, a chat that is not a list of
    role/content turns, or a chat without an assistant turn.
    """
    columns = {**DEFAULT_COLUMNS, **{k: v for k, v in columns.items() if v is not None}}
    unknown = set(columns) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown column roles {sorted(unknown)} for generation data; roles are {list(ROLES)}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    found = sorted({key for row in rows for key in row if key != "_where"})
    if not columns["messages"] and "messages" in found and columns["response"] not in found:
        columns["messages"] = "messages"  # a chat file in the default column, no flag needed
    needed = [columns["messages"]] if columns["messages"] else [columns["prompt"], columns["response"]]
    for column in needed:
        if column not in found:
            raise ValueError(f"{path}: missing column {column!r}; columns found: {found}")
    if columns["messages"]:
        return [_chat_example(row, columns["messages"], f"{path}: {row['_where']}") for row in rows]
    return [_prompt_response_example(row, columns, f"{path}: {row['_where']}") for row in rows]


def _prompt_response_example(row: dict, columns: dict, where: str) -> dict[str, Any]:
    prompt, response = row.get(columns["prompt"]), row.get(columns["response"])
    if response is None:
        raise ValueError(f"{where}: no response (column {columns['response']!r} is missing or null)")
    if not isinstance(response, str) or not isinstance(prompt, str):
        bad = columns["response"] if not isinstance(response, str) else columns["prompt"]
        raise ValueError(f"{where}: column {bad!r} must be text, got {type(row.get(bad)).__name__}")
    if not response.strip():
        raise ValueError(f"{where}: empty response in column {columns['response']!r}")
    return {"prompt": prompt, "response": response, "_where": where}


def _chat_example(row: dict, column: str, where: str) -> dict[str, Any]:
    turns = row.get(column)
    if isinstance(turns, str):  # CSV cells hold the turns as a JSON list
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: column {column!r} is not a JSON list of turns") from None

    def is_turn(turn) -> bool:
        return isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)

    if not isinstance(turns, list) or not turns or not all(is_turn(t) for t in turns):
        raise ValueError(f"{where}: column {column!r} must be a non-empty list of {{'role', 'content'}} turns")
    if not any(t["role"] == ASSISTANT for t in turns):
        raise ValueError(f"{where}: the chat has no assistant turn to learn from")
    while turns[-1]["role"] != ASSISTANT:  # trailing user turns have no answer to learn or score
        turns = turns[:-1]
    if not turns[-1]["content"].strip():
        raise ValueError(f"{where}: the last assistant turn is empty")
    return {"messages": [{"role": t["role"], "content": t["content"]} for t in turns], "_where": where}


# ----- rendering ----------------------------------------------------------------------------------------------
def _check_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat data needs a tokenizer with a chat template, and this model's tokenizer has "
                         "none; use --prompt-column/--response-column instead of --messages-column")


def _render(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def segments(tokenizer, example: dict) -> list[tuple[str, bool]]:
    """The example's text as (piece, learned) pieces in order; learned pieces are the response/assistant turns."""
    if "messages" not in example:
        return [(example["prompt"], False), (example["response"], True)]
    where, turns = example.get("_where", "chat"), example["messages"]
    _check_template(tokenizer, where)
    pieces, done = [], ""
    for i, turn in enumerate(turns):
        if turn["role"] != ASSISTANT:
            continue
        before, through = _render(tokenizer, turns[:i], True), _render(tokenizer, turns[:i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError(f"{where}: the chat template does not render turn {i} as a continuation of the "
                             "turns before it, so its tokens cannot be told apart")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return [(text, learned) for text, learned in pieces if text]


def prompt_text(tokenizer, example: dict) -> str:
    """What generation starts from: the prompt, or the chat before its last assistant turn plus the template's
    generation prompt."""
    if "messages" not in example:
        return example["prompt"]
    _check_template(tokenizer, example.get("_where", "chat"))
    return _render(tokenizer, example["messages"][:-1], True)


def reference_text(example: dict) -> str:
    return example["messages"][-1]["content"] if "messages" in example else example["response"]


def _encode(tokenizer, text: str, first: bool) -> list[int]:
    # Chat templates write their own BOS/headers: only a plain prompt gets the tokenizer's special tokens.
    return tokenizer(text, add_special_tokens=first)["input_ids"]


def prompt_ids(tokenizer, example: dict) -> list[int]:
    return _encode(tokenizer, prompt_text(tokenizer, example), "messages" not in example)


def training_features(tokenizer, examples: list[dict], max_length: int) -> list[dict[str, list[int]]]:
    """input_ids / attention_mask / labels per example: labels are the token ids on learned pieces, -100 elsewhere.

    Plain prompt/response examples end with eos (learned), so the model learns where to stop; chat templates
    write their own end-of-turn marker inside the assistant piece.
    """
    eos = tokenizer.eos_token_id
    features = []
    for example in examples:
        ids, labels = [], []
        for index, (text, learned) in enumerate(segments(tokenizer, example)):
            piece = _encode(tokenizer, text, index == 0 and "messages" not in example)
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        if "messages" not in example and eos is not None:
            ids, labels = ids + [eos], labels + [eos]
        where = example.get("_where", "example")
        if len(ids) > max_length:
            raise ValueError(f"{where}: prompt + response are {len(ids)} tokens, more than --max-length {max_length}; "
                             "raise --max-length or shorten the row")
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"{where}: the response tokenises to nothing")
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return features


# ----- scoring --------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


@dataclass(frozen=True)
class AnswerExtractor:
    """The part of a text that is the answer: the first match of `pattern` (group 1 if it has groups), or the
    whole text without a pattern."""

    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as error:
                raise ValueError(f"--answer-pattern {self.pattern!r} is not a valid regular expression: "
                                 f"{error}") from None

    def __call__(self, text: str) -> str | None:
        if self.pattern is None:
            return text
        match = re.search(self.pattern, text)
        if match is None:
            return None
        return match.group(1) if match.re.groups else match.group(0)

    def reference(self, text: str) -> str:
        """A reference's answer: extracted like a prediction, or the whole reference where the pattern misses."""
        extracted = self(text)
        return text if extracted is None else extracted

    def matches(self, prediction: str, reference: str) -> bool:
        extracted = self(prediction)
        return extracted is not None and normalise(extracted) == normalise(self.reference(reference))


def with_demonstrations(examples: list[dict], demonstrations: list[dict], separator: str = "\n\n") -> list[dict]:
    """Few-shot prompts: each prompt/response example's prompt prefixed by the demonstrations' prompt + response."""
    if any("messages" in ex for ex in examples + demonstrations):
        raise ValueError("few-shot demonstrations apply to prompt/response data, not to chats")
    prefix = "".join(d["prompt"] + d["response"] + separator for d in demonstrations)
    return [{**ex, "prompt": prefix + ex["prompt"]} for ex in examples]


class GenerationKind(TaskKind):
    """Generation with a causal LM: response-only training, greedy decoding scored by exact match.

    A run's decoding settings (`answer_pattern`, `max_new_tokens`, `few_shot` demonstrations taken from the
    train set, for method none) come in through `configured`, which returns a configured copy of the
    registered kind; `settings()` is what metrics.json records of them.
    """

    name = "generation"
    roles = ("prompt", "response", "messages")
    optional_roles = ROLES  # prompt + response, or messages: `generation_examples` checks which
    gold_role = "response"
    marker_role = "response"
    model_kind = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    default_model = "smollm2"
    default_batch_size = 8
    default_max_length = 256

    def __init__(self, answer_pattern: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 demonstrations: list[Example] | None = None):
        AnswerExtractor(answer_pattern)  # a bad pattern fails before anything is trained
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        self.answer_pattern, self.max_new_tokens = answer_pattern, max_new_tokens
        self.demonstrations = list(demonstrations or [])

    def configured(self, settings: dict[str, Any], train: list[Example]) -> "GenerationKind":
        shots = settings.get("few_shot") or 0
        if shots > len(train):
            raise ValueError(f"--few-shot {shots}: only {len(train)} training examples to take demonstrations from")
        return GenerationKind(settings.get("answer_pattern"), settings.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
                              train[:shots])

    def settings(self) -> dict[str, Any]:
        return {"answer_pattern": self.answer_pattern, "max_new_tokens": self.max_new_tokens,
                "few_shot": len(self.demonstrations)}

    def claims(self, header: set[str], columns: dict[str, str | None]) -> bool:
        """Generation data: the response column, or a chat column (``--messages-column``, default "messages")."""
        return any((columns.get(role) or role) in header for role in ("response", "messages"))

    def read_file(self, path, columns=None, labels=None) -> tuple[list[Example], None]:
        return generation_examples(files.read_rows(Path(path)), path, dict(columns or {})), None

    def features(self, tokenizer, examples: list[Example], max_length: int) -> list[dict[str, Any]]:
        return training_features(tokenizer, examples, max_length)

    def collator(self, tokenizer):
        from .multiple_choice import MultipleChoiceCollator  # right padding; pads get label -100

        return MultipleChoiceCollator.for_tokenizer(tokenizer)

    def evaluate(self, model, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                 device=None) -> dict[str, Any]:
        """accuracy (exact match), eval_loss and perplexity of the responses, predictions (decoding.py)."""
        from .decoding import evaluate_generation

        if self.demonstrations:
            examples = with_demonstrations(examples, self.demonstrations)
        return evaluate_generation(model, tokenizer, examples, max_length=max_length,
                                   max_new_tokens=self.max_new_tokens, batch_size=batch_size, device=device,
                                   answer_pattern=self.answer_pattern)

    def majority_accuracy(self, examples: list[Example]) -> float | None:
        """The share of the most common (extracted, normalised) reference answer."""
        if not examples:
            return None
        extractor = AnswerExtractor(self.answer_pattern)
        counts = Counter(normalise(extractor.reference(reference_text(ex))) for ex in examples)
        return max(counts.values()) / len(examples)


GENERATION = GenerationKind()
