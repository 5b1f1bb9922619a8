"""The training side's view of a task: a run's examples (`TaskData`) and where they come from (`load_data`).

Examples come from `tspeft.tasks.data` (shipped tasks and users' files); what to do with them (features,
collator, scoring, model kind) is the task kind's (`tspeft.tasks.kinds`):

    classification:   {"text": str, "text_pair": str | None, "label": int}
    multiple choice:  {"question": str, "options": [str, ...], "answer": int}   (causal LM, answer-only loss,
                                                                                  length-normalised log-likelihood)
    generation:       {"prompt": str, "response": str} or {"messages": [...]}  (causal LM, response-only loss,
                                                                                  greedy decoding, exact match)

A kind with run settings (generation: answer pattern, new tokens, few-shot) is configured here, from the
run's configuration, else the saved run's settings (`tspeft eval`), else the shipped task's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..tasks import data as tasks_data
from ..tasks.files import read_rows
from ..tasks.kind import TaskKind
from ..tasks.kinds import TASK_KINDS, get_kind, kind_for_columns, kind_for_path
from ..tasks.labels import LabelSet
from .defaults import DEFAULTS


@dataclass
class TaskData:
    """A run's examples: ``kind`` says how to turn them into features and how to score them."""

    name: str
    kind: TaskKind
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: LabelSet | None = None  # kinds with labels: class id -> label value and name (tspeft.tasks.labels)
    notes: list[str] = field(default_factory=list)
    # Examples of the train pool the run does not train on (shipped tasks with --n-train below the pool): the
    # gates' thresholds are calibrated on their inputs at train end (`fit`); empty: on training batches.
    calibration: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label_names(self) -> list[str] | None:
        return list(self.labels.names) if self.labels is not None else None

    @property
    def num_labels(self) -> int | None:
        return self.kind.num_labels(self.labels, self.train + self.eval)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def column_names(cfg) -> dict[str, str | None]:
    """Role -> column as the run's configuration names it (``<role>_column``; None where not given). Roles without
    a column field (an image folder's images) are not listed."""
    roles = dict.fromkeys(role for kind in TASK_KINDS.values() for role in kind.roles)
    return {role: getattr(cfg, f"{role}_column", None) for role in roles if hasattr(cfg, f"{role}_column")}


def data_kind(cfg, path: str | None = None) -> TaskKind:
    """The kind of a user's data: by its form (an image folder), else by its columns (e.g. an options column
    means multiple choice)."""
    path = path or cfg.data or cfg.eval_data
    claimed = kind_for_path(path)
    if claimed is not None:
        return claimed
    rows = read_rows(path)
    header = {key for row in rows[:50] for key in row}
    return kind_for_columns(header, column_names(cfg))


def _role_columns(cfg, kind: TaskKind) -> dict[str, str]:
    columns = column_names(cfg)
    return {role: columns[role] for role in kind.roles if columns.get(role) is not None}


KIND_SETTINGS = ("answer_pattern", "max_new_tokens", "few_shot")  # run settings a kind may take (configured)


def kind_settings(cfg, saved: dict[str, Any] | None, spec=None) -> dict[str, Any]:
    """The kind's run settings: the configuration's, else the saved run's, else the shipped task's default."""
    settings = {}
    for key in KIND_SETTINGS:
        value = getattr(cfg, key, None)
        if value is None and key != "few_shot":  # a saved few-shot run is re-evaluated as it was trained: none
            value = (saved or {}).get(key)
        settings[key] = value if value is not None else getattr(spec, key, None)
    return settings


def load_data(cfg, labels: LabelSet | None = None, kind: str | TaskKind | None = None,
              saved_settings: dict[str, Any] | None = None) -> TaskData:
    """The run's examples: a shipped task (`cfg.task`) or user files (`cfg.data`, `cfg.eval_data`).

    `labels` (evaluating a saved run: its label set): the eval examples are mapped through it by value, and
    a label it lacks is an error. `kind` (a saved run's) skips guessing the kind of a user's file from its
    columns; `saved_settings` are that run's kind settings (see `kind_settings`).
    """
    data = _load_examples(cfg, labels, kind)
    spec = tasks_data.get_task(cfg.task) if cfg.task else None
    data.kind = data.kind.configured(kind_settings(cfg, saved_settings, spec), data.train)
    return data


def _load_examples(cfg, labels: LabelSet | None, kind: str | TaskKind | None) -> TaskData:
    if cfg.task:
        spec = tasks_data.get_task(cfg.task)
        train, evaluation = tasks_data.load_task(cfg.task, n_train=cfg.n_train or None, n_eval=cfg.n_eval,
                                                 seed=cfg.seed)
        if cfg.n_train == 0:
            train = []
        task_labels = LabelSet.for_task(spec.label_names) if spec.label_names else None
        if labels is not None and task_labels is not None and labels != task_labels:
            evaluation = [{**ex, "label": labels.translate(ex["label"], task_labels, f"task {cfg.task}")}
                          for ex in evaluation]
        calibration = tasks_data.unused_train_examples(cfg.task, cfg.n_train or None, cfg.n_eval, cfg.seed,
                                                       DEFAULTS.calibration_examples) if train else []
        return TaskData(cfg.task, get_kind(spec.kind), train, evaluation, labels or task_labels,
                        calibration=calibration)
    task_kind = get_kind(kind) if kind else data_kind(cfg)
    columns = _role_columns(cfg, task_kind)
    if cfg.data is None:  # evaluation of a saved run on one file
        evaluation, found = task_kind.read_file(cfg.eval_data, columns, labels)
        if cfg.n_eval:
            evaluation = evaluation[:cfg.n_eval]
        return TaskData(Path(cfg.eval_data).stem, task_kind, [], evaluation, found)
    if labels is not None:  # a saved run's own split: the same examples, read through its label set
        user = tasks_data.load_user_data(cfg.data, cfg.eval_data, task_kind.name, columns, n_train=cfg.n_train or None,
                                         n_eval=cfg.n_eval, seed=cfg.seed, trains=False)
        # (training examples of a class the run dropped are left out: they are not scored)
        return TaskData(Path(cfg.data).stem, task_kind, _relabel(user.train, user.labels, labels, task_kind),
                        _relabel(user.eval, user.labels, labels, task_kind, strict=True), labels)
    user = tasks_data.load_user_data(cfg.data, cfg.eval_data, task_kind.name, columns, n_train=cfg.n_train or None,
                                     n_eval=cfg.n_eval, seed=cfg.seed)
    return TaskData(Path(cfg.data).stem, task_kind, user.train, user.eval, user.labels)


def _relabel(examples: list[dict], found: LabelSet, saved: LabelSet, kind: TaskKind, strict: bool = False
             ) -> list[dict]:
    """Examples labelled by the file's own label set, in the ids of a saved run's set (by value); `strict`:
    a label the saved set lacks is an error, else the example is left out."""
    if found == saved:
        return examples
    role = kind.gold_role
    known = examples if strict else [ex for ex in examples if found.values[ex[role]] in saved.values]
    return [{**ex, role: saved.translate(ex[role], found, "the run's data")} for ex in known]
