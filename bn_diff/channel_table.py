"""`LayerResult.channels` without one Python object per channel until one is asked for.

A ResNet-50 forward has ~26,000 BN channels; building a frozen `ChannelStats` for each one inside
the hooks cost about a tenth of a plain forward, while most readers (the exit code, `--fail-on`,
the summary table) never look at a channel. `ChannelTable` is an immutable
`Sequence[ChannelStats]` that behaves like the tuple it replaces (len, indexing, slices,
iteration, equality and hash with an equal tuple, pickling) but keeps the per-channel numbers as
columns: one stacked float64 tensor copy (the source tensors may be buffers the checks reuse;
`adopt` takes a host array's rows that no one else holds, without a copy), turned into Python
lists on first use. `ChannelStats` objects are made on indexing (one) or
iteration (all at once, a column at a time), and cached, so a channel read twice is the same
object. The values are exactly the tuple's: `.tolist()` of the same float64 tensors.

`column(name)` and `tensor(name)` give one field for every channel without making any object.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields
from itertools import repeat
from typing import Any, cast, overload

import torch

from .results import ChannelStats

FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ChannelStats))
"""ChannelStats's fields, in order: the table's columns."""
_FLOATS: tuple[str, ...] = (
    "batch_mean",
    "batch_var",
    "running_mean",
    "running_var",
    "gamma",
    "beta",
    "max_abs_diff",
    "tolerance",
    "train_eval_gap",
)
"""The float64 columns; `index` comes from the position, `mismatched` from an integer tensor."""

# Making all objects at once: allocate them, then set one slot over all of them per field, each
# a loop in C (map over the slot descriptor's __set__), which is what the dataclass's own
# __init__ does with object.__setattr__, field by field, in Python. Only valid while
# ChannelStats has no __post_init__ and exactly these fields; otherwise use its constructor.
_FAST = set(FIELDS) == {"index", "mismatched", *_FLOATS} and not hasattr(
    ChannelStats, "__post_init__"
)
_SETTERS = tuple(getattr(ChannelStats, name).__set__ for name in FIELDS) if _FAST else ()
_new = object.__new__


class ChannelTable(Sequence[ChannelStats]):
    """An immutable, lazily built sequence of `ChannelStats`, equal to the tuple of them."""

    __slots__ = ("_n", "_src", "_rows", "_mism", "_cols", "_items", "_complete")

    _n: int
    _src: torch.Tensor | None
    """(rows, C) float64: the numbers until `_cols` is made from them (then None: no tensor
    outlives the first read). A row for each present float column (`_rows`), and from `adopt`
    maybe others, not read."""
    _rows: dict[str, int]
    """Row of `_src` of each present float column."""
    _mism: torch.Tensor | None
    """(C,) int64 (or float64 holding integers, from `adopt`): `mismatched`, until `_cols` is
    made."""
    _cols: dict[str, list[Any]] | None
    """Python values per field (absent optional columns missing), made on first use."""
    _items: list[ChannelStats | None] | None
    """Objects made so far (None: none yet)."""
    _complete: bool
    """Every object is made."""

    def __init__(self, channels: Iterable[ChannelStats] = ()) -> None:
        """A table of given objects, as `tuple(channels)` would hold them."""
        items: list[ChannelStats | None] = list(channels)
        self._n = len(items)
        self._src = self._mism = None
        self._rows = {}
        self._cols = None
        self._items = items
        self._complete = True

    @classmethod
    def of(cls, channels: Sequence[ChannelStats]) -> ChannelTable:
        """`channels` itself when it is a table, else a table of its objects."""
        return channels if isinstance(channels, ChannelTable) else cls(channels)

    @classmethod
    def from_columns(
        cls,
        *,
        batch_mean: torch.Tensor,
        batch_var: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        gamma: torch.Tensor | None,
        beta: torch.Tensor | None,
        max_abs_diff: torch.Tensor,
        mismatched: torch.Tensor,
        tolerance: torch.Tensor,
        train_eval_gap: torch.Tensor | None,
    ) -> ChannelTable:
        """A table of (C,) tensors, one per field (None: absent in every channel).

        The tensors are copied (one stacked float64 tensor, and the counts), so the caller may
        reuse or modify them afterwards. Like `map` over the columns, the table is as long as
        the shortest column.
        """
        given = {
            "batch_mean": batch_mean,
            "batch_var": batch_var,
            "running_mean": running_mean,
            "running_var": running_var,
            "gamma": gamma,
            "beta": beta,
            "max_abs_diff": max_abs_diff,
            "tolerance": tolerance,
            "train_eval_gap": train_eval_gap,
        }
        present = {k: v.reshape(-1) for k, v in given.items() if v is not None}
        counts = mismatched.reshape(-1)
        n = min([counts.numel(), *(v.numel() for v in present.values())])
        f64 = torch.float64
        # on the host: a report holds numbers, not device memory (one transfer on a GPU)
        src = torch.stack(
            [v if v.numel() == n and v.dtype == f64 else v[:n].to(f64) for v in present.values()]
        ).cpu()
        rows = {k: i for i, k in enumerate(present)}
        return cls.adopt(src, rows, counts[:n].to("cpu", torch.int64, copy=True))

    @classmethod
    def adopt(
        cls, src: torch.Tensor, rows: dict[str, int], mismatched: torch.Tensor
    ) -> ChannelTable:
        """A table over a (rows, C) float64 CPU tensor that the caller hands over and never
        writes again (no copy): `rows` names the row of each present float column (other rows
        are ignored); `mismatched`, (C,) counts, int64 or float64 holding integers (a row of
        `src`, say), likewise handed over. `rows` is kept as given: never change it after."""
        n = int(src.shape[1])
        self = cls.__new__(cls)
        self._n = n
        self._src = src
        self._rows = rows
        self._mism = mismatched
        self._cols = None
        self._items = None
        self._complete = n == 0
        if n == 0:
            self._items = []
        return self

    # --- columns -------------------------------------------------------------------------------
    def _columns(self) -> dict[str, list[Any]]:
        cols = self._cols
        if cols is None:
            src, mism = self._src, self._mism
            if src is not None and mism is not None:
                # one transfer for all float columns (one device sync on a GPU)
                rows = src.tolist()
                cols = {k: rows[i] for k, i in self._rows.items()}
                cols["mismatched"] = mism.to(torch.int64).tolist()
                self._cols = cols  # before dropping the tensors: a reader in another thread
                self._src = self._mism = None  # sees one or the other, never neither
            else:
                items = self._materialize()
                cols = {k: [getattr(c, k) for c in items] for k in FIELDS if k != "index"}
                self._cols = cols
        return cols

    def column(self, name: str) -> tuple[Any, ...]:
        """One field of every channel, in order, as `ChannelStats` holds it (None where absent)."""
        if name == "index":
            return tuple(range(self._n))
        if name not in FIELDS:
            raise KeyError(f"ChannelStats has no field {name!r}")
        col = self._columns().get(name)
        return (None,) * self._n if col is None else tuple(col)

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """One float field of every channel as a new (C,) float64 tensor on `device` (None when
        the column is absent, i.e. holds None). `mismatched` comes as int64, `index` as arange."""
        if name == "index":
            return torch.arange(self._n, device=device)
        src, mism = self._src, self._mism  # one snapshot: another thread may drop them
        if self._cols is None and src is not None and mism is not None:
            if name == "mismatched":
                return mism.to(device, torch.int64, copy=True)
            row = self._rows.get(name)
            if row is None:
                if name not in FIELDS:
                    raise KeyError(f"ChannelStats has no field {name!r}")
                return None
            return src[row].to(device, copy=True)
        values = self.column(name)
        if any(v is None for v in values):
            return None
        dtype = torch.int64 if name == "mismatched" else torch.float64
        return torch.tensor(values, dtype=dtype, device=device)

    # --- objects -------------------------------------------------------------------------------
    def _materialize(self) -> list[ChannelStats]:
        """Every channel's object (made now, a column at a time, where not made yet)."""
        items = self._items
        if self._complete:
            return cast(list[ChannelStats], items)  # complete: no None left
        cols = self._columns()
        n = self._n
        values: list[Iterable[Any]] = [
            range(n) if k == "index" else cols.get(k, repeat(None, n)) for k in FIELDS
        ]
        made: list[ChannelStats]
        if _FAST:
            made = list(map(_new, repeat(ChannelStats, n)))
            for setter, col in zip(_SETTERS, values, strict=True):
                deque(map(setter, made, col), maxlen=0)
        else:
            made = list(map(ChannelStats, *values))
        if items is not None:  # keep the objects already handed out
            made = [m if c is None else c for m, c in zip(made, items, strict=True)]
        self._items = cast(list[ChannelStats | None], made)
        self._complete = True
        return made

    def _one(self, i: int) -> ChannelStats:
        src, mism = self._src, self._mism  # snapshots, in the order `_columns` drops them
        cols = self._cols
        kw: dict[str, Any]
        if cols is None and src is not None and mism is not None:
            vals = src[:, i].tolist()
            kw = {k: (vals[self._rows[k]] if k in self._rows else None) for k in _FLOATS}
            kw["index"] = i
            kw["mismatched"] = int(mism[i].item())
        else:
            cols = self._columns()
            kw = {k: (i if k == "index" else cols[k][i] if k in cols else None) for k in FIELDS}
        return ChannelStats(**kw)

    @overload
    def __getitem__(self, i: int) -> ChannelStats: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[ChannelStats, ...]: ...
    def __getitem__(self, i: int | slice) -> ChannelStats | tuple[ChannelStats, ...]:
        if isinstance(i, slice):
            return tuple(self._materialize()[i])  # a slice of a tuple is a tuple
        try:
            k = operator.index(i)
        except TypeError:
            raise TypeError(
                f"ChannelTable indices must be integers or slices, not {type(i).__name__}"
            ) from None
        n = self._n
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError("ChannelTable index out of range")
        items = self._items
        if items is None:
            items = self._items = [None] * n
        item = items[k]
        if item is None:
            item = items[k] = self._one(k)
        return item

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[ChannelStats]:
        return iter(self._materialize())

    def __reversed__(self) -> Iterator[ChannelStats]:
        return reversed(self._materialize())

    def __contains__(self, value: object) -> bool:
        return value in self._materialize()

    # --- what the tuple also did ---------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if isinstance(other, ChannelTable):
            return self._n == other._n and self._materialize() == other._materialize()
        if isinstance(other, tuple):
            return self._n == len(other) and tuple(self._materialize()) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._materialize()))

    def __add__(self, other: object) -> tuple[ChannelStats, ...]:
        if isinstance(other, (ChannelTable, tuple)):
            return tuple(self._materialize()) + tuple(other)
        return NotImplemented

    def __radd__(self, other: object) -> tuple[ChannelStats, ...]:
        if isinstance(other, tuple):
            return other + tuple(self._materialize())
        return NotImplemented

    def __repr__(self) -> str:
        return f"ChannelTable({tuple(self._materialize())!r})"

    def __copy__(self) -> ChannelTable:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> ChannelTable:
        return self  # immutable, and holds only numbers

    def __reduce__(self) -> tuple[Any, ...]:
        # pickles the Python columns, never a tensor
        cols = self._columns()
        return (_from_columns_state, (self._n, {k: list(v) for k, v in cols.items()}))


def _from_columns_state(n: int, cols: dict[str, list[Any]]) -> ChannelTable:
    """Unpickling: a table over Python columns (absent optional columns missing)."""
    self = ChannelTable.__new__(ChannelTable)
    self._n = n
    self._src = self._mism = None
    self._rows = {}
    self._cols = cols
    self._items = None
    self._complete = n == 0
    if n == 0:
        self._items = []
    return self


__all__ = ["FIELDS", "ChannelTable"]
