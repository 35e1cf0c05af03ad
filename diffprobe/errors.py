"""User-facing errors.

Anything a user can fix (a missing dataset, a malformed dataset.json, a corrupt
image...) raises :class:`DiffprobeError`. The CLI turns it into one clear message
with a non-zero exit code and no traceback; programming errors still raise
normally so that they are visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Problem:
    """One thing wrong with one file, and how to fix it."""

    file: str
    what: str
    fix: str

    def format(self) -> str:
        return f"{self.file}: {self.what}\n    fix: {self.fix}"


class DiffprobeError(Exception):
    """An error caused by the user's input or environment, not by a bug."""

    def __init__(self, what: str, file: str | Path | None = None, fix: str | None = None):
        self.what = what
        self.file = str(file) if file is not None else None
        self.fix = fix
        super().__init__(self.format())

    def format(self) -> str:
        head = f"{self.file}: {self.what}" if self.file else self.what
        return f"{head}\n    fix: {self.fix}" if self.fix else head


class IntegrityError(DiffprobeError):
    """Several problems found in one pass over a dataset; all are reported together."""

    def __init__(self, problems: list[Problem], dataset: str = "dataset"):
        self.problems = problems
        lines = [f"{len(problems)} problem(s) found in {dataset}:"]
        lines += [p.format() for p in problems]
        super().__init__("\n".join(lines))
