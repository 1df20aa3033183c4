"""Shared test configuration. Fixture plug-ins live beside this file, one per seam."""

pytest_plugins = ["tests.fixtures_nats", "tests.fixtures_store"]
