"""Client of sm's bus API (pm lists and loads software from the local repository)."""

from __future__ import annotations

from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.errors import BadRequestError
from iotdlm.wire import software as sw

#: the repository announced a release (cm relays its webhook); iotdlm.bus.subjects.SM_NOTIFY
SM_NOTIFY = f"{s.SM_PREFIX}.notify"


class SmClient:
    def __init__(self, bus: Bus, *, timeout: float = 10.0) -> None:
        self.bus = bus
        self.timeout = timeout

    async def list(self, dtype: str) -> list[sw.StoredSoftware]:
        """Stored versions of ``dtype``, ascending release counter."""
        body = sw.encode(sw.ListRequest(dtype=sw.check_dtype(dtype)))
        reply = await self.bus.request(s.SM_SOFTWARE_LIST, body, timeout=self.timeout)
        return sw.decode(reply, sw.ListResponse, what="sm reply").versions

    async def load(self, dtype: str, release_counter: int | None = None) -> sw.LoadResponse:
        """A stored version (default: the latest): image path, meta.enc and sig_sm for Algorithm 1."""
        body = sw.encode(sw.LoadRequest(dtype=sw.check_dtype(dtype), release_counter=release_counter))
        reply = await self.bus.request(s.SM_SOFTWARE_LOAD, body, timeout=self.timeout)
        out = sw.decode(reply, sw.LoadResponse, what="sm reply")
        if out.dtype != dtype or (release_counter is not None and out.release_counter != release_counter):
            raise BadRequestError(f"sm answered with {out.dtype}/{out.release_counter}, not what was asked")
        return out

    async def notify(self, dtype: str) -> None:
        """Tell sm the repository has a new release of ``dtype`` (what cm does on a webhook)."""
        await self.bus.publish(SM_NOTIFY, sw.encode(sw.NotifyMessage(dtype=sw.check_dtype(dtype))))
