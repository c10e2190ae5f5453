"""Data errors that name where the problem is: file, line and field."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Bad input data; the message names the file, line (1-based) and field where known."""

    def __init__(self, message: str, problem: Problem | None = None):
        super().__init__(message)
        self.problem = problem

    @classmethod
    def at(cls, path: str, line: int | None, field: str | None, message: str) -> DataError:
        problem = Problem(path, line, field, message)
        return cls(str(problem), problem)


@dataclass(frozen=True)
class Problem:
    """One problem with one line of a data file."""

    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": field '{self.field}'"
        return f"{where}: {self.message}"
