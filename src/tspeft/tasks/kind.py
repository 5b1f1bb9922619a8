"""What a kind of task is: one object that knows its examples, features, collator, scoring and model.

    kind = get_kind("classification")                       # tspeft.tasks.kinds: the registry
    examples, labels = kind.read_file("train.jsonl", {"text": "sentence"})     # labels: a LabelSet (or None)
    features = kind.features(tokenizer, examples, max_length=64)     # Trainer-ready, one dict per example
    batch = kind.collator(tokenizer)(features[:8])                   # padded tensors
    accuracy = kind.evaluate(model, tokenizer, examples, batch_size=64, max_length=64, device="cpu")["accuracy"]

A kind declares:

    name            "classification", "multiple_choice", ...  (written to metrics.json as task_kind)
    roles           column roles of its examples and users' files, e.g. ("text", "text_pair", "label")
    optional_roles  roles a file may leave out
    gold_role       the role holding the correct answer (majority accuracy, token-mask records)
    marker_role     the role whose column marks a user's file as this kind (None: the fallback kind)
    model_kind      what `load_model` builds ("classification": a sequence-classification head, "causal_lm")
    peft_task_type  peft's task_type for its LoraConfig ("SEQ_CLS", "CAUSAL_LM")
    has_head        a randomly initialised head that is trained in full (method `none` = a probe on the frozen model);
                    without one, method `none` is zero-shot scoring (nothing trained)
    default_model, default_batch_size, default_max_length   the run defaults for this kind
    has_tokens      whether inputs are token ids (False for images: no token masks or token statistics)

and implements `example_from_row` (one user row -> one example), `features`, `collator`, `evaluate` and
`example_ids`. Optional hooks (the defaults fit text kinds): `claims_path` (a ``--data`` path that is this
kind's without reading columns, e.g. an image folder), `target_modules` (the layers to adapt; None: training's
Linear default), `extra_records` (more JSON files for a gated run's folder), `run_settings` (input settings
written to metrics.json), and `load_model`'s ``input_size``. Adding a kind: one module defining a `TaskKind`
subclass and one line in `tspeft.tasks.kinds.TASK_KINDS`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

from . import files
from .labels import LabelSet

Example = dict[str, Any]


class TaskKind:
    """Base class of the task kinds (see the module docstring); subclasses set the class attributes."""

    name: str
    roles: tuple[str, ...]
    optional_roles: tuple[str, ...] = ()
    gold_role: str
    marker_role: str | None = None
    model_kind: str
    peft_task_type: str
    has_head: bool = False
    default_model: str
    default_batch_size: int
    default_max_length: int | None
    has_tokens: bool = True

    def __repr__(self) -> str:
        return f"<task kind {self.name}>"

    # ----- users' files
    def claims(self, header: set[str], columns: dict[str, str | None]) -> bool:
        """Whether a user's file with the keys ``header`` holds this kind's data: its marker role's column
        (as ``columns`` names it, else the role's own name) is there."""
        return self.marker_role is not None and (columns.get(self.marker_role) or self.marker_role) in header

    def configured(self, settings: dict[str, Any], train: list[Example]) -> "TaskKind":
        """This kind with a run's own settings (`settings`: the run configuration's fields, e.g. decoding
        options; `train`: its training examples). Kinds without such settings return themselves."""
        return self

    def settings(self) -> dict[str, Any] | None:
        """The run settings this kind was configured with (recorded in metrics.json), None if it has none."""
        return None

    def column_map(self, columns: dict[str, str] | None = None) -> dict[str, str]:
        """Role -> column name: each role's own name unless ``columns`` renames it; ValueError on unknown roles."""
        unknown = set(columns or {}) - set(self.roles)
        if unknown:
            raise ValueError(f"unknown column roles {sorted(unknown)} for {self.name} data; "
                             f"roles are {list(self.roles)}")
        return {**{role: role for role in self.roles}, **(columns or {})}

    def example_from_row(self, row: dict, mapping: dict[str, str], path: Path, where: str) -> Example:
        """One example from one row of a user's file; ValueError naming ``path`` and ``where`` if it is bad."""
        raise NotImplementedError

    def read_file(self, path: str | Path, columns: dict[str, str] | None = None,
                  labels: LabelSet | None = None) -> tuple[list[Example], LabelSet | None]:
        """Examples of one JSONL/CSV file and, for kinds with labels, their label set (`tspeft.tasks.labels`):
        ``labels`` when given (a saved model's: the file's labels are mapped through it by value), else the
        file's own."""
        path = Path(path)
        mapping = self.column_map(columns)
        rows = files.read_rows(path)
        files.check_columns(path, rows, mapping, optional=self.optional_roles)
        return [self.example_from_row(row, mapping, path, row["_where"]) for row in rows], None

    def read_files(self, train_path: str | Path, eval_path: str | Path | None, columns: dict[str, str] | None = None
                   ) -> tuple[list[Example], list[Example] | None, LabelSet | None]:
        """``(train examples, eval examples or None, label set)`` of a train file and an optional eval file
        (kinds with labels: the train file's label set, through which the eval file is read)."""
        train, labels = self.read_file(train_path, columns)
        evaluation = self.read_file(eval_path, columns, labels)[0] if eval_path else None
        return train, evaluation, labels

    def num_labels(self, labels: LabelSet | None, examples: list[Example]) -> int | None:
        """Number of classes of a head (None for kinds without a head)."""
        return None

    def claims_path(self, path: str | Path | None) -> bool:
        """Whether a ``--data`` path is this kind's by its form alone (an image folder); else columns decide."""
        return False

    # ----- model
    def load_model(self, name_or_path: str, num_labels: int | None, input_size: int | None = None) -> tuple[Any, Any]:
        """``(model, tokenizer)`` for this kind from an embedded name or a local folder (``input_size``: the
        side of an image input in pixels; kinds with token inputs have none)."""
        from .resources import load_model_and_tokenizer

        if input_size is not None:
            raise ValueError(f"--image-size applies to image runs, not to {self.name} data")
        return load_model_and_tokenizer(name_or_path, self.model_kind, num_labels=num_labels or 2)

    def target_modules(self, model) -> list[str] | None:
        """Names of the layers to adapt in ``model``; None: training's default (its nn.Linear layers)."""
        return None

    # ----- features and scoring
    def features(self, tokenizer, examples: list[Example], max_length: int) -> list[dict[str, Any]]:
        """Trainer-ready features (input_ids, attention_mask, labels, ...) of each example."""
        raise NotImplementedError

    def collator(self, tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Pads a list of ``features`` into a batch of tensors."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                 device=None) -> dict[str, float]:
        """``{"accuracy": ...}`` (and any further metrics of the kind) of ``model`` on ``examples``."""
        raise NotImplementedError

    def example_ids(self, tokenizer, example: Example, max_length: int) -> list[int]:
        """Token ids of one example as the model sees it in training."""
        return list(self.features(tokenizer, [example], max_length)[0]["input_ids"])

    def extra_records(self, model, ts_model, tokenizer, examples: list[Example], device) -> dict[str, Any]:
        """{file name: JSON value} written into a gated run's folder from its eval ``examples`` (none by default)."""
        return {}

    def run_settings(self, tokenizer) -> dict[str, Any]:
        """Input settings recorded in metrics.json beside max_length (none by default)."""
        return {}

    def majority_accuracy(self, examples: list[Example]) -> float | None:
        """Accuracy of always giving the most common gold value of ``examples`` (None if there are none): the
        floor a trained model must beat to have learned more than the class balance."""
        if not examples:
            return None
        counts = Counter(example[self.gold_role] for example in examples)
        return max(counts.values()) / len(examples)
