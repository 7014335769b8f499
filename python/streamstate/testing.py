"""Hypothesis strategies, assertions and a stateful test machine for state code.

For users who property-test their own operators and snapshot formats on top of streamstate
(and for streamstate's own tests). Needs hypothesis: ``pip install streamstate[test]``.

- Strategies: :func:`keys`, :func:`numeric_batches`, :func:`partials`,
  :func:`record_snapshots`, :func:`lcb1_batches` and :func:`store_operations` (sequences of
  :class:`Fold` / :class:`Publish` / :class:`Snapshot` / :class:`SnapshotDelta` /
  :class:`Restore` for a store, which :func:`run_operations` applies and checks).
- Assertions: :func:`assert_snapshot_roundtrip`, :func:`assert_merge_laws`,
  :func:`assert_corruption_detected`.
- :class:`OperatorMachine`: a ``hypothesis.stateful`` machine to subclass, which checks an
  operator against a plain-Python model through checkpoints, crashes and restores.

A user test in a few lines::

    from hypothesis import given
    import streamstate as ss
    from streamstate.testing import assert_snapshot_roundtrip, numeric_batches

    @given(numeric_batches("int64", extreme=True))
    def test_my_store_survives_restore(batch):
        store = ss.NumericAggregateStore(1)
        store.partition(0).fold(batch.keys, batch.values)
        assert_snapshot_roundtrip(store)
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeAlias, TypeVar, cast

import numpy as np

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "streamstate.testing needs hypothesis: pip install streamstate[test]"
    ) from exc

from . import _core
from .aggregate import AggregateStore, KeyType, NanPolicy, NumericAggregateStore
from .batcher import encode_batch
from .codec import encode_records
from .errors import CorruptDataError
from .state import InMemoryStateBackend

__all__ = [
    "Captures",
    "Fold",
    "NumericBatch",
    "OperatorMachine",
    "Publish",
    "Restore",
    "Snapshot",
    "SnapshotDelta",
    "StoreOperation",
    "assert_corruption_detected",
    "assert_merge_laws",
    "assert_snapshot_roundtrip",
    "keys",
    "lcb1_batches",
    "numeric_batches",
    "numeric_partials_close",
    "partials",
    "record_snapshots",
    "run_operations",
    "store_operations",
]

P = TypeVar("P")
OperatorT = TypeVar("OperatorT")
ModelT = TypeVar("ModelT")

#: A batch's key column: an int64 array for ``"int64"`` keys, a list of bytes or str for
#: ``"bytes"`` or ``"str"`` keys.
KeyColumn: TypeAlias = "np.ndarray[Any, np.dtype[np.int64]] | list[bytes] | list[str]"
FloatColumn: TypeAlias = "np.ndarray[Any, np.dtype[np.float64]]"

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
# Values that break naive aggregation code: non-finite, the ends of the double range,
# subnormals, signed zero, and large offsets where a one-pass variance loses every digit.
_EXTREME_VALUES = (
    math.nan, math.inf, -math.inf, 1.7976931348623157e308, -1.7976931348623157e308,
    5e-324, -5e-324, 0.0, -0.0, 1e15 + 0.5, 1e9 + 1e-6,
)


# -- strategies ----------------------------------------------------------------------------


def _check_key_type(key_type: str) -> KeyType:
    if key_type not in ("int64", "bytes", "str"):
        raise ValueError(f"key_type must be 'int64', 'bytes' or 'str', got {key_type!r}")
    return cast(KeyType, key_type)


def keys(key_type: KeyType = "int64", *, max_size: int = 16) -> st.SearchStrategy[Any]:
    """Keys a :class:`~streamstate.NumericAggregateStore` of ``key_type`` accepts.

    ``"int64"``: any signed 64-bit integer (hypothesis favours 0 and the extremes);
    ``"bytes"``: binary strings up to ``max_size`` bytes, the empty one included;
    ``"str"``: text of up to ``max_size`` characters that UTF-8 can encode (no lone
    surrogates), the empty one included.
    """
    checked = _check_key_type(key_type)
    if checked == "int64":
        return st.integers(_INT64_MIN, _INT64_MAX)
    if checked == "str":
        return st.text(st.characters(codec="utf-8"), max_size=max_size)
    return st.binary(max_size=max_size)


@dataclass(frozen=True, eq=False)
class NumericBatch:
    """One batch for ``PartitionAggregator.fold``: a key column and float64 value columns.

    ``keys`` is an int64 array (``"int64"`` keys) or a list of bytes or str; ``columns``
    holds one float64 array per value column, each as long as ``keys``.
    """

    keys: KeyColumn
    columns: tuple[FloatColumn, ...]

    @property
    def values(self) -> FloatColumn:
        """The value column of a one-column batch (``fold(batch.keys, batch.values)``)."""
        if len(self.columns) != 1:
            raise ValueError(f"values is for one-column batches; this one has {len(self.columns)}")
        return self.columns[0]

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        kind = "int64" if isinstance(self.keys, np.ndarray) else (
            "str" if self.keys and isinstance(self.keys[0], str) else "bytes"
        )
        return (
            f"NumericBatch(rows={len(self)}, key_type={kind!r}, keys={_plain(self.keys)!r}, "
            f"columns={[c.tolist() for c in self.columns]!r})"
        )


def _float_values(extreme: bool) -> st.SearchStrategy[float]:
    if extreme:
        return st.one_of(st.sampled_from(_EXTREME_VALUES), st.floats(width=64))
    return st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def numeric_batches(
    key_type: KeyType = "int64",
    columns: int = 1,
    max_rows: int = 64,
    extreme: bool = False,
    *,
    min_rows: int = 0,
    distinct_keys: int = 8,
) -> st.SearchStrategy[NumericBatch]:
    """Batches of up to ``max_rows`` rows over at most ``distinct_keys`` keys (so keys repeat).

    Values are finite floats in ``[-1e6, 1e6]``; with ``extreme=True`` they also include
    NaN, +/-inf, the largest and smallest doubles, signed zero and large offsets (mind
    ``nan_policy="raise"``, which refuses batches holding NaN).
    """
    _check_key_type(key_type)
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if not 0 <= min_rows <= max_rows:
        raise ValueError(f"need 0 <= min_rows <= max_rows, got {min_rows} and {max_rows}")
    if distinct_keys < 1:
        raise ValueError(f"distinct_keys must be at least 1, got {distinct_keys}")
    elements = _float_values(extreme)

    @st.composite
    def draw_batch(draw: st.DrawFn) -> NumericBatch:
        pool = draw(st.lists(keys(key_type), min_size=1, max_size=distinct_keys, unique=True))
        rows = draw(st.integers(min_rows, max_rows))
        chosen = draw(st.lists(st.sampled_from(pool), min_size=rows, max_size=rows))
        key_column: KeyColumn = (
            np.array(chosen, dtype=np.int64) if key_type == "int64" else list(chosen)
        )
        value_columns = tuple(
            draw(hnp.arrays(np.float64, rows, elements=elements)) for _ in range(columns)
        )
        return NumericBatch(key_column, value_columns)

    return draw_batch()


def partials(*, max_values: int = 16, extreme: bool = False) -> st.SearchStrategy[bytes]:
    """Numeric partial aggregates (count, sum, min, max, mean, variance state) as bytes.

    The partials :class:`~streamstate.NumericAggregateStore` merges across partitions,
    each the fold of up to ``max_values`` values (none: the identity). Merge them with
    ``streamstate._core._moments_merge``; compare with :func:`numeric_partials_close`.
    """
    values = hnp.arrays(np.float64, st.integers(0, max_values), elements=_float_values(extreme))
    return st.builds(_core._moments_of, values)


def numeric_partials_close(a: bytes, b: bytes, *, rel_tol: float = 1e-9) -> bool:
    """Whether two numeric partials describe the same statistics (NaN equals NaN).

    count, min and max must match exactly; sum, mean and variance within ``rel_tol`` (merge
    order changes their rounding).
    """
    sa, sb = _core._moments_stats(a), _core._moments_stats(b)
    if sa[0] != sb[0]:
        return False
    for index, (x, y) in enumerate(zip(sa[1:], sb[1:], strict=True), start=1):
        if math.isnan(x) or math.isnan(y):
            if not (math.isnan(x) and math.isnan(y)):
                return False
        elif index in (2, 3):  # min, max
            if x != y:
                return False
        elif not math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-12 * (1 + abs(x) + abs(y))):
            return False
    return True


def record_snapshots(
    kind: int | None = None, *, max_records: int = 12, max_size: int = 64
) -> st.SearchStrategy[bytes]:
    """Valid record-codec containers (:func:`streamstate.codec.encode_records`).

    Tagged ``kind`` (any kind when ``None``), with up to ``max_records`` records whose keys
    and values are at most ``max_size`` bytes.
    """
    kinds = st.integers(0, 0xFFFF) if kind is None else st.just(kind)
    records = st.lists(
        st.tuples(st.binary(max_size=max_size), st.binary(max_size=max_size)),
        max_size=max_records,
    )
    return st.builds(encode_records, kinds, records)


def lcb1_batches(*, max_entries: int = 8, max_size: int = 256) -> st.SearchStrategy[bytes]:
    """Valid ``LCB1`` checkpoint batches (:func:`streamstate.encode_batch`).

    Up to ``max_entries`` entries with text keys and payloads of at most ``max_size`` bytes
    (repetitive ones too, so the LZ4 body really compresses).
    """
    payloads = st.one_of(
        st.binary(max_size=max_size),
        st.builds(lambda b, n: (b * n)[:max_size], st.binary(min_size=1, max_size=8),
                  st.integers(1, max_size)),
    )
    entries = st.lists(st.tuples(st.text(max_size=24), payloads), max_size=max_entries)
    return st.builds(encode_batch, entries)


# -- store operations ----------------------------------------------------------------------


@dataclass
class Captures:
    """What a run of store operations captured so far, in order of capture: the full
    snapshots (:class:`Snapshot`) and the deltas (:class:`SnapshotDelta`), numbered apart."""

    snapshots: list[bytes] = field(default_factory=list)
    deltas: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Fold:
    """Fold ``batch`` into partition ``partition``'s local state."""

    partition: int
    batch: NumericBatch

    def apply(self, store: NumericAggregateStore, captures: Captures) -> None:
        """Run the operation on ``store``."""
        store.partition(self.partition).fold(self.batch.keys, self.batch.values)


@dataclass(frozen=True)
class Publish:
    """Publish partition ``partition``'s changed partials to the shared store."""

    partition: int

    def apply(self, store: NumericAggregateStore, captures: Captures) -> None:
        """Run the operation on ``store``."""
        store.partition(self.partition).publish()


@dataclass(frozen=True)
class Snapshot:
    """Snapshot the store in full; the bytes are appended to ``captures.snapshots``."""

    def apply(self, store: NumericAggregateStore, captures: Captures) -> None:
        """Run the operation on ``store``."""
        captures.snapshots.append(store.snapshot())


@dataclass(frozen=True)
class SnapshotDelta:
    """Capture what changed since the store's previous capture (``snapshot_delta()``); the
    bytes are appended to ``captures.deltas``."""

    def apply(self, store: NumericAggregateStore, captures: Captures) -> None:
        """Run the operation on ``store``."""
        captures.deltas.append(store.snapshot_delta())


@dataclass(frozen=True)
class Restore:
    """Restore the run's full snapshot number ``snapshot`` (0 is the first taken), then apply
    its later deltas numbered ``deltas``, in order: the chain a checkpoint recovers."""

    snapshot: int
    deltas: tuple[int, ...] = ()

    def apply(self, store: NumericAggregateStore, captures: Captures) -> None:
        """Run the operation on ``store``."""
        store.restore(captures.snapshots[self.snapshot])
        for number in self.deltas:
            store.apply_delta(captures.deltas[number])


StoreOperation: TypeAlias = Fold | Publish | Snapshot | SnapshotDelta | Restore


def store_operations(
    store: NumericAggregateStore, *, max_operations: int = 20, max_rows: int = 16,
    extreme: bool = False,
) -> st.SearchStrategy[list[StoreOperation]]:
    """Sequences of fold / publish / snapshot / delta / restore operations valid for ``store``.

    Folds use ``store``'s key type and partitions. A :class:`Restore` names a full snapshot
    taken earlier in the same sequence and, optionally, deltas that were taken on top of it
    in that order (each delta's parent is the state the ones before leave), so every
    restore succeeds. Apply them with :func:`run_operations`.
    """
    if not isinstance(store, NumericAggregateStore):
        raise TypeError(f"store must be a NumericAggregateStore, got {type(store).__name__}")
    key_type = store.key_type
    partition_ids = st.integers(0, store.num_partitions - 1)
    batches = numeric_batches(key_type, max_rows=max_rows, extreme=extreme)

    @st.composite
    def draw_operations(draw: st.DrawFn) -> list[StoreOperation]:
        operations: list[StoreOperation] = []
        # Every state a Restore can bring back: a full snapshot and a chain of its deltas.
        restorable: list[Restore] = []
        # Where the store's last capture or restore left it (None: not a chain of this
        # sequence, so a delta taken now has no parent a Restore could name).
        position: Restore | None = None
        snapshots = deltas = 0
        for _ in range(draw(st.integers(0, max_operations))):
            choices = ["fold", "publish", "snapshot", "delta"] + (["restore"] if restorable else [])
            choice = draw(st.sampled_from(choices))
            if choice == "fold":
                operations.append(Fold(draw(partition_ids), draw(batches)))
            elif choice == "publish":
                operations.append(Publish(draw(partition_ids)))
            elif choice == "snapshot":
                operations.append(Snapshot())
                position = Restore(snapshots)
                restorable.append(position)
                snapshots += 1
            elif choice == "delta":
                operations.append(SnapshotDelta())
                if position is not None:
                    position = Restore(position.snapshot, (*position.deltas, deltas))
                    restorable.append(position)
                deltas += 1
            else:
                position = draw(st.sampled_from(restorable))
                operations.append(position)
        return operations

    return draw_operations()


def run_operations(
    store: NumericAggregateStore,
    operations: Sequence[StoreOperation],
    *,
    check_deltas: bool = True,
) -> list[bytes]:
    """Apply ``operations`` to ``store`` in order; returns the full snapshots they took.

    With ``check_deltas`` (the default), after every :class:`SnapshotDelta` whose chain
    starts at a full snapshot of this run, that snapshot and the deltas on top of it are
    restored into a fresh store, whose snapshot must equal the live store's byte for byte
    (else ``AssertionError``). Taking the live store's snapshot starts a new chain, so the
    live store is then put back on the delta's chain by restoring that same chain into it
    (its state is the one just checked equal), and later deltas keep chaining on.
    """
    captures = Captures()
    position: Restore | None = None
    for operation in operations:
        operation.apply(store, captures)
        if isinstance(operation, Snapshot):
            position = Restore(len(captures.snapshots) - 1)
        elif isinstance(operation, Restore):
            position = operation
        elif isinstance(operation, SnapshotDelta) and position is not None:
            position = Restore(position.snapshot, (*position.deltas, len(captures.deltas) - 1))
            if check_deltas:
                _check_chain(store, position, captures)
    return captures.snapshots


def _check_chain(store: NumericAggregateStore, chain: Restore, captures: Captures) -> None:
    recovered = type(store)(
        store.num_partitions, store.key_type, cast(NanPolicy, store.nan_policy)
    )
    chain.apply(recovered, captures)
    expected, got = store.snapshot(), recovered.snapshot()
    assert got == expected, (
        f"snapshot {chain.snapshot} with deltas {list(chain.deltas)} restores to a state "
        f"other than the live store's ({len(got)} vs {len(expected)} snapshot bytes, first "
        f"difference at byte {_first_difference(got, expected)})"
    )
    chain.apply(store, captures)


# -- assertions ----------------------------------------------------------------------------


class _Snapshotting(Protocol):
    def snapshot(self) -> bytes: ...
    def restore(self, data: bytes, /) -> object: ...


def _results_state(columns: dict[str, Any]) -> dict[object, tuple[object, ...]]:
    # Per key, independent of row order (hash order may differ after a restore), with NaN
    # equal to itself: NaN statistics are legitimate state.
    names = sorted(name for name in columns if name != "key")
    rows = zip(*(_plain(columns[name]) for name in names), strict=True)
    return {
        key: tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row)
        for key, row in zip(_plain(columns["key"]), rows, strict=True)
    }


def _plain(column: Any) -> list[Any]:
    return column.tolist() if isinstance(column, np.ndarray) else list(column)


@dataclass(frozen=True)
class _Adapter:
    snapshot: Callable[[Any], bytes]
    restore: Callable[[Any, bytes], object]
    fresh: Callable[[Any], Any]
    state: Callable[[Any], object]


# A backend checkpoint depends on the clock (expired entries are dropped): one instant for
# the whole round trip, and a fixed checkpoint id so the two checkpoints can be compared.
_BACKEND_CHECKPOINT_ID = 1


def _adapter_for(obj: object) -> _Adapter | None:
    if isinstance(obj, NumericAggregateStore):
        return _Adapter(
            snapshot=lambda o: o.snapshot(),
            restore=lambda o, data: o.restore(data),
            fresh=lambda o: type(o)(o.num_partitions, o.key_type, o.nan_policy),
            state=lambda o: _results_state(o.results()),
        )
    if isinstance(obj, AggregateStore):
        return _Adapter(
            snapshot=lambda o: o.snapshot(),
            restore=lambda o, data: o.restore(data),
            fresh=lambda o: type(o)(o.num_partitions),
            state=lambda o: [(g, o.collect_partials(g)) for g in o.groups()],
        )
    if isinstance(obj, InMemoryStateBackend):
        now = time.time()
        return _Adapter(
            snapshot=lambda o: o.checkpoint(_BACKEND_CHECKPOINT_ID, now=now),
            restore=lambda o, data: o.restore(data),
            fresh=lambda o: type(o)(),
            state=lambda o: o.range_scan(b"", now=now),
        )
    return None


def assert_snapshot_roundtrip(
    obj: Any,
    *,
    fresh: Callable[[], Any] | None = None,
    state: Callable[[Any], object] | None = None,
) -> Any:
    """Snapshot ``obj``, restore into a fresh object, check equal state and identical bytes.

    Knows streamstate's stores and backend. For your own class (``snapshot() -> bytes`` and
    ``restore(bytes)``) pass ``fresh`` (makes an empty instance) and ``state`` (what must
    survive, compared with ``==``; defaults to the objects themselves when the class defines
    ``__eq__``). Returns the restored object; raises ``AssertionError`` saying what differs.
    """
    adapter = _adapter_for(obj)
    if adapter is None:
        if fresh is None:
            raise TypeError(
                f"assert_snapshot_roundtrip needs fresh= for a {type(obj).__name__} "
                "(a callable returning an empty instance)"
            )
        if state is None and not any("__eq__" in vars(k) for k in type(obj).__mro__[:-1]):
            raise TypeError(
                f"{type(obj).__name__} defines no __eq__: pass state= (what must survive)"
            )
        make_fresh = fresh
        adapter = _Adapter(
            snapshot=lambda o: cast(_Snapshotting, o).snapshot(),
            restore=lambda o, data: cast(_Snapshotting, o).restore(data),
            fresh=lambda o: make_fresh(),
            state=lambda o: o,
        )
    state_of = state or adapter.state
    data = adapter.snapshot(obj)
    if not isinstance(data, bytes):
        raise TypeError(f"snapshot() must return bytes, got {type(data).__name__}")
    restored = adapter.fresh(obj)
    adapter.restore(restored, data)
    before, after = state_of(obj), state_of(restored)
    assert after == before, (
        f"restored state differs:\n  original: {before!r}\n  restored: {after!r}"
    )
    again = adapter.snapshot(restored)
    assert again == data, (
        f"re-snapshot of the restored object differs ({len(again)} bytes vs {len(data)}; "
        f"first difference at byte {_first_difference(again, data)})"
    )
    return restored


def _first_difference(a: bytes, b: bytes) -> int:
    differing = (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return next(differing, min(len(a), len(b)))


def assert_merge_laws(
    merge: Callable[[P, P], P],
    partials: Sequence[P],
    *,
    identity: P | None = None,
    equal: Callable[[P, P], bool] | None = None,
) -> None:
    """Check that ``merge`` is commutative and associative over ``partials``, with an identity.

    Every ordered pair must commute and every ordered triple associate; ``identity`` (for
    the numeric partials: ``partials()``'s empty fold) must leave each partial unchanged on
    either side. ``equal`` compares results (``==`` by default; floating-point merges need
    a tolerance, e.g. :func:`numeric_partials_close`). Raises ``AssertionError`` naming the
    law and the operands. Cost: ``len(partials) ** 3`` merges.
    """
    same = equal or (lambda a, b: a == b)
    items = list(partials)
    for a, b in itertools.product(items, repeat=2):
        ab, ba = merge(a, b), merge(b, a)
        assert same(ab, ba), f"merge is not commutative:\n  a={a!r}\n  b={b!r}\n  {ab!r} != {ba!r}"
    for a, b, c in itertools.product(items, repeat=3):
        left, right = merge(merge(a, b), c), merge(a, merge(b, c))
        assert same(left, right), (
            f"merge is not associative:\n  a={a!r}\n  b={b!r}\n  c={c!r}\n"
            f"  (a+b)+c={left!r} != a+(b+c)={right!r}"
        )
    if identity is not None:
        for a in items:
            for merged, side in ((merge(identity, a), "left"), (merge(a, identity), "right")):
                assert same(merged, a), (
                    f"identity is not a {side} identity:\n  a={a!r}\n  merged={merged!r}"
                )


def assert_corruption_detected(
    decode: Callable[[bytes], object],
    data: bytes,
    *,
    masks: Sequence[int] = (0x01, 0x80, 0xFF),
) -> None:
    """Every single-byte flip and every truncation of ``data`` makes ``decode`` raise
    :class:`~streamstate.CorruptDataError`.

    ``data`` itself must decode. Each byte is XORed with each of ``masks`` in turn, and
    every proper prefix (the empty one included) is tried. Anything else (returning, or
    any other exception) raises ``AssertionError`` naming the damage.
    """
    if not masks or not all(0 < m <= 0xFF for m in masks):
        raise ValueError(f"masks must be non-empty byte values in [1, 255], got {masks!r}")
    data = bytes(data)
    decode(data)  # the intact input must decode, or the damage checks prove nothing

    def expect_corrupt(damaged: bytes, what: str) -> None:
        try:
            decode(damaged)
        except CorruptDataError:
            return
        except Exception as exc:  # any other exception is the failure being looked for
            raise AssertionError(f"{what}: raised {type(exc).__name__}: {exc}") from exc
        raise AssertionError(f"{what}: decoded without an error")

    for position in range(len(data)):
        for mask in masks:
            damaged = bytearray(data)
            damaged[position] ^= mask
            expect_corrupt(bytes(damaged), f"byte {position} XOR 0x{mask:02X} of {len(data)}")
    for size in range(len(data)):
        expect_corrupt(data[:size], f"truncated to {size} of {len(data)} bytes")


# -- stateful model testing ----------------------------------------------------------------


class OperatorMachine(RuleBasedStateMachine, Generic[OperatorT, ModelT]):
    """Model-test an operator against a plain-Python model, through crashes and restores.

    Subclass it, implement :meth:`make_operator`, :meth:`make_model` and :meth:`check`, and
    add ``@rule`` methods that apply the same step to ``self.operator`` and ``self.model``.
    The machine adds these steps, which hypothesis interleaves with yours:

    - ``checkpoint``: snapshot the operator and keep a deep copy of the model beside it;
    - ``crash_and_recover``: drop the operator (a crash loses everything since the last
      checkpoint), build a new one and restore the checkpoint into it; the model goes back
      to its copy from that checkpoint (or to a fresh model when none was taken);
    - ``rollback``: restore the last checkpoint into the live operator;
    - ``restore_damaged_checkpoint``: restoring the checkpoint with one byte flipped must
      raise :class:`~streamstate.CorruptDataError` and leave the operator as it was;

    and after every step :meth:`check` compares operator and model. ``snapshot()`` /
    ``restore(data)`` are called on the operator; override :meth:`snapshot` and
    :meth:`restore` for another API. Run it with ``TestMyOperator = MyMachine.TestCase``.
    """

    #: Restoring a snapshot and snapshotting again gives the same bytes (checked when True).
    resnapshot_identical: ClassVar[bool] = True
    #: Whether the ``restore_damaged_checkpoint`` step runs (the format detects flips).
    detects_corruption: ClassVar[bool] = True

    def __init__(self) -> None:
        # RuleBasedStateMachine's metaclass is not ABCMeta, so the abstract hooks are
        # enforced here: a machine missing one fails at once, naming what it lacks.
        missing = [
            name
            for name in ("make_operator", "make_model", "check")
            if getattr(getattr(type(self), name), "__isabstractmethod__", False)
        ]
        if missing:
            raise TypeError(
                f"{type(self).__name__} must implement {', '.join(missing)} "
                "(see OperatorMachine)"
            )
        super().__init__()
        self.operator: OperatorT = self.make_operator()
        self.model: ModelT = self.make_model()
        self.last_checkpoint: tuple[bytes, ModelT] | None = None

    # -- what a subclass provides

    @abstractmethod
    def make_operator(self) -> OperatorT:
        """A new, empty operator under test."""

    @abstractmethod
    def make_model(self) -> ModelT:
        """A new, empty model (plain Python; deep-copied at each checkpoint)."""

    @abstractmethod
    def check(self, operator: OperatorT, model: ModelT) -> None:
        """Assert that ``operator`` and ``model`` hold the same state."""

    def snapshot(self, operator: OperatorT) -> bytes:
        """The operator's snapshot (default: ``operator.snapshot()``)."""
        return cast(_Snapshotting, operator).snapshot()

    def restore(self, operator: OperatorT, data: bytes) -> None:
        """Restore ``data`` into ``operator`` (default: ``operator.restore(data)``)."""
        cast(_Snapshotting, operator).restore(data)

    # -- the built-in steps

    @rule()
    def checkpoint(self) -> None:
        """Snapshot the operator; remember the model as it is now."""
        self.last_checkpoint = (self.snapshot(self.operator), copy.deepcopy(self.model))

    @rule()
    def crash_and_recover(self) -> None:
        """Lose the operator; recover a new one from the last checkpoint."""
        self.operator = self.make_operator()
        if self.last_checkpoint is None:
            self.model = self.make_model()
            return
        data, model = self.last_checkpoint
        self.restore(self.operator, data)
        self.model = copy.deepcopy(model)
        if self.resnapshot_identical:
            assert self.snapshot(self.operator) == data, "re-snapshot after recovery differs"

    @precondition(lambda self: self.last_checkpoint is not None)
    @rule()
    def rollback(self) -> None:
        """Restore the last checkpoint into the live operator."""
        assert self.last_checkpoint is not None
        data, model = self.last_checkpoint
        self.restore(self.operator, data)
        self.model = copy.deepcopy(model)

    @precondition(lambda self: self.detects_corruption and self.last_checkpoint is not None)
    @rule(position=st.integers(0, 1 << 31), mask=st.integers(1, 0xFF))
    def restore_damaged_checkpoint(self, position: int, mask: int) -> None:
        """A damaged checkpoint is refused and changes nothing."""
        assert self.last_checkpoint is not None
        damaged = bytearray(self.last_checkpoint[0])
        if not damaged:
            return
        position %= len(damaged)
        damaged[position] ^= mask
        before = self.snapshot(self.operator) if self.resnapshot_identical else None
        try:
            self.restore(self.operator, bytes(damaged))
        except CorruptDataError:
            pass
        else:
            raise AssertionError(f"restore accepted a checkpoint with byte {position} damaged")
        if before is not None:
            assert self.snapshot(self.operator) == before, "a refused restore changed the state"

    @invariant()
    def agrees_with_model(self) -> None:
        """After every step: the operator holds what the model says."""
        self.check(self.operator, self.model)
