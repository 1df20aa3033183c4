"""What modes puts on the wire and on disk (JSON, msgspec): the mode record, the switch request
and its answer, the status. Pure.

- :class:`ModeRecord` -- the value of key ``mode`` in bucket ``iotdlm_mode``: ``{"mode", "since", "by"}``
- :class:`SavedMode` -- ``DIR/mode.json``, so ``iotdlm up`` without ``--mode`` resumes the last mode
- :class:`SetRequest` / :class:`SetReply` -- ``iotdlm.v1.modes.set``
- :class:`StatusReply` -- ``iotdlm.v1.modes.status`` (the request body is empty)
- :class:`StopRequest` / :class:`StopReply` -- ``iotdlm.v1.modes.stop`` (``iotdlm down``)
"""

from __future__ import annotations

import datetime as dt
from typing import TypeVar

import msgspec

from iotdlm.wire import codec
from iotdlm.wire.codec import encode as encode

#: longest accepted message (these are tiny; anything bigger is hostile)
MAX_MESSAGE = 64 * 1024


class ModeRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The current mode, as every service reads it. Unknown fields are ignored (newer supervisors)."""

    mode: str
    #: ISO 8601, UTC
    since: str
    #: who switched: the operator as the supervisor saw them
    by: str


class ModeAlarm(msgspec.Struct, frozen=True):
    """``iotdlm.v1.events.<module>.mode_alarm``: a service refused the mode record it read (it
    does not verify as signed by the supervisor); the supervisor audits it."""

    module: str
    #: the bucket revision of the refused value
    revision: int
    reason: str
    #: alarms for the same reason this module held back since its last one (rate limit)
    suppressed: int = 0


class SavedMode(msgspec.Struct, frozen=True):
    mode: str
    since: str
    by: str
    with_sm: bool = False


class SetRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: str
    #: sm in provisioning-software (Table 1: optional); ``None`` keeps the current choice
    with_sm: bool | None = None
    #: the operator asking (informational: only the admin identity may send this request at all)
    by: str = "admin"


class SetReply(msgspec.Struct, frozen=True):
    #: the mode before (``None``: the supervisor had none yet)
    from_mode: str | None = msgspec.field(name="from")
    to: str
    with_sm: bool
    since: str
    stopped: list[str] = []
    started: list[str] = []
    #: services that ran before and after
    kept: list[str] = []
    #: services that had given up and were started again
    restarted: list[str] = []
    #: the mode was already in force, but the record in the bucket did not verify (or was not the
    #: supervisor's): it was signed and written again (issue 11)
    repaired: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.stopped or self.started or self.restarted or self.repaired) or self.from_mode != self.to


class RestartRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: service names as ``status`` lists them (``km``, ``pm-board-a``), or a module (``pm``: each of its)
    services: list[str]
    #: the operator asking (informational: only the admin identity may send this request at all)
    by: str = "admin"


class ServiceHealth(msgspec.Struct, frozen=True):
    name: str
    module: str
    dtype: str | None
    #: running, starting, backoff (waiting to restart), failed (gave up), stopping, off
    state: str
    pid: int | None
    running: bool
    restarts: int
    #: seconds since the current process started
    uptime: float | None
    #: exit status of the last process that ended on its own (negative: killed by that signal)
    last_exit: int | None
    log: str
    #: the last meaningful line the last process that ended wrote to its log (its error, usually)
    last_error: str | None = None


class StatusReply(msgspec.Struct, frozen=True):
    mode: str | None
    since: str | None
    by: str | None
    with_sm: bool
    supervisor_pid: int
    nats_url: str
    #: "from -> to" while a switch is under way
    switching: str | None
    services: list[ServiceHealth]
    #: whether the mode record in the bucket verifies as the supervisor's and matches its mode:
    #: ``verified``, or why not (issue 11)
    record: str = "verified"
    #: the operator console (ADR 0030), started in every mode: its process (None: not started --
    #: ``[console] enabled = false`` or not in the command table) and where it answers
    console: ServiceHealth | None = None
    console_url: str | None = None


class StopRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: the operator asking (informational: only the admin identity may send this request at all)
    by: str = "admin"


class StopReply(msgspec.Struct, frozen=True):
    supervisor_pid: int
    #: the services it is stopping (in this order), NATS after them
    stopping: list[str] = []
    #: whether it runs the NATS server itself (and stops it last)
    embedded_nats: bool = True


_S = TypeVar("_S", bound=msgspec.Struct)


def decode(data: bytes, typ: type[_S]) -> _S:
    """Decode untrusted JSON into ``typ``; anything malformed is a :class:`BadRequestError`."""
    return codec.decode(data, typ, what=typ.__name__, max_size=MAX_MESSAGE)


def timestamp(at: dt.datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("mode timestamps must be timezone-aware")
    return at.astimezone(dt.UTC).isoformat(timespec="seconds")
