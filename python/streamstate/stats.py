"""The per-key numeric summary shared by the aggregate store and the spilling aggregator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["STAT_COLUMNS", "Stats", "columns_to_pandas"]

#: The columns of ``results()`` / ``drain()``, in order.
STAT_COLUMNS = ("key", "count", "sum", "min", "max", "mean", "var", "std")


@dataclass(frozen=True, slots=True)
class Stats:
    """count / sum / min / max / mean and sample variance (ddof=1) of one key's values.

    ``var`` and ``std`` are NaN below two values, as in pandas and numpy with ``ddof=1``.
    """

    count: int
    sum: float
    min: float
    max: float
    mean: float
    var: float
    std: float

    @classmethod
    def from_tuple(cls, values: tuple[int, float, float, float, float, float, float]) -> Stats:
        """Build from the ``(count, sum, min, max, mean, var, std)`` tuple the core returns."""
        return cls(*values)

    def __repr__(self) -> str:
        var = "nan" if math.isnan(self.var) else f"{self.var:.6g}"
        return (
            f"Stats(count={self.count}, sum={self.sum:.6g}, min={self.min:.6g}, "
            f"max={self.max:.6g}, mean={self.mean:.6g}, var={var})"
        )


def columns_to_pandas(columns: dict[str, Any]) -> Any:
    """A pandas DataFrame indexed by key from a ``results()``-shaped dict of columns."""
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("to_pandas() needs pandas: pip install pandas") from exc
    keys = columns["key"]
    index = pd.Index(np.asarray(keys) if isinstance(keys, np.ndarray) else list(keys), name="key")
    return pd.DataFrame({name: columns[name] for name in STAT_COLUMNS[1:]}, index=index)
