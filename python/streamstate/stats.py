"""The per-key numeric summary shared by the aggregate store and the spilling aggregator,
and the one place its columns become pandas, Arrow and Polars tables."""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

import numpy as np
import numpy.typing as npt

from .errors import CorruptDataError

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

__all__ = [
    "STAT_COLUMNS",
    "ResultKeyType",
    "StatResults",
    "Stats",
    "columns_to_arrow",
    "columns_to_pandas",
    "columns_to_polars",
    "multi_columns_to_arrow",
    "multi_columns_to_pandas",
    "present_rows",
    "require_modules",
]

#: The columns of ``results()`` / ``drain()``, in order.
STAT_COLUMNS = ("key", "count", "sum", "min", "max", "mean", "var", "std")

#: Key types of result producers: ``"str"`` keys are held as their UTF-8 bytes (like
#: ``"bytes"``) and come back as ``str`` (Arrow ``string``) instead of ``bytes``.
ResultKeyType = Literal["int64", "bytes", "str"]


class StatResults(TypedDict):
    """Per-key statistics as columns, one row per key (in no particular order).

    ``key`` is an int64 array (``key_type="int64"``), a list of ``bytes`` (``"bytes"``) or
    of ``str`` (``"str"``); ``count`` is int64, the rest float64 (``var`` and ``std`` are
    sample statistics, NaN below two values).
    """

    key: npt.NDArray[np.int64] | list[bytes] | list[str]
    count: npt.NDArray[np.int64]
    sum: npt.NDArray[np.float64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]
    var: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]


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


def core_key_type(key_type: ResultKeyType) -> Literal["int64", "bytes"]:
    """The core's key flavour for ``key_type``: str keys are folded as their UTF-8 bytes."""
    return "bytes" if key_type == "str" else key_type


def list_key_format(key_type: ResultKeyType) -> Literal["bytes", "str"]:
    """The core's ``key_format`` for results whose byte-string keys come back in a list."""
    return "str" if key_type == "str" else "bytes"


def require_modules(call: str, *modules: str) -> None:
    """Raise an ImportError naming ``pip install`` unless every optional module imports
    (checked before a terminal call such as a drain, so a missing one loses nothing)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"{call} needs {module}: pip install {module}") from exc


def columns_to_pandas(columns: Mapping[str, Any]) -> pd.DataFrame:
    """A pandas DataFrame indexed by key from a ``results()``-shaped dict of columns."""
    require_modules("to_pandas()", "pandas")
    import pandas as pd
    keys = columns["key"]
    index = pd.Index(np.asarray(keys) if isinstance(keys, np.ndarray) else list(keys), name="key")
    return pd.DataFrame({name: columns[name] for name in STAT_COLUMNS[1:]}, index=index)


def columns_to_arrow(columns: Mapping[str, Any], key_type: ResultKeyType) -> pa.Table:
    """A ``pyarrow.Table`` (columns :data:`STAT_COLUMNS`) over the buffers of core columns
    fetched with ``key_format="arrow"``, without copying them.

    Numeric columns are the core's numpy arrays; byte-string keys arrive as Arrow's
    ``(offsets, data)`` buffers and become ``binary`` (``large_binary`` past 2 GiB), or
    ``string`` / ``large_string`` for ``key_type="str"``, whose keys must be UTF-8
    (:class:`~streamstate.CorruptDataError` otherwise).
    """
    require_modules("to_arrow()", "pyarrow")
    import pyarrow as pa
    key_array = _arrow_keys(pa, columns["key"], key_type)
    arrays = [key_array, *(_arrow_numeric(pa, columns[name]) for name in STAT_COLUMNS[1:])]
    return pa.Table.from_arrays(arrays, names=list(STAT_COLUMNS))


def _arrow_keys(pa: Any, keys: Any, key_type: ResultKeyType) -> Any:
    # Byte-string keys arrive as Arrow (offsets, data) buffers, int64 keys as an array.
    if isinstance(keys, tuple):
        offsets, data = keys
        large = offsets.dtype == np.int64
        if key_type == "str":
            arrow_type = pa.large_string() if large else pa.string()
        else:
            arrow_type = pa.large_binary() if large else pa.binary()
        key_array = pa.Array.from_buffers(
            arrow_type, len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
        )
        if key_type == "str":
            try:
                key_array.validate(full=True)
            except pa.ArrowInvalid as exc:
                raise CorruptDataError(
                    "a key of a key_type='str' result is not UTF-8 text (fold byte-string "
                    f"keys into key_type='bytes'): {exc}"
                ) from exc
        return key_array
    return _arrow_numeric(pa, keys)


def present_rows(keys: Any, stats: Mapping[str, npt.NDArray[Any]]) -> dict[str, Any]:
    """One value column of a multi-column result as a ``results()`` dict, keeping only the
    keys with a value of that column counted (what a one-column store of it would hold).
    ``keys`` is an int64 array or a list; ``stats`` the column's stat arrays."""
    present = stats["count"] > 0
    if bool(present.all()):
        return {"key": keys, **stats}
    if isinstance(keys, np.ndarray):
        kept_keys: Any = keys[present]
    else:
        kept_keys = [k for k, keep in zip(keys, present.tolist(), strict=True) if keep]
    return {"key": kept_keys, **{name: column[present] for name, column in stats.items()}}


def multi_columns_to_pandas(
    keys: Any, per_column: Mapping[str, Mapping[str, npt.NDArray[Any]]]
) -> pd.DataFrame:
    """Every value column's statistics in one DataFrame indexed by key, under a
    ``(value, stat)`` column MultiIndex."""
    require_modules("to_pandas()", "pandas")
    import pandas as pd
    index = pd.Index(np.asarray(keys) if isinstance(keys, np.ndarray) else list(keys), name="key")
    data = {
        (value, stat): stats[stat] for value, stats in per_column.items() for stat in STAT_COLUMNS[1:]
    }
    frame = pd.DataFrame(data, index=index)
    frame.columns = pd.MultiIndex.from_tuples(list(data), names=["value", "stat"])
    return frame


def multi_columns_to_arrow(
    keys: Any, per_column: Mapping[str, Mapping[str, npt.NDArray[Any]]], key_type: ResultKeyType
) -> pa.Table:
    """A ``pyarrow.Table`` of ``key`` then ``{value}_{stat}`` for every value column (the
    flat form of :func:`multi_columns_to_pandas`), over the core's buffers."""
    require_modules("to_arrow()", "pyarrow")
    import pyarrow as pa
    names = ["key"]
    arrays = [_arrow_keys(pa, keys, key_type)]
    for value, stats in per_column.items():
        for stat in STAT_COLUMNS[1:]:
            names.append(f"{value}_{stat}")
            arrays.append(_arrow_numeric(pa, stats[stat]))
    return pa.Table.from_arrays(arrays, names=names)


def _arrow_numeric(pa: Any, column: npt.NDArray[Any]) -> Any:
    # from_buffers wraps the array's memory (kept alive by the buffer) instead of copying it.
    arrow_type = pa.from_numpy_dtype(column.dtype)
    return pa.Array.from_buffers(arrow_type, len(column), [None, pa.py_buffer(column)])


def columns_to_polars(
    columns: Mapping[str, Any] | pa.Table, key_type: ResultKeyType
) -> pl.DataFrame:
    """:func:`columns_to_arrow` (or an Arrow table already built) as a Polars DataFrame
    (numeric columns are not copied)."""
    require_modules("to_polars()", "polars")
    import polars as pl

    table = columns if not isinstance(columns, Mapping) else columns_to_arrow(columns, key_type)
    return cast("pl.DataFrame", pl.from_arrow(table, rechunk=False))
