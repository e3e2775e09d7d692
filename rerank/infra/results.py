"""Writing a benchmark's JSON results file (benchmarks/*.py, `rerank bench`)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_results(path: str | os.PathLike, payload: dict, *, merge: bool = False) -> Path:
    """Write `payload` to `path` as JSON (indent 2, a final newline), creating the folder.

    merge=False replaces the file. merge=True keeps the file's top-level entries that `payload`
    does not have (`{**old, **payload}`): for a benchmark whose runs each produce some of the
    entries (a few scenarios, one named variant) next to the ones of earlier runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if merge and path.is_file():
        payload = {**json.loads(path.read_text()), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
