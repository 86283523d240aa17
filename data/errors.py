"""Input errors that name the file, line/row and field (CLI exit code 2)."""
from __future__ import annotations


class DataError(ValueError):
    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f" field {field}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        # picklable with its fields, so that a conversion worker process can hand it to the parent
        return type(self), (self.path, self.message, self.line, self.field)
