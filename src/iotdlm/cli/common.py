"""Shared CLI plumbing: the data-folder option, the console, and mapping errors to exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from iotdlm.errors import IotdlmError, RejectedError, UnavailableError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 1
EXIT_REJECTED = 4
EXIT_UNAVAILABLE = 3

DATA_ENV = "IOTDLM_DATA"

F = TypeVar("F", bound=Callable[..., Any])


def data_option(f: F) -> F:
    return click.option(
        "--data",
        "data",
        type=click.Path(path_type=Path, file_okay=False),
        default=lambda: os.environ.get(DATA_ENV, "iotdlm-data"),
        show_default=f"${DATA_ENV} or ./iotdlm-data",
        help="Deployment data folder (created by `iotdlm init`).",
    )(f)


def handle_errors(f: F) -> F:
    """Turn iotdlm errors into a one-line message and an exit code; never a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except UnavailableError as exc:
            err_console.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}")
            err_console.print("Is the NATS server / database running and reachable? `iotdlm status` helps.")
            sys.exit(EXIT_UNAVAILABLE)
        except RejectedError as exc:
            field = f" [field: {exc.field}]" if exc.field else ""
            err_console.print(f"[red]refused[/red] ({exc.code}): {escape(exc.message + field)}")
            sys.exit(EXIT_REJECTED)
        except IotdlmError as exc:
            err_console.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}")
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


#: loggers whose warnings a one-shot command's user does not need (their error message says it)
LIBRARY_LOGGERS = ("iotdlm.bus", "nats")


@contextlib.contextmanager
def quiet_library_logs(names: tuple[str, ...] = LIBRARY_LOGGERS) -> Iterator[None]:
    """Keep the bus's connection warnings (``iotdlm.bus.nats WARNING ... Connect call failed``) from
    the user of a one-shot command, whose own message says what failed and what to do; ``iotdlm
    -v`` (the root logger at DEBUG) shows them."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)
