"""The demo's prompts: objects as a box and/or clicked points, read from and written to text.

One object per line: a box ``x0,y0,x1,y1`` in pixels, optionally followed by points ``+x,y``
(include) and ``-x,y`` (exclude).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

#: Label of a point that includes / excludes its pixel (the model's positive / negative labels).
POSITIVE, NEGATIVE = 1, 0
#: A box occupies two of a query's point slots (its corners).
_BOX_SLOTS = 2

_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_POINT_PATTERN = re.compile(rf"([+-])\s*({_NUMBER})\s*[,\s]\s*({_NUMBER})")
_NUMBER_PATTERN = re.compile(rf"-?(?:{_NUMBER})")


@dataclass(frozen=True)
class DemoPrompt:
    """One object to segment: an optional (x0, y0, x1, y1) pixel box and optional points.

    ``points`` are (x, y) pixels, ``labels`` 1 (include) or 0 (exclude), one per point. The dataclass
    is frozen (hashable), which is how decoded objects are recognised when the text is edited.
    """

    box: Optional[tuple] = None
    points: tuple = ()
    labels: tuple = ()

    def __post_init__(self):
        if self.box is not None:
            object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "points", tuple((float(x), float(y)) for x, y in self.points))
        object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        if self.box is None and not self.points:
            raise ValueError("an object needs a box or at least one point")
        if self.box is not None and len(self.box) != 4:
            raise ValueError(f"a box has 4 numbers x0,y0,x1,y1; got {len(self.box)}")
        if len(self.labels) != len(self.points):
            raise ValueError("every point needs a label (1 include, 0 exclude)")
        if any(label not in (POSITIVE, NEGATIVE) for label in self.labels):
            raise ValueError(f"point labels are 1 (include) or 0 (exclude); got {self.labels}")

    @property
    def num_slots(self) -> int:
        """Point slots of the model's query that this object takes (a box takes two)."""
        return (_BOX_SLOTS if self.box is not None else 0) + len(self.points)

    def with_point(self, x: float, y: float, label: int) -> "DemoPrompt":
        return DemoPrompt(self.box, self.points + ((x, y),), self.labels + (label,))

    def to_text(self) -> str:
        parts = []
        if self.box is not None:
            parts.append(",".join(f"{value:g}" for value in self.box))
        for (x, y), label in zip(self.points, self.labels):
            parts.append(f"{'+' if label == POSITIVE else '-'}{x:g},{y:g}")
        return " ".join(parts)


def parse_prompts(text: str) -> list:
    """Text, one object per line, -> [DemoPrompt]. Blank lines and ``#`` comments are ignored.

    A line holds an optional box (four non-negative numbers x0,y0,x1,y1, separated by commas and/or
    spaces, brackets allowed) and any number of points ``+x,y`` (include) or ``-x,y`` (exclude).
    Errors name the line.
    """
    prompts = []
    for number, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        points, labels = [], []
        for sign, x, y in _POINT_PATTERN.findall(line):
            points.append((float(x), float(y)))
            labels.append(POSITIVE if sign == "+" else NEGATIVE)
        rest = _POINT_PATTERN.sub(" ", line)
        if re.search(r"[^\d\s.,;()\[\]-]", rest):
            raise ValueError(f"line {number} ({raw.strip()!r}): write a box as x0,y0,x1,y1 and points as +x,y or -x,y")
        numbers = [float(value) for value in _NUMBER_PATTERN.findall(rest)]
        if len(numbers) not in (0, 4):
            raise ValueError(
                f"line {number} ({raw.strip()!r}): a box has 4 numbers x0,y0,x1,y1, found {len(numbers)} "
                "besides the points (+x,y / -x,y)"
            )
        try:
            prompts.append(DemoPrompt(tuple(numbers) if numbers else None, tuple(points), tuple(labels)))
        except ValueError as error:
            raise ValueError(f"line {number} ({raw.strip()!r}): {error}") from None
    return prompts


def format_prompts(prompts: Sequence[DemoPrompt]) -> str:
    """The inverse of :func:`parse_prompts`."""
    return "\n".join(prompt.to_text() for prompt in prompts)


def parse_candidate(choice) -> Optional[int]:
    """``None`` / ``"best"`` -> None (each object's highest predicted IoU); ``"1"``.. / 0.. -> an index.

    Strings are the 1-based numbers a person reads on the page; integers are 0-based indices.
    """
    if choice is None or (isinstance(choice, str) and choice.strip().lower() in ("", "best")):
        return None
    if isinstance(choice, str):
        return int(choice) - 1
    return int(choice)
