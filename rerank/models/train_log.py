"""The JSON-lines training log every model kind writes while it fits."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class TrainLog:
    """A JSON-lines training log, one record per `log(...)` call; also the place progress goes.

    Each record gets "time": seconds since the log was created. With `echo`, records are
    also printed to stderr (one JSON line each). The file is truncated when the log is created.
    """

    def __init__(self, path: Path | None = None, echo: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.echo = echo
        self.records: list[dict] = []
        self.start = time.monotonic()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, **record: Any) -> None:
        """Append one record (JSON-able values; numpy scalars are converted)."""
        record = {"time": round(time.monotonic() - self.start, 3), **record}
        line = json.dumps(record, default=_json_default)
        self.records.append(json.loads(line))
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self.echo:
            print(line, file=sys.stderr)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
