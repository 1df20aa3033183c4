"""Shared test configuration. Fixture plug-ins live beside this file, one per seam."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from iotdlm.clock import OFFSET_ENV, offset_from_env

pytest_plugins = ["tests.fixtures_nats", "tests.fixtures_store", "tests.fixtures_hsm"]


def _consoles_that_read_columns_at_each_print() -> None:
    """Rich fixes a console's width from ``$COLUMNS`` when the console is made, i.e. when
    ``iotdlm.cli.common`` is first imported. In-process CLI tests (click's CliRunner) each pass
    their own ``COLUMNS``: whichever test imported the module first would fix the width of every
    later one in that process (seen under pytest-xdist, whose workers run the tests in another
    order). Made here with ``COLUMNS`` unset, the consoles read it at each print."""
    columns = os.environ.pop("COLUMNS", None)
    try:
        import iotdlm.cli.common  # noqa: F401 - imported for its consoles
    finally:
        if columns is not None:
            os.environ["COLUMNS"] = columns


_consoles_that_read_columns_at_each_print()

# On a moved clock (``make test-future``'s two passes) a property test runs a quarter of its
# examples: the real-clock pass runs them all, and what the moved clock can break is a date, not
# an input shape. Tests that set their own max_examples keep it.
settings.register_profile("moved-clock", max_examples=25)
if offset_from_env():
    settings.load_profile("moved-clock")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``IOTDLM_CLOCK_OFFSET`` set (``make test-future``) every process of ours runs on the
    moved clock; tests marked ``real_clock`` also need a verifier that reads the machine's real
    clock (a TLS handshake, nats-server, curl, ngclient), which would see our certificates as not
    yet valid. They are skipped then, with that reason; every other test runs."""
    offset = offset_from_env()
    if not offset:
        return
    skip = pytest.mark.skip(
        reason=f"{OFFSET_ENV}={os.environ[OFFSET_ENV]}: a verifier here reads the machine's real clock"
    )
    for item in items:
        if item.get_closest_marker("real_clock") is not None:
            item.add_marker(skip)
