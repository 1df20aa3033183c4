"""The store's engine seen from the repositories: the public ``transaction()`` (commit, roll back,
database failures named in the operator's words, unique violations mapped by ``conflict``), the
shared filter builder, and that no caller outside ``store/`` needs a private name."""

from __future__ import annotations

import ast
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, text

from iotdlm import errors
from iotdlm.store import Store
from iotdlm.store import records as r
from iotdlm.store.queries import equal_filters
from iotdlm.store.tables import meta

SRC = Path(__file__).resolve().parents[2] / "src" / "iotdlm"


def test_transaction_commits_when_the_block_returns(store: Store) -> None:
    with store.transaction("writing a test setting", write=True) as conn:
        conn.execute(meta.insert().values(key="k", value="v"))
    assert store.get_meta("k") == "v"


def _write_then_fail(store: Store) -> None:
    with store.transaction("writing a test setting", write=True) as conn:
        conn.execute(meta.insert().values(key="k", value="v"))
        raise LookupError("the caller changed its mind")


def test_transaction_rolls_back_when_the_block_raises(store: Store) -> None:
    with pytest.raises(LookupError):
        _write_then_fail(store)
    assert store.get_meta("k") is None


def test_a_database_failure_says_what_the_store_was_doing(store: Store) -> None:
    with (
        pytest.raises(errors.UnavailableError, match="failed while reading the moon table") as caught,
        store.transaction("reading the moon table", write=False) as conn,
    ):
        conn.execute(text("SELECT * FROM no_such_table"))
    assert store.url in str(caught.value)


def test_a_unique_violation_is_unavailable_without_conflict_and_the_given_error_with_it(store: Store) -> None:
    store.set_meta("k", "v")
    with pytest.raises(errors.UnavailableError), store.transaction("adding a setting", write=True) as conn:
        conn.execute(meta.insert().values(key="k", value="w"))
    with (
        pytest.raises(errors.ConflictError, match="setting k exists") as caught,
        store.transaction(
            "adding a setting", write=True, conflict=lambda _exc: errors.ConflictError("setting k exists", field="key")
        ) as conn,
    ):
        conn.execute(meta.insert().values(key="k", value="w"))
    assert caught.value.field == "key"
    assert store.get_meta("k") == "v"


def test_a_closed_store_refuses_a_transaction(store_url: str) -> None:
    store = Store.open(store_url)
    store.close()
    with pytest.raises(RuntimeError, match="closed"), store.transaction("reading", write=False) as conn:
        conn.execute(select(meta.c.key))


_TEXT = st.text(alphabet=string.ascii_letters + "\x00", max_size=80)


@given(dtype=st.none() | _TEXT, status=st.none() | _TEXT)
def test_equal_filters_match_given_values_and_give_up_on_impossible_ones(dtype: str | None, status: str | None) -> None:
    where = equal_filters((meta.c.key, dtype, r.DTYPE_LEN), (meta.c.value, status, r.STATUS_LEN))
    given_values = [(v, n) for v, n in ((dtype, r.DTYPE_LEN), (status, r.STATUS_LEN)) if v is not None]
    if all(r.findable_text(v, n) for v, n in given_values):
        assert where is not None
        assert len(where) == len(given_values)
    else:
        assert where is None


def _private_store_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in {"_tx", "_guard", "_insert", "_engine"}
    ]


def test_nothing_outside_store_uses_the_engine_privately() -> None:
    outside = [path for path in sorted(SRC.rglob("*.py")) if "store" not in path.relative_to(SRC).parts]
    found = [hit for path in outside for hit in _private_store_calls(path)]
    assert found == []
