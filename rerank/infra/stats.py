"""Summary statistics shared by the load generators, simulators and benchmarks.

Unit convention: `percentile` returns its value in the unit of its input. A caller that
reports milliseconds passes milliseconds (converts before, not after), so the rounding is
applied to the number that is printed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def percentile(values: Sequence[float] | np.ndarray, q: float, *, digits: int | None = None,
               method: str = "linear") -> float | None:
    """The `q`-th percentile (0..100) of `values`, in their unit; None when there are none.

    `digits`: round to that many decimals (None: unrounded). `method`: numpy's percentile method,
    "linear" (interpolate between the two nearest ranks, numpy's default) or e.g. "higher" (the
    upper of the two: `sorted(v)[len(v) // 2]` for the median)."""
    if len(values) == 0:
        return None
    value = float(np.percentile(values, q, method=method))
    return value if digits is None else round(value, digits)
