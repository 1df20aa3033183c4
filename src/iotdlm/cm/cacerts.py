"""cm's copy of the deployment's CA certificates, for EST ``/cacerts`` (RFC 7030 4.1) and
``/ca/{name}.crt``: seeded from the public CA files, refreshed from km when stale."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from cryptography import x509

from iotdlm.clock import Clock
from iotdlm.cm import est
from iotdlm.errors import IotdlmError, NotFoundError, UnavailableError
from iotdlm.pki.chain import der
from iotdlm.wire import km as msg

log = logging.getLogger(__name__)


class CaCerts:
    """The deployment's CA certificates: the body of ``/cacerts`` (every issuing CA, then the root)
    and each CA's certificate by name for ``/ca/{name}.crt`` (root, factory, operational, service).

    Seeded from the deployment's public CA files (so both answer even when km is off, as in the
    software-management mode), refreshed from km (``km.ca.chain``) at most every ``ttl`` seconds;
    if km does not answer, the last known set is served. ``initial`` names its certificates (a
    mapping) or not (a sequence: ``/ca/{name}.crt`` then waits for km).
    """

    def __init__(
        self,
        initial: Sequence[x509.Certificate] | Mapping[str, x509.Certificate],
        *,
        fetch: Callable[[], Awaitable[msg.ChainResponse]] | None,
        clock: Clock,
        ttl: float = 300.0,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self.ttl = ttl
        self._ttl = dt.timedelta(seconds=ttl)
        certs = list(initial.values()) if isinstance(initial, Mapping) else list(initial)
        self._body: bytes | None = est.encode_base64_body(est.certs_only(certs)) if certs else None
        self._named: dict[str, bytes] = {n: der(c) for n, c in initial.items()} if isinstance(initial, Mapping) else {}
        self._fetched_at: dt.datetime | None = None
        self._lock = asyncio.Lock()

    @staticmethod
    def from_chain(chain: msg.ChainResponse) -> list[x509.Certificate]:
        out: list[x509.Certificate] = []
        seen: set[bytes] = {chain.root}
        for name in sorted(chain.chains):
            if name in chain.not_in_cacerts:  # rotated out, past its overlap (ADR 0026)
                continue
            for d in chain.chains[name]:
                if d not in seen:
                    seen.add(d)
                    out.append(x509.load_der_x509_certificate(d))
        out.append(x509.load_der_x509_certificate(chain.root))
        return out

    @staticmethod
    def named_from_chain(chain: msg.ChainResponse) -> dict[str, bytes]:
        """CA name -> DER: ``root``, and each issuing CA (the first certificate of its chain)."""
        out = {name: ders[0] for name, ders in chain.chains.items() if ders}
        out["root"] = chain.root
        for d in out.values():
            x509.load_der_x509_certificate(d)  # ValueError: km's chain does not parse
        return out

    def _stale(self) -> bool:
        return self._fetched_at is None or self._clock.now() - self._fetched_at >= self._ttl

    async def _refresh_if_stale(self) -> None:
        if self._fetch is not None and self._stale():
            async with self._lock:
                if self._stale():
                    await self._refresh()

    async def body(self) -> bytes:
        await self._refresh_if_stale()
        if self._body is None:
            raise UnavailableError("the CA certificates are not known yet: km has not answered")
        return self._body

    async def certificate(self, name: str) -> bytes:
        """DER of the CA certificate called ``name``; NotFoundError for a name we do not have."""
        await self._refresh_if_stale()
        found = self._named.get(name)
        if found is None:
            if not self._named:
                raise UnavailableError("the CA certificates are not known yet: km has not answered")
            known = ", ".join(sorted(self._named))
            raise NotFoundError(f"no CA certificate called {name[:40]!r}; known: {known}")
        return found

    async def _refresh(self) -> None:
        assert self._fetch is not None
        try:
            chain = await self._fetch()
            certs = self.from_chain(chain)
            named = self.named_from_chain(chain)
        except IotdlmError as exc:
            if self._body is None:
                raise
            log.warning("cacerts: km did not give the CA chain (%s); serving the last known one", exc)
        except ValueError as exc:
            log.warning("cacerts: km's CA chain does not parse (%s); serving the last known one", exc)
        else:
            self._body = est.encode_base64_body(est.certs_only(certs))
            self._named = named
        # also after a failure: km is not asked again for every request while it is away
        self._fetched_at = self._clock.now()
