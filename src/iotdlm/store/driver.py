"""km's hot statements on the database driver's own connection (issue 15, ADR 0021).

Reading one device row through a SQLAlchemy :class:`~sqlalchemy.Connection` cost 84 us of CPU,
the same SELECT on the driver's connection 2-4 us: the difference is SQLAlchemy's per-transaction
and per-statement machinery (``Connection`` set-up, the ``begin`` event, the compiled-cache
lookup, the execution context, the ``Result``). :class:`DriverConnection` keeps what matters of
it -- the statements are SQLAlchemy Core statements, compiled by the dialect ONCE, and values go
through the very type processors SQLAlchemy applies (so a row written here reads back the same
through SQLAlchemy and the other way round) -- and drops the rest: one pooled DBAPI connection
(the engine's pool, so PostgreSQL's pre-ping still replaces a killed connection), the dialect's
SQL string and a parameter tuple or dict per statement, plain tuples back.

Only statements built once (module constants) may be run here: the compiled form is cached by the
statement object. Driver errors are raised as SQLAlchemy's (``IntegrityError`` for a unique
violation), so :meth:`~iotdlm.store.engine.Database.transaction`'s guard and the conflict
handlers treat both paths alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Dialect, Executable
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One statement as the driver takes it."""

    sql: str
    #: bind names in order (positional paramstyles) or None (named: a dict is passed)
    order: tuple[str, ...] | None
    binds: dict[str, Processor]
    results: tuple[Processor, ...]
    #: values the statement carries itself (``LIMIT 1``)
    fixed: dict[str, Any]

    def params(self, values: Mapping[str, Any]) -> Any:
        if self.fixed:
            values = {**self.fixed, **values}
        binds = self.binds
        if self.order is not None:
            return tuple(v if (p := binds[n]) is None or v is None else p(v) for n in self.order for v in (values[n],))
        return {n: v if (p := binds.get(n)) is None or v is None else p(v) for n, v in values.items()}

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        if not self.results:  # text(): no typed columns
            return tuple(raw)
        return tuple(v if p is None or v is None else p(v) for p, v in zip(self.results, raw, strict=True))


def _compile(stmt: Executable, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
    assert isinstance(stmt, ClauseElement)
    compiled = stmt.compile(dialect=dialect, column_keys=list(keys) if keys else None)
    assert isinstance(compiled, SQLCompiler)
    binds: dict[str, Processor] = {}
    fixed: dict[str, Any] = {}
    for name, bind in compiled.binds.items():
        binds[name] = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if keys and name not in keys:  # a Python-side column default: SQLAlchemy's execution context
            raise ValueError(f"the driver path cannot run {stmt}: column {name} needs a default")
        if not bind.required and bind.callable is None and name not in keys:
            fixed[name] = bind.effective_value
    results: list[Processor] = []
    for col in getattr(stmt, "selected_columns", ()):
        results.append(col.type.dialect_impl(dialect).result_processor(dialect, None))
    order = tuple(compiled.positiontup) if compiled.positional and compiled.positiontup is not None else None
    return _Compiled(compiled.string, order, binds, tuple(results), fixed)


class DriverResult:
    """Rows of one statement, as tuples (the subset of SQLAlchemy's ``Result`` the store uses)."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows)

    def first(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def one(self) -> tuple[Any, ...]:
        if len(self._rows) != 1:
            raise sa_exc.NoResultFound("expected one row") if not self._rows else sa_exc.MultipleResultsFound()
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


class StatementCache:
    """Compiled statements of one dialect, by statement object (and the insert's column keys)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._lock = threading.Lock()
        # the statement is kept in the value: its id is never reused while cached
        self._cache: dict[tuple[int, tuple[str, ...]], tuple[Executable, _Compiled]] = {}

    def get(self, stmt: Executable, keys: tuple[str, ...]) -> _Compiled:
        hit = self._cache.get((id(stmt), keys))
        if hit is not None:
            return hit[1]
        compiled = _compile(stmt, self.dialect, keys)
        with self._lock:
            self._cache[(id(stmt), keys)] = (stmt, compiled)
        return compiled


class DriverConnection:
    """One transaction on a DBAPI connection: ``execute(stmt, params)`` as SQLAlchemy's
    ``Connection`` spells it, for statements built once."""

    def __init__(self, dbapi_connection: Any, statements: StatementCache, dbapi_error: type[Exception]) -> None:
        self._conn = dbapi_connection
        self._statements = statements
        self._error = dbapi_error
        self.dialect = statements.dialect

    def execute(
        self, stmt: Executable, params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
    ) -> DriverResult:
        """Run ``stmt`` once (``params`` a mapping or None) or once per mapping (a list: executemany)."""
        many = isinstance(params, Sequence)
        first: Mapping[str, Any] = (params[0] if params else {}) if isinstance(params, Sequence) else (params or {})
        # an INSERT without .values() takes its columns from the parameters, as SQLAlchemy does
        keys = tuple(first) if getattr(stmt, "is_insert", False) else ()
        compiled = self._statements.get(stmt, keys)
        cursor = self._conn.cursor()
        try:
            if many:
                assert isinstance(params, Sequence)
                cursor.executemany(compiled.sql, [compiled.params(p) for p in params])
                return DriverResult([], cursor.rowcount)
            cursor.execute(compiled.sql, compiled.params(first))
            rows = [compiled.row(raw) for raw in cursor.fetchall()] if cursor.description else []
            return DriverResult(rows, cursor.rowcount)
        except self._error as exc:
            raise sa_exc.DBAPIError.instance(compiled.sql, None, exc, self._error, dialect=self.dialect) from exc
        finally:
            cursor.close()
