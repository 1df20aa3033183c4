"""Small helpers the store's repositories share: the filter builder, paging checks, quoting
keys in messages. Internal to :mod:`iotdlm.store`."""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import ColumnElement

from iotdlm.store import records as r

IN_CHUNK: Final = 500
"""Keys per ``IN (...)`` list: well under every backend's limit on bound parameters."""


def quote(value: str, limit: int = 64) -> str:
    """``value`` for an error message: repr'd, cut after ``limit`` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got limit={limit} offset={offset}")


def check_batch_size(batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")


def equal_filters(*filters: tuple[Any, str | None, int]) -> list[ColumnElement[bool]] | None:
    """WHERE clauses ``column == value`` for each ``(column, value, max_len)`` whose value is
    given (not None), or None if no stored row can match (a value with NUL or longer than its
    column): lookups of impossible keys find nothing."""
    where: list[ColumnElement[bool]] = []
    for column, value, max_len in filters:
        if value is None:
            continue
        if not r.findable_text(value, max_len):
            return None
        where.append(column == value)
    return where
