"""The common schema every data source produces.

A source returns :class:`Splits`: plain lists of example dicts (cheap to index, pickle and
partition). Keys by task:

- ``task="generate"``: ``prompt`` (str) and ``response`` (str).
- ``task="classify"``: ``text`` (str), optional ``text_pair`` (str) and ``label`` (int, an index
  into ``Splits.label_names``).

Any other column a source keeps (e.g. CounselChat ``topic``) stays in the dict, so partitioners can
skew or group by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Example = dict[str, Any]

TASKS = ("generate", "classify")


@dataclass
class Splits:
    """Train and eval examples of one dataset, in the common schema."""

    train: list[Example]
    eval: list[Example]
    task: str = "generate"
    label_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.task in TASKS, self.task
