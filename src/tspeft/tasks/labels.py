"""The label set of a classifier: which label value each output id stands for. It is part of the model.

    labels = LabelSet.of(["rotten", "fresh", "fresh"])     # values ('fresh', 'rotten'): fresh = 0, rotten = 1
    labels.id_of("rotten", "dev.jsonl: line 3")             # 1
    labels.id_of(0, "dev.jsonl: line 3")                    # ValueError: 0 is a number, the labels are names

Ids are given by value: the distinct values of the training labels, sorted (numbers numerically, names
alphabetically), so integer labels {0, 5} make two classes, not six. A shipped task's labels are the ids
0..K-1 with its names (`for_task`); a file may then give either. The set is saved with every run
(`to_json`) and every eval file is mapped through it, so a label the model never saw, or a number where
the model's labels are names, is refused with the file and line instead of being read as some class id.
Training needs at least two classes (`require_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

Label = int | str


@dataclass(frozen=True)
class LabelSet:
    values: tuple[Label, ...]  # values[i]: the label value of class id i
    names: tuple[str, ...]  # names[i]: what class id i is called (str(values[i]) unless a task names it)

    @classmethod
    def of(cls, labels: Iterable[Label]) -> "LabelSet":
        """The distinct `labels` in id order; ValueError if they mix numbers and names or a number is negative."""
        labels = list(labels)
        numbers = [label for label in labels if isinstance(label, int)]
        names = [label for label in labels if not isinstance(label, int)]
        if numbers and names:
            raise ValueError(f"labels mix integers ({numbers[0]!r}) and strings ({names[0]!r}); use one or the other")
        negative = [label for label in numbers if label < 0]
        if negative:
            raise ValueError(f"integer labels must be >= 0, found {negative[0]}")
        values = tuple(sorted(set(labels)))
        return cls(values, tuple(str(value) for value in values))

    @classmethod
    def for_task(cls, names: Iterable[str]) -> "LabelSet":
        names = tuple(names)
        return cls(tuple(range(len(names))), names)

    @property
    def numeric(self) -> bool:
        return all(isinstance(value, int) for value in self.values)

    def __len__(self) -> int:
        return len(self.values)

    def describe(self, limit: int = 8) -> str:
        shown = ", ".join(repr(value) for value in self.values[:limit])
        return f"({shown}{', ...' if len(self.values) > limit else ''})"

    def id_of(self, label: Label, where: str) -> int:
        """The class id of `label` (by value, or a shipped task's name); ValueError naming `where` otherwise."""
        if label in self.values and isinstance(label, int) == self.numeric:
            return self.values.index(label)
        if isinstance(label, str) and self.numeric and label in self.names:
            return self.names.index(label)
        if isinstance(label, int) and not self.numeric:
            raise ValueError(f"{where}: label {label!r} is a number, but the model's labels are names "
                             f"{self.describe()}")
        if isinstance(label, str) and self.numeric and self.names == tuple(map(str, self.values)):
            raise ValueError(f"{where}: label {label!r} is a name, but the model's labels are numbers "
                             f"{self.describe()}")
        raise ValueError(f"{where}: label {label!r} is not one of the model's labels {self.describe()}")

    def translate(self, other_id: int, other: "LabelSet", where: str) -> int:
        """This set's id of class `other_id` of `other` (by value; by name where one of them has names)."""
        value = other.values[other_id] if self.numeric and other.numeric else other.names[other_id]
        return self.id_of(value, where)

    def require_classes(self, train_ids: Iterable[int], source: str) -> None:
        """Training needs two classes or more among the training examples (one class trains nothing)."""
        present = sorted(set(train_ids))
        if len(present) < 2:
            only = f" ({self.values[present[0]]!r})" if present else ""  # ids of this set
            raise ValueError(f"{source}: the training examples hold {'one' if present else 'no'} class{only}; "
                             "a classifier needs at least two")

    def fit_training(self, train: list[dict], evaluation: list[dict], role: str, source: str
                     ) -> tuple["LabelSet", list[dict], list[dict]]:
        """The classes of the chosen training examples (ids in `role`) as the label set, examples re-indexed.

        Refuses fewer than two classes, and an eval label that no training example has (a class the model
        could never predict: in a one-file split it can fall into the eval part alone). Classes of the file
        that the chosen examples lack are dropped, so the head has no untrained output.
        """
        present = sorted({example[role] for example in train})
        self.require_classes(present, source)
        unseen = sorted({example[role] for example in evaluation} - set(present))
        if unseen:
            raise ValueError(f"{source}: the eval examples hold the label {self.values[unseen[0]]!r}, which no "
                             "training example has (the model could never predict it); add training examples "
                             "of it or leave it out")
        if len(present) == len(self):
            return self, train, evaluation
        new_id = {old: new for new, old in enumerate(present)}
        narrowed = LabelSet(tuple(self.values[i] for i in present), tuple(self.names[i] for i in present))
        return (narrowed, [{**ex, role: new_id[ex[role]]} for ex in train],
                [{**ex, role: new_id[ex[role]]} for ex in evaluation])

    def to_json(self) -> dict[str, Any]:
        return {"values": list(self.values), "names": list(self.names)}

    @classmethod
    def from_json(cls, saved: dict[str, Any], source: str = "labels") -> "LabelSet":
        values, names = saved.get("values"), saved.get("names")
        ok = (isinstance(values, list) and isinstance(names, list) and len(values) == len(names) >= 1
              and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in values)
              and all(isinstance(n, str) for n in names) and len(set(values)) == len(values))
        if not ok:
            raise ValueError(f"{source}: not a label set (expected 'values' and 'names', lists of equal length)")
        return cls(tuple(values), tuple(names))

    @classmethod
    def from_run_metrics(cls, run: dict[str, Any]) -> "LabelSet | None":
        """A run folder written before label sets were saved: rebuilt from metrics.json's label names."""
        names = run.get("label_names")
        if not names:
            return None
        if (run.get("data") or {}).get("task"):
            return cls.for_task(names)
        if all(str(name).isdigit() for name in names):  # integer labels were written as "0".."K-1"
            return cls(tuple(int(name) for name in names), tuple(names))
        return cls(tuple(names), tuple(names))
