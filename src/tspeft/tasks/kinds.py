"""The registry of task kinds: name -> `TaskKind` object (see `tspeft.tasks.kind` for the interface).

A new kind is one module defining a `TaskKind` subclass and its instance, plus one line here.
"""

from __future__ import annotations

from .classification import CLASSIFICATION
from .generation import GENERATION
from .image import IMAGE
from .kind import TaskKind
from .multiple_choice import MULTIPLE_CHOICE

TASK_KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (
    CLASSIFICATION,
    MULTIPLE_CHOICE,
    GENERATION,
    IMAGE,
)}
DEFAULT_KIND = CLASSIFICATION  # a user's file that no kind's marker column claims


def get_kind(name: str | TaskKind) -> TaskKind:
    """The kind called ``name`` (a kind is returned as it is); ValueError listing the known kinds."""
    if isinstance(name, TaskKind):
        return name
    if name not in TASK_KINDS:
        raise ValueError(f"unknown data kind {name!r}; expected one of {tuple(TASK_KINDS)}")
    return TASK_KINDS[name]


def kind_for_path(path) -> TaskKind | None:
    """The kind that claims a ``--data`` path by its form (an image folder), or None: its columns decide."""
    return next((kind for kind in TASK_KINDS.values() if kind.claims_path(path)), None)


def kind_for_columns(header: set[str], columns: dict[str, str | None]) -> TaskKind:
    """The kind of a user's file whose rows hold the keys ``header``: the first kind that claims it (by default:
    its marker role's column, ``columns[role]`` as the user named it or the role's own name, is there);
    otherwise ``DEFAULT_KIND``."""
    for kind in TASK_KINDS.values():
        if kind.claims(header, columns):
            return kind
    return DEFAULT_KIND
