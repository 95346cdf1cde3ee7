"""ChannelTable (LayerResult.channels from check_call) behaves as the eager tuple it replaces."""

from __future__ import annotations

import copy
import json
import math
import pickle
from dataclasses import fields, replace
from typing import Any

import models
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bn_diff
from bn_diff import channel_table
from bn_diff.channel_table import FIELDS, ChannelTable
from bn_diff.results import ChannelStats, LayerInfo, LayerResult

F64 = torch.float64
OPTIONAL = ("running_mean", "running_var", "gamma", "beta", "train_eval_gap")
FLOATS = (
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
Cols = dict[str, "torch.Tensor | None"]


def eager(cols: Cols) -> tuple[ChannelStats, ...]:
    """What check_call built before ChannelTable: ten .tolist() and one object per channel."""
    c = int(cols["mismatched"].numel())  # type: ignore[union-attr]
    none = [None] * c

    def lst(name: str) -> list[Any]:
        t = cols[name]
        return none if t is None else t.tolist()

    return tuple(
        map(
            ChannelStats,
            range(c),
            lst("batch_mean"),
            lst("batch_var"),
            lst("running_mean"),
            lst("running_var"),
            lst("gamma"),
            lst("beta"),
            lst("max_abs_diff"),
            lst("mismatched"),
            lst("tolerance"),
            lst("train_eval_gap"),
        )
    )


def table(cols: Cols) -> ChannelTable:
    return ChannelTable.from_columns(**cols)  # type: ignore[arg-type]


def same(a: Any, b: Any) -> bool:
    """Equal, NaN included (tuple equality of NaN depends on object identity)."""
    return repr(a) == repr(b)


def make_cols(c: int, *, absent: tuple[str, ...] = (), seed: int = 0) -> Cols:
    g = torch.Generator().manual_seed(seed)
    cols: Cols = {k: torch.randn(c, dtype=F64, generator=g) for k in FLOATS}
    cols["mismatched"] = torch.randint(0, 5, (c,), generator=g)
    for k in absent:
        cols[k] = None
    return cols


# --- the property: the table is the eager tuple ------------------------------------------------
float64s = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def columns(draw: st.DrawFn) -> Cols:
    c = draw(st.integers(0, 9))
    absent = draw(st.sets(st.sampled_from(OPTIONAL)))
    cols: Cols = {
        k: None
        if k in absent
        else torch.tensor(draw(st.lists(float64s, min_size=c, max_size=c)), dtype=F64)
        for k in FLOATS
    }
    counts = draw(st.lists(st.integers(0, 2**40), min_size=c, max_size=c))
    cols["mismatched"] = torch.tensor(counts, dtype=torch.int64)
    return cols


reads = st.lists(
    st.one_of(
        st.tuples(st.just("index"), st.integers(-12, 12)),
        st.tuples(
            st.just("slice"),
            st.one_of(st.none(), st.integers(-12, 12)),
            st.one_of(st.none(), st.integers(-12, 12)),
            st.one_of(st.none(), st.integers(-3, 3).filter(bool)),
        ),
        st.tuples(st.just("iter")),
        st.tuples(st.just("column"), st.sampled_from(FIELDS)),
    ),
    max_size=8,
)


@given(columns(), reads)
def test_table_equals_the_eager_tuple_whatever_is_read_first(cols: Cols, ops: list[Any]) -> None:
    t, ref = table(cols), eager(cols)
    assert len(t) == len(ref) and bool(t) == bool(ref)
    for op in ops:
        if op[0] == "index":
            i = op[1]
            if -len(ref) <= i < len(ref):
                assert same(t[i], ref[i])
                assert t[i] is t[i]  # made once, then cached
            else:
                with pytest.raises(IndexError):
                    t[i]
        elif op[0] == "slice":
            s = slice(*op[1:])
            assert type(t[s]) is tuple and same(t[s], ref[s])
        elif op[0] == "iter":
            assert same(tuple(t), ref)
        else:
            assert same(t.column(op[1]), tuple(getattr(c, op[1]) for c in ref))
    assert same(tuple(t), ref) and same(list(reversed(t)), list(reversed(ref)))
    fresh = table(cols)  # every channel made one at a time, last first
    assert same([fresh[i] for i in range(len(ref) - 1, -1, -1)], list(reversed(ref)))
    assert all(type(a) is ChannelStats and type(a.mismatched) is int for a in t)
    assert all(type(getattr(a, k)) in (float, type(None)) for a in t for k in FLOATS)
    assert json.dumps([c.to_json() for c in t]) == json.dumps([c.to_json() for c in ref])


@given(columns())
def test_equality_and_hash_match_the_tuple(cols: Cols) -> None:
    for k in FLOATS:  # NaN != NaN across different objects, for the tuple as well
        v = cols[k]
        if v is not None:
            cols[k] = v.nan_to_num(nan=0.5)
    t, ref = table(cols), eager(cols)
    assert t == ref and ref == t and not (t != ref)
    assert t == table(cols) and t == ChannelTable(ref)
    assert hash(t) == hash(ref)
    assert {ref: 1}[t] == 1  # type: ignore[index]


# --- sequence semantics ------------------------------------------------------------------------
def test_indexing_slices_and_errors() -> None:
    cols = make_cols(6)
    t, ref = table(cols), eager(cols)
    assert t[-1] == ref[-1] and t[-6] == ref[0] and t[-1] is t[5]
    assert t[1:4] == ref[1:4] and t[::-2] == ref[::-2] and t[10:] == () and t[:] == ref
    assert t[torch.tensor(2)] == ref[2]  # type: ignore[call-overload]  # any __index__
    with pytest.raises(IndexError):
        t[6]
    with pytest.raises(IndexError):
        t[-7]
    with pytest.raises(TypeError):
        t["batch_mean"]  # type: ignore[call-overload]
    assert ref[3] in t and ref[3] not in table(make_cols(6, seed=1))
    assert t.index(ref[4]) == 4 and t.count(ref[4]) == 1
    assert t + ref == ref + ref and ref + t == ref + ref and t + t == ref + ref
    assert len(ChannelTable()) == 0 and not ChannelTable() and ChannelTable() == ()
    assert not table(make_cols(0)) and table(make_cols(0)) == ()


def test_objects_handed_out_stay_the_same_objects() -> None:
    t = table(make_cols(5))
    first, last = t[0], t[-1]
    everything = list(t)
    assert everything[0] is first and everything[4] is last
    assert all(a is b for a, b in zip(t, everything, strict=True))


def test_not_equal_to_other_contents_or_other_types() -> None:
    cols = make_cols(4)
    t, ref = table(cols), eager(cols)
    assert t != table(make_cols(4, seed=1)) and t != ref[:3] and t != ref[::-1]
    assert t != list(ref)  # a tuple is not equal to a list either
    assert t != "channels" and t != None  # noqa: E711


def test_the_source_tensors_may_change_afterwards() -> None:
    cols = make_cols(4)
    ref = eager(cols)
    t = table(cols)
    for v in cols.values():
        assert v is not None
        v.fill_(7)  # the checks reuse buffers: the table keeps its own copy
    assert t == ref


def test_absent_columns_are_none_everywhere() -> None:
    cols = make_cols(3, absent=OPTIONAL)
    t = table(cols)
    assert t[1].gamma is None and t[1].running_mean is None and t[1].train_eval_gap is None
    assert t.column("beta") == (None, None, None) and t.tensor("running_var") is None
    assert all(c.to_json()["gamma"] is None for c in t)


def test_shorter_column_truncates_like_map() -> None:
    cols = make_cols(4)
    cols["gamma"] = cols["gamma"][:3]  # type: ignore[index]
    assert len(table(cols)) == 3 and table(cols) == eager(cols)  # map stops at the shortest


def test_columns_and_tensors_without_making_objects() -> None:
    cols = make_cols(5, absent=("beta",))
    t, ref = table(cols), eager(cols)
    fresh = table(cols)  # straight from the stacked tensor: no Python list, no object
    for k in FIELDS:
        a, b = fresh.tensor(k), ChannelTable(ref).tensor(k)
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    assert fresh._cols is None and fresh._items is None
    assert t.column("batch_var") == tuple(c.batch_var for c in ref)
    assert t.column("index") == (0, 1, 2, 3, 4)
    got = t.tensor("batch_mean")
    assert got is not None and got.dtype == F64
    assert torch.equal(got, torch.tensor([c.batch_mean for c in ref], dtype=F64))
    got.fill_(0)  # a copy: the table is unchanged
    assert t.column("batch_mean") == tuple(c.batch_mean for c in ref)
    counts = t.tensor("mismatched")
    assert counts is not None and counts.tolist() == [c.mismatched for c in ref]
    assert t.tensor("beta") is None and t.column("beta") == (None,) * 5
    assert t._items is None  # nothing above made an object
    with pytest.raises(KeyError):
        t.column("nope")
    with pytest.raises(KeyError):
        t.tensor("nope")
    items = ChannelTable(ref)  # a table of given objects answers the same
    for k in FIELDS:
        assert items.column(k) == t.column(k)
        a, b = items.tensor(k), t.tensor(k)
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    assert ChannelTable.of(t) is t and ChannelTable.of(ref) == t


def test_pickle_and_copy() -> None:
    cols = make_cols(4, absent=("gamma",))
    cols["batch_var"][1] = math.inf  # type: ignore[index]
    untouched, one_read, all_read = table(cols), table(cols), table(cols)
    one_read[2]
    tuple(all_read)
    for t in (untouched, one_read, all_read, ChannelTable(eager(cols))):
        data = pickle.dumps(t)
        assert b"torch" not in data  # numbers only, never a tensor
        back = pickle.loads(data)
        assert isinstance(back, ChannelTable) and back == t and back[2] == t[2]
        assert back.column("gamma") == (None,) * 4
        assert copy.copy(t) == t and copy.deepcopy(t) == t
    assert pickle.loads(pickle.dumps(table(make_cols(0)))) == ()


def test_fields_match_channel_stats_and_the_fast_path_is_on() -> None:
    assert FIELDS == tuple(f.name for f in fields(ChannelStats))
    assert set(FIELDS) == {"index", "mismatched", *FLOATS}
    assert channel_table._FAST  # else every object goes through the constructor (slower)


def test_layer_results_with_a_table_or_a_tuple_are_equal() -> None:
    cols = make_cols(3)
    info = LayerInfo("bn", "BatchNorm2d", "eval", "running", 3, 1e-5, 0.1, True, True)
    kw: dict[str, Any] = dict(
        info=info,
        numel=12,
        mismatched=0,
        max_abs_diff=0.0,
        max_abs_index=(0,),
        max_rel_diff=0.0,
        max_rel_index=(0,),
        atol=1e-5,
        rtol=1e-6,
    )
    lazy = LayerResult(channels=table(cols), **kw)
    tup = LayerResult(channels=eager(cols), **kw)
    assert lazy == tup and lazy.to_json() == tup.to_json()
    assert replace(lazy, channels=eager(cols)) == lazy
    assert replace(tup, channels=()).to_json()["channels"] == []


# --- through the pipeline ----------------------------------------------------------------------
def test_run_gives_tables_that_agree_with_their_columns() -> None:
    net = models.small_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    report = bn_diff.run(net, x, mode="eval")
    assert report.layers
    for lr in report.layers:
        assert isinstance(lr.channels, ChannelTable)
        assert len(lr.channels) == lr.info.num_features
        n = len(lr.channels)
        one = lr.channels[n // 2]
        assert list(lr.channels)[n // 2] is one
        assert [c.index for c in lr.channels] == list(range(n))
        assert lr.channels.column("mismatched") == tuple(c.mismatched for c in lr.channels)
    back = pickle.loads(pickle.dumps(report))
    assert back.to_json() == report.to_json()
    assert all(isinstance(lr.channels, ChannelTable) for lr in back.layers)


def test_run_without_affine_or_running_stats_gives_none_columns() -> None:
    net = nn.Sequential(nn.BatchNorm2d(3, affine=False, track_running_stats=False))
    report = bn_diff.run(net, torch.randn(2, 3, 4, 4), mode="eval")
    (lr,) = report.layers
    assert isinstance(lr.channels, ChannelTable)
    for k in ("gamma", "beta", "running_mean", "running_var", "train_eval_gap"):
        assert lr.channels.column(k) == (None,) * 3
    assert lr.to_json()["channels"][0]["gamma"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_columns_give_the_same_table() -> None:
    cols = make_cols(7, absent=("train_eval_gap",))
    gpu = {k: None if v is None else v.cuda() for k, v in cols.items()}
    t = table(gpu)
    assert t[3] == eager(cols)[3] and t == eager(cols)
    got = t.tensor("batch_mean", device="cuda")
    assert got is not None and got.is_cuda
