"""Task specs: what each head of a multi-task network predicts, from which label column."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

from fedmtl.schema import Schema

TaskKind = Literal["binary", "multiclass", "regression"]
TASK_KINDS: tuple[str, ...] = ("binary", "multiclass", "regression")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task.

    ``name`` names the head (an identifier: letters, digits, underscore);
    ``label`` is the label column; ``classes`` the class labels of a multiclass task
    (``None`` otherwise); ``weight`` the task's weight in the summed loss.

    Regression only: the head predicts ``(y - shift) / scale`` (the loss is computed on
    that scale, so targets far from 0 do not blow up training) and
    :meth:`MultiTaskNet.predict` returns ``output * scale + shift`` in label units.
    """

    name: str
    kind: TaskKind
    label: str
    classes: tuple[str, ...] | None = None
    weight: float = 1.0
    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"task name {self.name!r} must be an identifier (letters, digits, underscore; "
                "not starting with a digit); it names a module in the network"
            )
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {list(TASK_KINDS)}")
        if self.kind == "multiclass":
            if not self.classes or len(self.classes) < 2:
                raise ValueError(f"multiclass task {self.name!r} needs at least 2 classes, got {self.classes!r}")
            classes = tuple(str(c) for c in self.classes)
            if len(set(classes)) != len(classes):
                raise ValueError(f"multiclass task {self.name!r} has duplicate classes {classes}")
            object.__setattr__(self, "classes", classes)
        elif self.classes is not None:
            raise ValueError(f"task {self.name!r}: classes only apply to multiclass tasks")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
            raise ValueError(f"task {self.name!r}: weight must be a finite number >= 0, got {w!r}")
        object.__setattr__(self, "weight", float(w))
        if self.kind != "regression" and (self.shift != 0.0 or self.scale != 1.0):
            raise ValueError(f"task {self.name!r}: shift/scale only apply to regression tasks")
        if not (isinstance(self.scale, (int, float)) and self.scale > 0 and self.scale != float("inf")):
            raise ValueError(f"task {self.name!r}: scale must be a finite number > 0, got {self.scale!r}")
        object.__setattr__(self, "shift", float(self.shift))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def out_dim(self) -> int:
        """Width of the task's head: 1 for binary and regression, C for multiclass."""
        return len(self.classes) if self.kind == "multiclass" else 1

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "label": self.label, "weight": self.weight}
        if self.classes is not None:
            d["classes"] = list(self.classes)
        if self.kind == "regression":
            d["shift"], d["scale"] = self.shift, self.scale
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskSpec":
        classes = d.get("classes")
        return cls(
            name=d["name"],
            kind=d["kind"],
            label=d.get("label", d["name"]),
            classes=tuple(classes) if classes is not None else None,
            weight=float(d.get("weight", 1.0)),
            shift=float(d.get("shift", 0.0)),
            scale=float(d.get("scale", 1.0)),
        )


def check_tasks(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    """Validate a task list: non-empty, TaskSpec instances, unique names."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("at least one task is needed")
    for t in tasks:
        if not isinstance(t, TaskSpec):
            raise TypeError(f"expected TaskSpec, got {type(t).__name__}: {t!r}")
    names = [t.name for t in tasks]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"task names must be unique; repeated: {dups}")
    return tasks


def tasks_from_schema(
    schema: Schema,
    *,
    labels: Iterable[str] | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[TaskSpec]:
    """One task per label column of ``schema`` (or per name in ``labels``), named after
    the column: binary -> binary, categorical -> multiclass, numeric -> regression.
    A regression label with a declared min/max is scaled to [-1, 1] for training
    (``shift`` = midpoint, ``scale`` = half-range)."""
    label_cols = {c.name: c for c in schema.labels}
    chosen = list(labels) if labels is not None else list(label_cols)
    unknown = [n for n in chosen if n not in label_cols]
    if unknown:
        raise ValueError(f"{unknown} are not label columns of schema {schema.name!r}; its labels are {list(label_cols)}")
    weights = dict(weights or {})
    extra = set(weights) - set(chosen)
    if extra:
        raise ValueError(f"weights given for {sorted(extra)}, which are not among the tasks {chosen}")
    kinds = {"binary": "binary", "categorical": "multiclass", "numeric": "regression"}
    out = []
    for n in chosen:
        c = label_cols[n]
        shift, scale = 0.0, 1.0
        if c.type == "numeric" and c.min is not None and c.max is not None and c.max > c.min:
            shift, scale = (c.min + c.max) / 2, (c.max - c.min) / 2
        out.append(
            TaskSpec(
                name=n,
                kind=kinds[c.type],  # type: ignore[arg-type]
                label=n,
                classes=c.categories if c.type == "categorical" else None,
                weight=weights.get(n, 1.0),
                shift=shift,
                scale=scale,
            )
        )
    return out
