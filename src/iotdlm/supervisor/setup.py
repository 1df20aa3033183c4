"""What ``iotdlm up`` prepares before a supervisor runs: the supervisor's identity for a deployment
made before modes existed, and the command table a test or an operator may give."""

from __future__ import annotations

import json
from pathlib import Path

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.clock import Clock
from iotdlm.deployment import Deployment
from iotdlm.modes.table import DEFAULT_COMMANDS


def ensure_identity(dep: Deployment, clock: Clock) -> bool:
    """Give a deployment made before modes existed its supervisor identity (certificate from the
    service CA, NATS user). Needs the CA passphrase. Returns whether it created one."""
    if subjects.SUPERVISOR in dep.identity_names():
        return False
    from iotdlm.runtime import open_store, record_identities

    service_ca = dep.load_cas()["service"]
    dep.add_identity(subjects.SUPERVISOR, None, service_ca=service_ca, now=clock.now())
    store = open_store(dep)
    try:
        record_identities(dep, store, clock.now())
    finally:
        store.close()
    return True


def read_commands(path: Path) -> dict[str, list[str]]:
    """A command table from a JSON file: ``{"km": ["{python}", "-m", ...], ...}`` (merged over the defaults)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise errors.BadRequestError(f"cannot read the command table {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise errors.BadRequestError(f"{path}: the command table must be a JSON object (module -> list of strings)")
    table: dict[str, list[str]] = {k: list(v) for k, v in DEFAULT_COMMANDS.items()}
    for module, argv in raw.items():
        if module not in table:
            raise errors.BadRequestError(f"{path}: unknown module {module!r}; Table 1 has {', '.join(table)}")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise errors.BadRequestError(f"{path}: the command of {module} must be a non-empty list of strings")
        table[module] = argv
    return table
