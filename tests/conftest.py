"""Shared test configuration. Fixture plug-ins live beside this file, one per seam."""

from __future__ import annotations

import os

import pytest

from iotdlm.clock import OFFSET_ENV, offset_from_env

pytest_plugins = ["tests.fixtures_nats", "tests.fixtures_store", "tests.fixtures_hsm"]


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
